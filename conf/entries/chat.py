"""Chat rooms: the CONNMIX quick start, as a meshgate entry.

Client messages are JSON:

    {"op": "join", "room_id": "42"}   leave the current room (if any), join room:42
    {"op": "send", "msg": "hello"}     publish {"client_id": "...", "msg": "hello"} to the room
    {"op": "quit"}                     leave the room

Each is answered {"status": "success"}; a message that is not JSON, an unknown
op or a missing field is answered {"status": "error", "msg": "..."}. The room
is kept in the connection's context (`room`), so a backend can read it with
conn.call get_context, and publish to `room:<id>` itself.
"""

import json

from node.entry import mesh

ROOM_PREFIX = "room:"
MAX_MESSAGE = 4096


def reply(conn, **fields):
    conn.send(json.dumps(fields, ensure_ascii=False))


def error(conn, message):
    reply(conn, status="error", msg=message)


async def on_message(conn, frame):
    if frame["type"] != "text":
        return error(conn, "send JSON text")
    try:
        message = json.loads(frame["data"])
    except ValueError:
        return error(conn, "invalid JSON")
    if not isinstance(message, dict):
        return error(conn, "expected a JSON object")
    op = message.get("op")
    room = conn.context_value("room")

    if op == "join":
        room_id = message.get("room_id")
        if isinstance(room_id, bool) or not isinstance(room_id, (str, int)) or str(room_id).strip() == "":
            return error(conn, "room_id: a non-empty string or number is required")
        channel = f"{ROOM_PREFIX}{room_id}"
        try:
            if room and room != channel:
                conn.unsubscribe(room)
            await conn.subscribe(channel)   # every node knows before we say success
        except ValueError as exc:
            return error(conn, f"room_id: {exc}")
        conn.set_context_value("room", channel)
        return reply(conn, status="success", room=channel)

    if op == "send":
        text = message.get("msg")
        if not isinstance(text, str) or not text:
            return error(conn, "msg: a non-empty string is required")
        if len(text) > MAX_MESSAGE:
            return error(conn, f"msg: at most {MAX_MESSAGE} characters")
        if not room:
            return error(conn, "join a room first")
        reply(conn, status="success")
        mesh.publish(room, {"client_id": str(conn.client_id), "msg": text})
        return None

    if op == "quit":
        if room:
            conn.unsubscribe(room)
            conn.set_context_value("room", None)
        return reply(conn, status="success")

    return error(conn, f"unknown op {op!r}" if op is not None else "op: required")
