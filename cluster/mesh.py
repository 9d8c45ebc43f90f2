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
Mesh requests and replies are one frame each (see `request` and `reply`);
request id 0 means no reply is wanted. Message kinds and their codes are
exchanged between processes: append only.
"""

import struct
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
    request_id: int
    header: dict
    body: bytes


# One frame per mesh message: every extra ZeroMQ frame costs a send call, and a
# publish forwarded to a peer is on the fan-out path.
#   request: kind code (1 byte) | request id (8 bytes, 0 = no reply) | header length (4 bytes) | header JSON | body
#   reply:   REPLY code (1 byte) | request id (8 bytes) | result JSON
_REQUEST_HEAD = struct.Struct("!BQI")
_REPLY_HEAD = struct.Struct("!BQ")
# Kind codes on the wire (exchanged between processes: append only).
_CODES = {SEND: 1, PUBLISH: 2, CALL: 3, QUEUE_EVENT: 4, ADVERT: 5, REPLY: 6}
_KINDS = {code: kind for kind, code in _CODES.items()}
_REPLY_CODE = _CODES[REPLY]


def request(kind: bytes, request_id: int, header: Any, body: bytes = b"") -> list:
    """A mesh request (one frame); `request_id` 0 means no reply is wanted."""
    head = _dumps(header)
    return [_REQUEST_HEAD.pack(_CODES[kind], request_id, len(head)) + head + body]


def read_request(frames: list) -> MeshRequest:
    """Reads a mesh request (without the routing id the ROUTER prepends).

    Raises:
        FrameError: wrong frame count, unknown kind, truncated frame, header not a JSON object.
    """
    if len(frames) != 1:
        raise FrameError(f"mesh request has {len(frames)} frames, expected 1")
    frame = bytes(frames[0])
    if len(frame) < _REQUEST_HEAD.size:
        raise FrameError("mesh request is truncated")
    code, request_id, head_size = _REQUEST_HEAD.unpack_from(frame)
    kind = _KINDS.get(code)
    if kind is None or kind not in MESH_KINDS:
        raise FrameError(f"unknown mesh kind code {code}")
    end = _REQUEST_HEAD.size + head_size
    if end > len(frame):
        raise FrameError("mesh request header is truncated")
    header = _loads(frame[_REQUEST_HEAD.size:end])
    if not isinstance(header, dict):
        raise FrameError("mesh header must be a JSON object")
    return MeshRequest(kind, request_id, header, frame[end:])


def reply(request_id: int, result: Any) -> list:
    """A mesh reply (one frame)."""
    return [_REPLY_HEAD.pack(_REPLY_CODE, request_id) + _dumps(result)]


def read_reply(frames: list) -> tuple:
    """Returns `(request_id, result)` of a mesh reply.

    Raises:
        FrameError: not a reply.
    """
    if len(frames) != 1:
        raise FrameError("not a mesh reply")
    frame = bytes(frames[0])
    if len(frame) < _REPLY_HEAD.size or frame[0] != _REPLY_CODE:
        raise FrameError("not a mesh reply")
    return _REPLY_HEAD.unpack_from(frame)[1], _loads(frame[_REPLY_HEAD.size:])
