"""Chat rooms: the CONNMIX quick start, as a meshgate entry.

Client messages are JSON:

    {"op": "join", "room_id": "42"}   leave the current room (if any), join room:42
    {"op": "send", "msg": "hello"}     publish {"client_id": "...", "msg": "hello"} to the room
    {"op": "who"}                      who is in the room: {"status": "success", "members": [client ids]}
    {"op": "quit"}                     leave the room

Each is answered {"status": "success"}; a message that is not JSON, an unknown
op or a missing field is answered {"status": "error", "msg": "..."}. The room
is kept in the connection's context (`room`), so a backend can read it with
conn.call get_context, and publish to `room:<id>` itself.

Presence, for clients that ask for it: {"op": "join", "room_id": "42",
"presence": true} also answers with `members` (every client in the room,
mesh-wide, from mesh.presence) and `client_id` (the joiner's own), and from
then on the client gets {"presence": "join" | "leave", "client_id": "..."}
whenever someone enters or leaves the room (published to `presence:room:42`,
which only such clients subscribe to). A client whose node process dies
leaves without a "leave" (its node cannot say it): `who` is always exact.
"""

import json

from node.entry import mesh

ROOM_PREFIX = "room:"
PRESENCE_PREFIX = "presence:"   # + the room's channel: join and leave notices, for clients that asked
MAX_MESSAGE = 4096


def reply(conn, **fields):
    conn.send(json.dumps(fields, ensure_ascii=False))


def error(conn, message):
    reply(conn, status="error", msg=message)


async def members(room: str) -> list:
    found = await mesh.presence(room)
    return sorted(entry["c"] for entry in found["clients"])


def notify(conn, room: str, what: str) -> None:
    """Tells the room's presence-aware clients that `conn` joined or left (a name too long for the
    presence channel has no notices; `who` still answers)."""
    try:
        mesh.publish(PRESENCE_PREFIX + room, {"presence": what, "client_id": str(conn.client_id)})
    except ValueError:
        pass


def leave(conn, room: str) -> None:
    conn.unsubscribe(room)
    if conn.context_value("presence"):
        conn.unsubscribe(PRESENCE_PREFIX + room)
    notify(conn, room, "leave")


def on_close(conn, code, reason):
    room = conn.context_value("room")
    if room:
        notify(conn, room, "leave")


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
        wants_presence = message.get("presence") is True
        try:
            if room and room != channel:
                leave(conn, room)
            elif room == channel and conn.context_value("presence") and not wants_presence:
                conn.unsubscribe(PRESENCE_PREFIX + channel)
            await conn.subscribe(channel, *([PRESENCE_PREFIX + channel] if wants_presence else []))
        except ValueError as exc:   # every node knows of the subscription before we say success
            return error(conn, f"room_id: {exc}")
        conn.set_context_value("room", channel)
        conn.set_context_value("presence", True if wants_presence else None)
        if room != channel:
            notify(conn, channel, "join")
        if wants_presence:
            return reply(conn, status="success", room=channel, client_id=str(conn.client_id),
                         members=await members(channel))
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

    if op == "who":
        if not room:
            return error(conn, "join a room first")
        return reply(conn, status="success", members=await members(room))

    if op == "quit":
        if room:
            leave(conn, room)
            conn.set_context_value("room", None)
        return reply(conn, status="success")

    return error(conn, f"unknown op {op!r}" if op is not None else "op: required")
