"""Multipart framing of node<->node and node<->coordinator messages.

PURE: builds and reads lists of frames (bytes); no sockets here.

ZeroMQ sockets of a cluster:

| socket | type | bind/connect | owner | purpose |
| --- | --- | --- | --- | --- |
| registry | ROUTER | bind `coordinator.registry` (6786) | coordinator | registration, heartbeats, adverts in; table updates out |
| control link | DEALER | connect registry | each node | the node's side of the above (fixed routing id) |
| mesh point | ROUTER | bind `node.mesh` (one port per node) | each node | requests from peers in; replies out |
| peer link | DEALER | connect a peer's mesh point | each node, one per peer | requests to that peer out; its replies in |

Control messages (either direction): `[kind, json]`.
Mesh requests: `[kind, request_id, json_header, body]`; an empty request_id
means no reply is wanted. Mesh replies: `[b"REP", request_id, json_result]`.
Message kinds are exchanged between processes: append only.
"""

from typing import Any, NamedTuple

import ujson

# node -> coordinator
REGISTER = b"REG"
HEARTBEAT = b"HB"
ADVERT = b"ADV"          # also node -> node
SYNC = b"SYNC"
BYE = b"BYE"
# coordinator -> node
WELCOME = b"WELCOME"
UPDATE = b"UPD"
SNAPSHOT = b"SNAP"
REREGISTER = b"REREG"
REFUSED = b"REFUSED"
# node -> node
SEND = b"SEND"
PUBLISH = b"PUB"
CALL = b"CALL"
QUEUE_EVENT = b"QEV"
REPLY = b"REP"

CONTROL_KINDS = frozenset((REGISTER, HEARTBEAT, ADVERT, SYNC, BYE, WELCOME, UPDATE, SNAPSHOT, REREGISTER, REFUSED))
MESH_KINDS = frozenset((SEND, PUBLISH, CALL, QUEUE_EVENT, ADVERT))


class FrameError(ValueError):
    """A message that does not follow this module's framing."""


def _dumps(value: Any) -> bytes:
    return ujson.dumps(value, ensure_ascii=False).encode("utf-8")


def _loads(raw: bytes) -> Any:
    try:
        return ujson.loads(raw)
    except (ValueError, TypeError) as exc:
        raise FrameError(f"bad JSON frame: {exc}") from None


def control(kind: bytes, body: Any) -> list:
    """A control message `[kind, json]`."""
    return [kind, _dumps(body)]


def read_control(frames: list) -> tuple:
    """Returns `(kind, body)` of a control message (without any routing id).

    Raises:
        FrameError: wrong frame count, unknown kind or a body that is not a JSON object.
    """
    if len(frames) != 2:
        raise FrameError(f"control message has {len(frames)} frames, expected 2")
    kind = bytes(frames[0])
    if kind not in CONTROL_KINDS:
        raise FrameError(f"unknown control kind {kind!r}")
    body = _loads(frames[1])
    if not isinstance(body, dict):
        raise FrameError("control body must be a JSON object")
    return kind, body


class MeshRequest(NamedTuple):
    kind: bytes
    request_id: bytes
    header: dict
    body: bytes


def request(kind: bytes, request_id: bytes, header: Any, body: bytes = b"") -> list:
    """A mesh request `[kind, request_id, json_header, body]`."""
    return [kind, request_id, _dumps(header), body]


def read_request(frames: list) -> MeshRequest:
    """Reads a mesh request (without the routing id the ROUTER prepends).

    Raises:
        FrameError: wrong frame count, unknown kind, header not a JSON object.
    """
    if len(frames) != 4:
        raise FrameError(f"mesh request has {len(frames)} frames, expected 4")
    kind = bytes(frames[0])
    if kind not in MESH_KINDS:
        raise FrameError(f"unknown mesh kind {kind!r}")
    header = _loads(frames[2])
    if not isinstance(header, dict):
        raise FrameError("mesh header must be a JSON object")
    return MeshRequest(kind, bytes(frames[1]), header, bytes(frames[3]))


def reply(request_id: bytes, result: Any) -> list:
    """A mesh reply `[REP, request_id, json_result]`."""
    return [REPLY, request_id, _dumps(result)]


def read_reply(frames: list) -> tuple:
    """Returns `(request_id, result)` of a mesh reply.

    Raises:
        FrameError: not a reply.
    """
    if len(frames) != 3 or bytes(frames[0]) != REPLY:
        raise FrameError("not a mesh reply")
    return bytes(frames[1]), _loads(frames[2])
