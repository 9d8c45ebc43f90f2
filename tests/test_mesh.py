"""Tests of cluster/mesh.py: multipart framing between nodes and with the coordinator."""

import json
import struct

import pytest

from cluster import mesh
from cluster.mesh import FrameError, MeshRequest


@pytest.mark.parametrize("name, value", [
    ("REGISTER", b"REG"), ("HEARTBEAT", b"HB"), ("ADVERT", b"ADV"), ("SYNC", b"SYNC"), ("BYE", b"BYE"),
    ("WELCOME", b"WELCOME"), ("UPDATE", b"UPD"), ("SNAPSHOT", b"SNAP"), ("REREGISTER", b"REREG"),
    ("REFUSED", b"REFUSED"), ("SEND", b"SEND"), ("PUBLISH", b"PUB"), ("CALL", b"CALL"),
    ("QUEUE_EVENT", b"QEV"), ("REPLY", b"REP"),
])
def test_kind_values_are_stable(name, value):
    """Message kinds are exchanged between processes and keep their bytes."""
    assert getattr(mesh, name) == value


def test_kinds_are_distinct():
    """No two message kinds share the same bytes."""
    kinds = [mesh.REGISTER, mesh.HEARTBEAT, mesh.ADVERT, mesh.SYNC, mesh.BYE, mesh.WELCOME, mesh.UPDATE,
             mesh.SNAPSHOT, mesh.REREGISTER, mesh.REFUSED, mesh.SEND, mesh.PUBLISH, mesh.CALL,
             mesh.QUEUE_EVENT, mesh.REPLY]
    assert len(set(kinds)) == len(kinds)


# --- control messages ---------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(mesh.CONTROL_KINDS))
@pytest.mark.parametrize("body", [
    {},
    {"node_id": 3, "host": "h", "pid": 123, "started_at": 1700000000.5},
    {"v": 7, "interest": [[1, "ch", 2, 9]], "consumers": [[1, "t", 4, 1, 10]], "dead": [2]},
    {"reason": "node id 3 is held by pid 9 on h\u00e9", "retry": False, "text": "\u9891\u9053"},
])
def test_control_round_trip(kind, body):
    """A control message reads back as the kind and body it was made with."""
    frames = mesh.control(kind, body)
    assert len(frames) == 2
    assert all(isinstance(frame, bytes) for frame in frames)
    assert mesh.read_control(frames) == (kind, body)


def test_control_body_is_utf8_json():
    """The body frame is UTF-8 JSON any process can read."""
    frames = mesh.control(mesh.HEARTBEAT, {"node_id": 1, "name": "\u00e9"})
    assert json.loads(frames[1].decode("utf-8")) == {"node_id": 1, "name": "\u00e9"}


def test_read_control_accepts_bytearray():
    """Frames given as bytearray read the same as bytes."""
    frames = [bytearray(frame) for frame in mesh.control(mesh.SYNC, {"node_id": 2})]
    assert mesh.read_control(frames) == (mesh.SYNC, {"node_id": 2})


@pytest.mark.parametrize("frames", [
    [],
    [b"HB"],
    [b"HB", b"{}", b""],
    [b"routing-id", b"HB", b"{}"],
    [b"NOPE", b"{}"],
    [b"", b"{}"],
    [b"hb", b"{}"],
    [mesh.SEND, b"{}"],
    [mesh.REPLY, b"{}"],
    [mesh.HEARTBEAT, b""],
    [mesh.HEARTBEAT, b"{"],
    [mesh.HEARTBEAT, b"not json"],
    [mesh.HEARTBEAT, b"\xff\xfe"],
    [mesh.HEARTBEAT, b"[]"],
    [mesh.HEARTBEAT, b"[{}]"],
    [mesh.HEARTBEAT, b"null"],
    [mesh.HEARTBEAT, b"1"],
    [mesh.HEARTBEAT, b'"text"'],
    [mesh.HEARTBEAT, b"true"],
])
def test_read_control_bad(frames):
    """Wrong frame count, unknown kind, bad JSON or a non-object body is a FrameError."""
    with pytest.raises(FrameError):
        mesh.read_control(frames)


def test_frame_error_is_value_error():
    """FrameError is a ValueError, so generic handlers catch it too."""
    assert issubclass(FrameError, ValueError)


# --- mesh requests --------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(mesh.MESH_KINDS))
@pytest.mark.parametrize("request_id, header, body", [
    (1, {"c": 1463786910324359168}, b"payload"),
    (0, {}, b""),
    (42, {"channels": ["a", "\u9891"], "binary": True}, bytes(range(256))),
    (2 ** 64 - 1, {"nested": {"x": [1, None, "y"]}}, b"\x00"),
])
def test_request_round_trip(kind, request_id, header, body):
    """A mesh request is one frame and reads back with its kind, request id, header and raw body."""
    frames = mesh.request(kind, request_id, header, body)
    assert len(frames) == 1
    assert mesh.read_request(frames) == MeshRequest(kind, request_id, header, body)


def test_request_default_body_is_empty():
    """A request without a body reads back with an empty body."""
    assert mesh.read_request(mesh.request(mesh.CALL, 1, {"f": "close"})).body == b""


def test_request_id_zero_means_no_reply():
    """Request id 0 reads back as 0 (no reply wanted)."""
    assert mesh.read_request(mesh.request(mesh.PUBLISH, 0, {"c": ["a"]})).request_id == 0


def test_read_request_accepts_bytearray_and_returns_bytes():
    """A bytearray frame reads back; the body comes back as bytes."""
    frames = [bytearray(frame) for frame in mesh.request(mesh.SEND, 7, {"c": 1}, b"data")]
    message = mesh.read_request(frames)
    assert type(message.body) is bytes
    assert message == MeshRequest(mesh.SEND, 7, {"c": 1}, b"data")


def _raw(code, request_id, header: bytes, body: bytes = b"", length=None):
    head = struct.pack("!BQI", code, request_id, len(header) if length is None else length)
    return [head + header + body]


@pytest.mark.parametrize("frames", [
    [],
    [b""],
    [b"\x01\x00"],
    mesh.request(mesh.SEND, 1, {}) * 2,
    [b"peer-routing-id", *mesh.request(mesh.SEND, 1, {})],
    _raw(0, 1, b"{}"),
    _raw(99, 1, b"{}"),
    _raw(6, 1, b"{}"),                  # the reply code is not a request
    _raw(1, 1, b"{}", length=50),       # header longer than the frame
    _raw(1, 1, b""),
    _raw(1, 1, b"{"),
    _raw(1, 1, b"\xff"),
    _raw(1, 1, b"[]"),
    _raw(1, 1, b"null"),
    _raw(1, 1, b"5"),
    _raw(1, 1, b'"x"'),
])
def test_read_request_bad(frames):
    """Wrong frame count, truncation, unknown kind, or a header that is not a JSON object is a FrameError."""
    with pytest.raises(FrameError):
        mesh.read_request(frames)


# --- mesh replies -------------------------------------------------------------------------

@pytest.mark.parametrize("result", [
    {"s": True},
    {"s": 9, "f": 0},
    {"E": {"c": 301, "m": "p.c: client is not connected"}},
    [1, 2, 3],
    None,
    True,
    17,
    "\u00e9",
])
def test_reply_round_trip(result):
    """A reply is one frame and reads back as its request id and result, whatever JSON the result is."""
    frames = mesh.reply(7, result)
    assert len(frames) == 1
    assert mesh.read_reply(frames) == (7, result)


@pytest.mark.parametrize("frames", [
    [],
    [b""],
    [struct.pack("!BQ", 6, 1)[:5]],
    mesh.reply(1, {}) * 2,
    [struct.pack("!BQ", 1, 1) + b"{}"],
    [struct.pack("!BQ", 6, 1)],
    [struct.pack("!BQ", 6, 1) + b"{"],
    [struct.pack("!BQ", 6, 1) + b"\xff"],
])
def test_read_reply_bad(frames):
    """Anything but one well-formed reply frame is a FrameError."""
    with pytest.raises(FrameError):
        mesh.read_reply(frames)


def test_reply_is_not_a_request():
    """A reply is not mistaken for a request or a control message."""
    frames = mesh.reply(1, {"s": True})
    with pytest.raises(FrameError):
        mesh.read_request(frames)
    with pytest.raises(FrameError):
        mesh.read_control(frames)
