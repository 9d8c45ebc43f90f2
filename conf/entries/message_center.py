"""A per-user message center with login through a backend (the CONNMIX login pattern).

Client messages are JSON:

    {"op": "auth", "token": "..."}            log in
    {"op": "subscribe", "channel": "@user"}  receive what is published to user:<uid>

`auth` pushes {"token": ..., "client_id": ...} to the topic `auth`. A backend
(examples/message_center_backend.py) consumes that topic, checks the token and
answers with conn.call set_context_value ["uid", <uid>]; the entry waits for
that (wait_context_value, 5 s) and answers {"code": 0, "msg": "ok", "uid": ...}
or {"code": 1, "msg": "Auth failed"}. Meanwhile this connection's next messages
wait; other connections go on. Subscribing before login is answered
{"code": 1, "msg": "Not Auth"}. Everything else the client sends goes to the
server's topic, as with the default entry.
"""

import json

from node.entry import ConnectionGone, ContextTimeout, QueueFull, queue

AUTH_TOPIC = "auth"
AUTH_TIMEOUT_S = 5.0


def answer(conn, code, msg, **fields):
    conn.send(json.dumps({"code": code, "msg": msg, **fields}))


async def on_message(conn, frame):
    try:
        message = json.loads(frame["data"]) if frame["type"] == "text" else None
    except ValueError:
        message = None
    op = message.get("op") if isinstance(message, dict) else None

    if op == "auth":
        token = message.get("token")
        if not isinstance(token, str) or not token:
            return answer(conn, 1, "token: a non-empty string is required")
        try:
            queue.push(AUTH_TOPIC, {"token": token, "client_id": str(conn.client_id)})
        except QueueFull:
            return answer(conn, 1, "Auth unavailable, try again")
        try:
            uid = await conn.wait_context_value("uid", AUTH_TIMEOUT_S)
        except ContextTimeout:
            return answer(conn, 1, "Auth failed")
        except ConnectionGone:   # the client left while we waited
            return None
        return answer(conn, 0, "ok", uid=uid)

    if op == "subscribe":
        uid = conn.context_value("uid")
        if uid is None:
            return answer(conn, 1, "Not Auth")
        if message.get("channel") != "@user":
            return answer(conn, 1, "channel: only @user is offered")
        try:
            await conn.subscribe(f"user:{uid}")
        except ValueError:
            return answer(conn, 1, "uid: not usable in a channel name")
        return answer(conn, 0, "ok", channel=f"user:{uid}")

    try:   # anything else: the default behaviour
        queue.push(conn.topic, {"frame": frame})
    except QueueFull:
        answer(conn, 1, "busy, message dropped")
