"""Table-driven tests of cluster/mesh.py, the node-to-node and node-to-coordinator contract.

Hand-written inputs are encoded with the standard library's json (not the
module's own encoder), so a change of the wire form shows up as a failure here.
"""

import copy
import json
import re

import pytest

from cluster import mesh, protocol
from cluster.ids import MAX_NODE_ID
from cluster.mesh import (
    ACK_CONSUMER, FROM_COORDINATOR, FROM_NODE, FROM_SUPERVISOR, Advert, Bye, Call, Delivered, DeliveryOutcome,
    Exited, Failure, FrameError, Heartbeat, Lost, Metrics, NodeEntry, NodeState, PeerAdvert, Present, Presence,
    Publish, QueueAcks, QueueDelivery, QueueEvent, Refused, Register, Reregister, Request, Send, Snapshot, Sync,
    Update, Welcome,
)
from cluster.protocol import ErrorCode

MAX_ID = 2 ** 64 - 1          # largest client id
BIG = 2 ** 63 - 1             # largest count, sequence and consumer id
NAN = float("nan")
INF = float("inf")
DROP = object()               # mutate(): remove the key instead of setting it


# --- helpers ---------------------------------------------------------------------------------

def wire(value) -> bytes:
    """JSON as another process might write it (stdlib encoder, ASCII escapes, spaces)."""
    return json.dumps(value).encode("ascii")


def control(kind: bytes, body) -> list:
    """The two frames of a control message; `body` is a JSON value or raw bytes."""
    return [kind, body if isinstance(body, (bytes, bytearray)) else wire(body)]


def request(code: int, header, body: bytes = b"", request_id: int = 7) -> list:
    """The one frame of a mesh request, laid out by hand: code | id | header length | header | body."""
    head = header if isinstance(header, bytes) else wire(header)
    return [bytes((code,)) + request_id.to_bytes(8, "big") + len(head).to_bytes(4, "big") + head + body]


def reply(request_id: int, result: bytes) -> list:
    """The one frame of a mesh reply, laid out by hand: code 6 | id | result."""
    return [b"\x06" + request_id.to_bytes(8, "big") + result]


def steps(path: str) -> list:
    """`a.b[0][1]` -> ["a", "b", 0, 1]."""
    return [int(index) if index else key for index, key in re.findall(r"\[(\d+)\]|([^.\[\]]+)", path)]


def mutate(body, path: str, value):
    """A deep copy of `body` with the item at `path` set to `value` (or removed: DROP)."""
    body = copy.deepcopy(body)
    *parents, last = steps(path)
    target = body
    for step in parents:
        target = target[step]
    if value is DROP:
        del target[last]
    else:
        target[last] = value
    return body


def pick(message, path: str):
    """The item at `path` of a read message (fields by name, list items by index)."""
    for step in steps(path):
        message = message[step] if isinstance(step, int) else getattr(message, step)
    return message


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def label(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}..{len(text)}"


def assert_frame_error(call, *args, field=None, case=None) -> FrameError:
    """Runs `call` and checks it raises FrameError (a ValueError) whose message starts by naming `field`.

    `case` is the input shown when it does not (tests that loop over a table). Failures are
    reported without a traceback: the message says what was read and what came out.
    """
    where = f" for {case!r}" if case is not None else ""
    try:
        result = call(*args)
    except FrameError as error:
        assert isinstance(error, ValueError)
        # The field itself or a part of it (`CALL.a[0]` names `CALL.a`).
        if field is not None and not re.match(rf"{re.escape(field)}(?:[.\[][^: ]*)?[: ]", str(error)):
            pytest.fail(f"FrameError{where} does not name {field}: {error}", pytrace=False)
        return error
    except Exception as error:
        pytest.fail(f"{type(error).__name__} instead of FrameError{where}: {error}", pytrace=False)
    pytest.fail(f"no FrameError{where}: read {result!r}", pytrace=False)


def same(got, expected):
    """Equal, and of the same classes all the way down (Sync(1) == Bye(1) as tuples; [] != ())."""
    assert got == expected
    assert repr(got) == repr(expected)


def text_data(size: int) -> bytes:
    """Valid UTF-8 of exactly `size` bytes, mostly two-byte characters."""
    return ("é" * (size // 2) + "a" * (size % 2)).encode("utf-8")


def binary_data(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


SIZES = (0, 125, 126, 65535, 65536)
WS_FRAMES = [
    pytest.param(protocol.encode_ws_frame(text_data(size)), id=f"text-{size}") for size in SIZES
] + [
    pytest.param(protocol.encode_ws_frame(binary_data(size), binary=True), id=f"binary-{size}") for size in SIZES
]
TEXT_FRAME = protocol.encode_ws_frame("héllo".encode("utf-8"))
EVENT = protocol.queue_event(7, MAX_ID, "jobs", {"id": 1, "body": "é"})

NAME_255 = "€" * 85                 # 255 bytes
TEXT_255 = "é" * 127 + "a"          # 255 bytes


# --- control messages: round trips ------------------------------------------------------------

ENTRY_A = NodeEntry(7, "web-7.example", 4242, "http://10.0.0.7:6788", "tcp://10.0.0.7:6800", 12, 1712345678.125)
ENTRY_B = NodeEntry(MAX_NODE_ID, "узел-1023", 0, "http://[::1]:6788", "tcp://[::1]:6801", 0, 0)
ENTRY_C = NodeEntry(1, TEXT_255, BIG, "a" * 300, "tcp://node-1.dc-2.example.org:65535", BIG, 1e12)

FROM_NODE_MESSAGES = [
    Register(0, "web-1", 4242, "http://10.0.0.5:6788", "tcp://10.0.0.5:6800", 1712345678.125,
             NodeState([["news", 2, 7], ["新闻/头条", 1, BIG], [NAME_255, 0, 1]],
                       [["jobs", 1, 1, 9], ["émoji-🎉", BIG, 0, BIG]],
                       [0, 1, MAX_ID])),
    Register(MAX_NODE_ID, TEXT_255, 0, "é" * 150, "b" * 300, 0, NodeState([], [], [])),
    Register(1, "h", BIG, "h:6789", "tcp://h:1", 0.5, NodeState([["a", 1, 1]], [], [MAX_ID])),
    Heartbeat(1, {}),
    Heartbeat(MAX_NODE_ID, {"clients": 12, "load": 0.75, "id_ms": 1712345678125, "a" * 64: 0,
                            "big": mesh.MAX_FIGURE}),
    Heartbeat(5, {f"figure_{index}": index * 1.5 for index in range(mesh.MAX_FIGURES)}),
    Advert([["news", 0, 3], ["канал", 4, BIG]], [["jobs", 4, 0, 2]], [MAX_ID, 0], [1]),
    Advert([], [], [], []),
    Sync(1), Sync(MAX_NODE_ID), Bye(1), Bye(MAX_NODE_ID),
]

FROM_COORDINATOR_MESSAGES = [
    Welcome(7, 1712345678125, Snapshot(12, [ENTRY_A, ENTRY_B, ENTRY_C], [[7, "news", 2, 7], [1023, "新闻", 1, BIG]],
                                       [[1023, "jobs", BIG, 1, 9], [1, "émoji-🎉", 1, 0, 1]])),
    Welcome(MAX_NODE_ID, 0, Snapshot(0, [], [], [])),
    Update(1, None, [], [], []),
    Update(BIG, [ENTRY_A], [3, MAX_NODE_ID], [[7, "新闻", 0, 8]], [[7, "jobs", 3, 0, 10]]),
    Update(2, [], [5], [], []),
    Snapshot(3, [ENTRY_A], [], []),
    Snapshot(BIG, [NodeEntry(node_id, "h", node_id, "a", f"tcp://h:{7000 + node_id}", node_id, 1.0)
                   for node_id in range(1, MAX_NODE_ID + 1)], [], []),
    Reregister(),
    Refused("", False),
    Refused("node id 7 is held by a live node", True),
    Refused("€" * 333, False),
]


FROM_SUPERVISOR_MESSAGES = [
    Exited("web-1", 4242, 1712345678.125, 1712345679.5, -9),
    Exited(TEXT_255, 2 ** 31 - 1, 0, 0, 255),
    Exited("h", 1, 1.5, 1.5, -255),
]
SIDES = (FROM_NODE, FROM_COORDINATOR, FROM_SUPERVISOR)


def side(message) -> frozenset:
    """The direction set a control message is read with."""
    return next(allowed for allowed in SIDES if type(message) in allowed)


def message_id(message) -> str:
    return f"{type(message).__name__}-{label(message)}"


@pytest.mark.parametrize("message", FROM_NODE_MESSAGES, ids=message_id)
def test_control_from_node_round_trip(message):
    """A node's control message encodes to [kind, JSON] and reads back equal with FROM_NODE."""
    frames = mesh.encode_control(message)
    assert len(frames) == 2 and all(type(frame) is bytes for frame in frames)
    same(mesh.read_control(frames, FROM_NODE), message)


@pytest.mark.parametrize("message", FROM_COORDINATOR_MESSAGES, ids=message_id)
def test_control_from_coordinator_round_trip(message):
    """A coordinator's control message encodes to [kind, JSON] and reads back equal with FROM_COORDINATOR."""
    frames = mesh.encode_control(message)
    assert len(frames) == 2 and all(type(frame) is bytes for frame in frames)
    same(mesh.read_control(frames, FROM_COORDINATOR), message)


@pytest.mark.parametrize("message", FROM_SUPERVISOR_MESSAGES, ids=message_id)
def test_control_from_supervisor_round_trip(message):
    """A supervisor's exit notice encodes to [kind, JSON] and reads back equal with FROM_SUPERVISOR only."""
    frames = mesh.encode_control(message)
    assert len(frames) == 2 and all(type(frame) is bytes for frame in frames)
    same(mesh.read_control(frames, FROM_SUPERVISOR), message)
    for allowed in (FROM_NODE, FROM_COORDINATOR):
        assert "unexpected control kind" in str(assert_frame_error(mesh.read_control, frames, allowed))


@pytest.mark.parametrize("messages, allowed", [
    (FROM_NODE_MESSAGES, FROM_NODE), (FROM_COORDINATOR_MESSAGES, FROM_COORDINATOR),
    (FROM_SUPERVISOR_MESSAGES, FROM_SUPERVISOR),
], ids=["node", "coordinator", "supervisor"])
def test_control_bytearray_frames(messages, allowed):
    """Control frames given as bytearray read the same as bytes."""
    for message in messages:
        frames = [bytearray(frame) for frame in mesh.encode_control(message)]
        same(mesh.read_control(frames, allowed), message)


def test_control_bad_input_as_bytearray():
    """A bad control message given as bytearray is refused like the same bytes."""
    assert_frame_error(mesh.read_control, [bytearray(b"SYNC"), bytearray(b'{"node_id": 0}')], FROM_NODE,
                       field="SYNC.node_id")
    assert_frame_error(mesh.read_control, [bytearray(b"SYNC"), bytearray(b'{"node_id": 1')], FROM_NODE, field="SYNC")
    assert_frame_error(mesh.read_control, [bytearray(b"WELCOME"), bytearray(b"{}")], FROM_NODE)


@pytest.mark.parametrize("message", FROM_NODE_MESSAGES, ids=message_id)
def test_control_from_node_refused_from_coordinator(message):
    """A node's kind read as if it came from the coordinator (or a supervisor) is refused."""
    for allowed in (FROM_COORDINATOR, FROM_SUPERVISOR):
        error = assert_frame_error(mesh.read_control, mesh.encode_control(message), allowed)
        assert "unexpected control kind" in str(error)


@pytest.mark.parametrize("message", FROM_COORDINATOR_MESSAGES, ids=message_id)
def test_control_from_coordinator_refused_from_node(message):
    """A coordinator's kind read as if it came from a node is refused."""
    error = assert_frame_error(mesh.read_control, mesh.encode_control(message), FROM_NODE)
    assert "unexpected control kind" in str(error)


@pytest.mark.parametrize("message, allowed", [
    (Sync(3), frozenset()),
    (Sync(3), frozenset((Heartbeat, Bye))),
    (Reregister(), frozenset((Welcome,))),
])
def test_control_kind_outside_allowed(message, allowed):
    """Only the classes in `allowed` are read; any other kind is refused, even a valid one."""
    error = assert_frame_error(mesh.read_control, mesh.encode_control(message), allowed)
    assert "unexpected control kind" in str(error)


def test_direction_sets():
    """FROM_NODE, FROM_COORDINATOR and FROM_SUPERVISOR split the thirteen control classes between them."""
    assert FROM_NODE == {Register, Heartbeat, Metrics, Advert, Sync, Bye}
    assert FROM_COORDINATOR == {Welcome, Update, Snapshot, Reregister, Refused, Lost}
    assert FROM_SUPERVISOR == {Exited}
    assert set(mesh._CONTROL_KIND) == FROM_NODE | FROM_COORDINATOR | FROM_SUPERVISOR


# --- control messages: stable wire values ----------------------------------------------------

ENTRY_A_JSON = {"node_id": 7, "host": "web-7.example", "pid": 4242, "api_server": "http://10.0.0.7:6788",
                "mesh_point": "tcp://10.0.0.7:6800", "clients": 12, "started_at": 1712345678.125}

CONTROL_WIRE = [
    (Register(0, "web-1", 42, "http://h:6788", "tcp://h:6800", 1.5,
              NodeState([["news", 2, 7]], [["jobs", 3, 1, 9]], [MAX_ID])),
     b"REG", {"node_id": 0, "host": "web-1", "pid": 42, "api_server": "http://h:6788", "mesh_point": "tcp://h:6800",
              "started_at": 1.5, "state": {"interest": [["news", 2, 7]], "consumers": [["jobs", 3, 1, 9]],
                                           "clients": [MAX_ID]}}),
    (Heartbeat(3, {"clients": 2, "load": 0.5}), b"HB", {"node_id": 3, "stats": {"clients": 2, "load": 0.5}}),
    (Metrics(3, "# TYPE meshgate_a gauge\nmeshgate_a 1.0\n"), b"MT",
     {"node_id": 3, "text": "# TYPE meshgate_a gauge\nmeshgate_a 1.0\n"}),
    (Advert([["news", 0, 3]], [["jobs", 4, 0, 2]], [5], [6]), b"ADV",
     {"interest": [["news", 0, 3]], "consumers": [["jobs", 4, 0, 2]], "opened": [5], "closed": [6]}),
    (Sync(3), b"SYNC", {"node_id": 3}),
    (Bye(3), b"BYE", {"node_id": 3}),
    (Welcome(3, 99, Snapshot(12, [ENTRY_A], [[7, "news", 2, 7]], [[7, "jobs", 3, 1, 9]])), b"WELCOME",
     {"node_id": 3, "not_before_ms": 99, "snapshot": {"v": 12, "nodes": [ENTRY_A_JSON], "interest": [[7, "news", 2, 7]],
                                                      "consumers": [[7, "jobs", 3, 1, 9]]}}),
    (Update(4, None, [2], [[7, "news", 0, 8]], [[7, "jobs", 3, 0, 10]]), b"UPD",
     {"v": 4, "dead": [2], "interest": [[7, "news", 0, 8]], "consumers": [[7, "jobs", 3, 0, 10]]}),
    (Update(5, [ENTRY_A], [], [], []), b"UPD",
     {"v": 5, "nodes": [ENTRY_A_JSON], "dead": [], "interest": [], "consumers": []}),
    (Snapshot(6, [ENTRY_A], [], []), b"SNAP", {"v": 6, "nodes": [ENTRY_A_JSON], "interest": [], "consumers": []}),
    (Reregister(), b"REREG", {}),
    (Refused("full", True), b"REFUSED", {"reason": "full", "retry": True}),
    (Exited("web-1", 42, 1.5, 2.25, -9), b"EXIT",
     {"host": "web-1", "pid": 42, "started_at": 1.5, "exited_at": 2.25, "code": -9}),
]


@pytest.mark.parametrize("message, kind, body", CONTROL_WIRE, ids=lambda value: label(value)[:20])
def test_control_encodes_to_wire(message, kind, body):
    """Each control class encodes to its documented kind bytes and JSON keys."""
    frames = mesh.encode_control(message)
    assert frames[0] == kind
    assert json.loads(frames[1]) == body
    assert mesh.control_kind(message) == kind.decode()


@pytest.mark.parametrize("message, kind, body", CONTROL_WIRE, ids=lambda value: label(value)[:20])
def test_control_reads_from_wire(message, kind, body):
    """A hand-written [kind, JSON] with the documented keys reads as the control class."""
    same(mesh.read_control(control(kind, body), side(message)), message)


@pytest.mark.parametrize("message, frames", [
    (Sync(3), [b"SYNC", b'{"node_id":3}']),
    (Bye(1023), [b"BYE", b'{"node_id":1023}']),
    (Reregister(), [b"REREG", b"{}"]),
    (Refused("full", True), [b"REFUSED", b'{"reason":"full","retry":true}']),
    (Refused("é/ü", False), [b"REFUSED", '{"reason":"é/ü","retry":false}'.encode("utf-8")]),
    (Heartbeat(2, {"clients": 3}), [b"HB", b'{"node_id":2,"stats":{"clients":3}}']),
    (Update(9, None, [], [], []), [b"UPD", b'{"v":9,"dead":[],"interest":[],"consumers":[]}']),
    (Exited("h", 7, 1.5, 2.0, 0), [b"EXIT", b'{"host":"h","pid":7,"started_at":1.5,"exited_at":2.0,"code":0}']),
])
def test_control_exact_bytes(message, frames):
    """Small control messages encode to exactly these bytes (compact, UTF-8, no escaped slashes)."""
    assert mesh.encode_control(message) == frames


# --- control messages: bad fields ------------------------------------------------------------

WRONG_INT = ["1", True, False, 1.0, 1.5, NAN, None, [], {}]
NOT_TEXT = [1, True, None, [], {}]
CONTROL_CHARS = ["a\x00b", "a\nb", "tab\there", "\x1b[31m", "del\x7f", "nel\x85", "\x9f", "\r"]


def too_long(limit: int) -> list:
    return ["a" * (limit + 1), "€" * (limit // 3 + 1)]


def bad_row(size: int) -> list:
    return [[], ["x"] * (size - 1), ["x"] * (size + 1), "row", None, {}, 1]


BAD = {
    "node_id": WRONG_INT + [0, MAX_NODE_ID + 1, -1],
    "node_id_or_zero": WRONG_INT + [MAX_NODE_ID + 1, -1],
    "count": WRONG_INT + [-1, BIG + 1],
    "seq": WRONG_INT + [0, -1, BIG + 1],
    "consumer_id": WRONG_INT + [0, -1, BIG + 1],
    "present": WRONG_INT + [2, -1],
    "client_id": WRONG_INT + [-1, MAX_ID + 1],
    "version": WRONG_INT + [0, -1, BIG + 1],
    "pid": WRONG_INT + [0, -1, 2 ** 31],
    "exit_code": WRONG_INT + [-256, 256, BIG],
    "number": ["1", True, None, [], {}, -1, -0.5, NAN, INF, -INF],
    "flag": [1, 0, "true", None, [], {}],
    "text255": NOT_TEXT + CONTROL_CHARS + too_long(255) + ["\ud800", ""],     # host: never empty
    "text300": NOT_TEXT + CONTROL_CHARS + too_long(300) + ["\udfff", ""],     # api_server, mesh_point as sent
    "text1000": NOT_TEXT + CONTROL_CHARS + too_long(1000) + ["\ud800"],
    "name": ["", "a" * 256, "€" * 86, "a b", "a\tb", "a\nb", "a\u00a0b", "a\u3000b", "a\x00b", "a\x7fb", "a\x85b",
             "\ud800", 1, True, None, [], {}],
    "mesh_point": ["", "10.0.0.5:6800", "tcp://", "tcp://:6800", "tcp://host", "tcp://host:", "tcp://host:123456",
                   "tcp://*:6800", "udp://host:6800", "TCP://host:6800", "tcp://ho st:6800", "tcp://host:6800/",
                   "tcp://host:6800\n", " tcp://host:6800", "tcp://[::1:6800", "tcp://[]:6800", "tcp://[::g]:6800",
                   "tcp://hôst:6800", "tcp://host:-1", 6800, None, [], {}],
    "list": ["news", 1, True, {}, None],
    "list_or_null": ["news", 1, True, {}],
    "object": [None, 1, True, "x", []],
    "row2": bad_row(2),
    "row3": bad_row(3),
    "row4": bad_row(4),
    "row5": bad_row(5),
    "row2": bad_row(2),
    "ack_consumer_id": WRONG_INT + [0, -1, 9, BIG + 1, ACK_CONSUMER - 1],   # the bit, and within range
}

INTEREST = ("name", "count", "seq")                          # [channel, count, seq]
CONSUMERS = ("name", "consumer_id", "present", "seq")        # [topic, consumer_id, present, seq]
ORIGIN_INTEREST = ("node_id",) + INTEREST
ORIGIN_CONSUMERS = ("node_id",) + CONSUMERS
WATCHED = ("client_id", "name")                             # [client_id, lifecycle topic]


def optional_rows(path: str, cells: tuple) -> list:
    """As `rows`, for a list that may also be null (absent)."""
    return [(path, "list_or_null")] + rows(path, cells)[1:]


def rows(path: str, cells: tuple) -> list:
    """Field specs of a list of changes in wire form: the list, its first row, each cell of that row."""
    return [(path, "list"), (f"{path}[0]", f"row{len(cells)}")] + [
        (f"{path}[0][{index}]", check) for index, check in enumerate(cells)]


def entry_fields(path: str) -> list:
    return [(path, "object"), (f"{path}.node_id", "node_id"), (f"{path}.host", "text255"), (f"{path}.pid", "count"),
            (f"{path}.api_server", "text300"), (f"{path}.mesh_point", "mesh_point"), (f"{path}.clients", "count"),
            (f"{path}.started_at", "number")]


def snapshot_fields(prefix: str) -> list:
    return ([(join(prefix, "v"), "count"), (join(prefix, "nodes"), "list")] + entry_fields(join(prefix, "nodes[0]"))
            + rows(join(prefix, "interest"), ORIGIN_INTEREST) + rows(join(prefix, "consumers"), ORIGIN_CONSUMERS))


ENTRY_JSON = {"node_id": 7, "host": "web-7", "pid": 77, "api_server": "http://10.0.0.7:6788",
              "mesh_point": "tcp://10.0.0.7:6800", "clients": 3, "started_at": 1712345678.5}
SNAP_JSON = {"v": 12, "nodes": [ENTRY_JSON], "interest": [[7, "news", 2, 7]], "consumers": [[7, "jobs", 3, 1, 9]]}

# kind -> (a valid body with every field present and every list non-empty, which side sends it)
BODIES = {
    b"REG": ({"node_id": 5, "host": "web-1", "pid": 4242, "api_server": "http://10.0.0.5:6788",
              "mesh_point": "tcp://10.0.0.5:6800", "started_at": 1712345678.25,
              "state": {"interest": [["news", 2, 7]], "consumers": [["jobs", 3, 1, 9]], "clients": [MAX_ID],
                        "watched": [[MAX_ID, "life"]]}},
             FROM_NODE),
    b"HB": ({"node_id": 5, "stats": {"clients": 12, "load": 0.5}}, FROM_NODE),
    b"ADV": ({"interest": [["news", 2, 7]], "consumers": [["jobs", 3, 1, 9]], "opened": [MAX_ID], "closed": [0],
              "watched": [[MAX_ID, "life"]]}, FROM_NODE),
    b"SYNC": ({"node_id": 5}, FROM_NODE),
    b"BYE": ({"node_id": 5}, FROM_NODE),
    b"WELCOME": ({"node_id": 5, "not_before_ms": 1712345678125, "snapshot": SNAP_JSON}, FROM_COORDINATOR),
    b"UPD": ({"v": 13, "nodes": [ENTRY_JSON], "dead": [3], "interest": [[7, "news", 0, 8]],
              "consumers": [[7, "jobs", 3, 0, 10]]}, FROM_COORDINATOR),
    b"SNAP": (SNAP_JSON, FROM_COORDINATOR),
    b"REREG": ({}, FROM_COORDINATOR),
    b"REFUSED": ({"reason": "node id 5 is held by a live node", "retry": True}, FROM_COORDINATOR),
    b"LOST": ({"node_id": 3, "clients": [[MAX_ID, "life"]]}, FROM_COORDINATOR),
    b"EXIT": ({"host": "web-1", "pid": 4242, "started_at": 1712345678.25, "exited_at": 1712345690.5, "code": -9},
              FROM_SUPERVISOR),
}

# kind -> every field, by path, with the kind of check it must pass
CONTROL_FIELDS = {
    b"REG": [("node_id", "node_id_or_zero"), ("host", "text255"), ("pid", "count"), ("api_server", "text300"),
             ("mesh_point", "text300"), ("started_at", "number"), ("state", "object")]
            + rows("state.interest", INTEREST) + rows("state.consumers", CONSUMERS)
            + [("state.clients", "list"), ("state.clients[0]", "client_id")] + optional_rows("state.watched", WATCHED),
    b"HB": [("node_id", "node_id")],
    b"ADV": rows("interest", INTEREST) + rows("consumers", CONSUMERS)
            + [("opened", "list"), ("opened[0]", "client_id"), ("closed", "list"), ("closed[0]", "client_id")]
            + optional_rows("watched", WATCHED),
    b"SYNC": [("node_id", "node_id")],
    b"BYE": [("node_id", "node_id")],
    b"WELCOME": [("node_id", "node_id"), ("not_before_ms", "count"), ("snapshot", "object")]
                + snapshot_fields("snapshot"),
    b"UPD": [("v", "version"), ("nodes", "list_or_null")] + entry_fields("nodes[0]")
            + [("dead", "list"), ("dead[0]", "node_id")]
            + rows("interest", ORIGIN_INTEREST) + rows("consumers", ORIGIN_CONSUMERS),
    b"SNAP": snapshot_fields(""),
    b"REFUSED": [("reason", "text1000"), ("retry", "flag")],
    b"LOST": [("node_id", "node_id")] + rows("clients", WATCHED),
    b"EXIT": [("host", "text255"), ("pid", "pid"), ("started_at", "number"), ("exited_at", "number"),
              ("code", "exit_code")],
}


def test_bodies_are_valid():
    """Every base body of the bad-field tables reads as it stands."""
    for kind, (body, allowed) in BODIES.items():
        message = mesh.read_control(control(kind, body), allowed)
        assert type(message) in allowed and mesh.encode_control(message)[0] == kind


def json_paths(value, prefix=""):
    """Every path (`a.b[0][1]`) of a JSON value's objects and lists."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield join(prefix, key)
            yield from json_paths(item, join(prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield f"{prefix}[{index}]"
            yield from json_paths(item, f"{prefix}[{index}]")


def test_every_field_has_a_check():
    """The bad-field table names every JSON key a valid body holds (nothing left untested)."""
    for kind, (body, _) in BODIES.items():
        listed = {path for path, _ in CONTROL_FIELDS.get(kind, ())} | ({"stats", "stats.clients", "stats.load"}
                                                                       if kind == b"HB" else set())
        assert set(json_paths(body)) == listed, kind


CONTROL_FIELD_CASES = [
    pytest.param(kind, path, check, id=f"{kind.decode()}.{path}")
    for kind, fields in CONTROL_FIELDS.items() for path, check in fields
]


@pytest.mark.parametrize("kind, path, check", CONTROL_FIELD_CASES)
def test_control_bad_field(kind, path, check):
    """Each value of BAD[check] in the field is refused (type, range, size, form), the message naming the field."""
    body, allowed = BODIES[kind]
    for value in BAD[check]:
        assert_frame_error(mesh.read_control, control(kind, mutate(body, path, value)), allowed,
                           field=f"{kind.decode()}.{path}", case=value)


STATS = {"clients": 12}
BAD_STATS = [
    ("x", "HB.stats"), ([], "HB.stats"), (None, "HB.stats"), (1, "HB.stats"), (True, "HB.stats"),
    ({"Clients": 1}, "HB.stats"), ({"1x": 1}, "HB.stats"), ({"": 1}, "HB.stats"), ({"a-b": 1}, "HB.stats"),
    ({"a b": 1}, "HB.stats"), ({"é": 1}, "HB.stats"), ({"_a": 1}, "HB.stats"), ({"a" * 65: 1}, "HB.stats"),
    ({"a\n": 1}, "HB.stats"),
    ({f"f{index}": 0 for index in range(mesh.MAX_FIGURES + 1)}, "HB.stats"),
    ({"load": "1"}, "HB.stats.load"), ({"load": True}, "HB.stats.load"), ({"load": None}, "HB.stats.load"),
    ({"load": NAN}, "HB.stats.load"), ({"load": INF}, "HB.stats.load"), ({"load": -INF}, "HB.stats.load"),
    ({"load": -1}, "HB.stats.load"), ({"load": -0.001}, "HB.stats.load"), ({"load": []}, "HB.stats.load"),
    ({"load": {}}, "HB.stats.load"), ({"ok": 1, "load": -1}, "HB.stats.load"),
    ({"clients": 10 ** 19}, "HB.stats.clients"), ({"rss": 1.7e308}, "HB.stats.rss"),
    ({"id_ms": mesh.MAX_FIGURE + 1}, "HB.stats.id_ms"),
]


@pytest.mark.parametrize("stats, field", BAD_STATS, ids=[label(stats) for stats, _ in BAD_STATS])
def test_heartbeat_bad_stats(stats, field):
    """Heartbeat stats must be an object of at most MAX_FIGURES lower_case figures with finite numbers >= 0."""
    assert_frame_error(mesh.read_control, control(b"HB", {"node_id": 5, "stats": stats}), FROM_NODE, field=field)


@pytest.mark.parametrize("stats", [
    {}, {"a": 0}, {"a" * 64: 1.5}, {"x_1": mesh.MAX_FIGURE}, {"clients": 0, "load": 2.0 ** 53},
    {f"f{index}": index for index in range(mesh.MAX_FIGURES)},
], ids=label)
def test_heartbeat_good_stats(stats):
    """Stats at the edges of the rules are accepted as sent."""
    assert mesh.read_control(control(b"HB", {"node_id": 5, "stats": stats}), FROM_NODE) == Heartbeat(5, stats)


def test_node_list_bound():
    """A node list longer than MAX_NODE_ID entries is refused."""
    nodes = [dict(ENTRY_JSON, node_id=1 + index % MAX_NODE_ID) for index in range(MAX_NODE_ID + 1)]
    assert_frame_error(mesh.read_control, control(b"UPD", {"v": 1, "nodes": nodes}), FROM_COORDINATOR,
                       field="UPD.nodes")
    assert_frame_error(mesh.read_control, control(b"SNAP", {"v": 1, "nodes": nodes}), FROM_COORDINATOR,
                       field="SNAP.nodes")


@pytest.mark.parametrize("mesh_point", [
    "tcp://10.0.0.5:6800", "tcp://localhost:1", "tcp://node-1.dc-2.example.org:65535", "tcp://[::1]:6800",
    "tcp://[fe80::1:2]:6800", "tcp://[::ffff:10.0.0.1]:6800", "tcp://H0ST:6800",
])
def test_node_entry_good_mesh_point(mesh_point):
    """tcp://HOST:PORT (host name, IPv4 or bracketed IPv6) is a node entry's mesh point."""
    got = mesh.read_control(control(b"SNAP", {"v": 1, "nodes": [dict(ENTRY_JSON, mesh_point=mesh_point)]}),
                            FROM_COORDINATOR)
    assert got.nodes[0].mesh_point == mesh_point


REQUIRED_CONTROL = [
    (b"REG", "host"), (b"REG", "pid"), (b"REG", "api_server"), (b"REG", "mesh_point"),
    (b"HB", "node_id"), (b"SYNC", "node_id"), (b"BYE", "node_id"),
    (b"WELCOME", "node_id"), (b"WELCOME", "snapshot"), (b"WELCOME", "snapshot.v"), (b"WELCOME", "snapshot.nodes"),
    (b"UPD", "v"), (b"SNAP", "v"), (b"SNAP", "nodes"),
    (b"EXIT", "host"), (b"EXIT", "pid"), (b"EXIT", "started_at"), (b"EXIT", "exited_at"), (b"EXIT", "code"),
] + [(kind, f"{prefix}.{key}") for kind, prefix in [(b"WELCOME", "snapshot.nodes[0]"), (b"UPD", "nodes[0]"),
                                                    (b"SNAP", "nodes[0]")]
     for key in ("node_id", "host", "pid", "api_server", "mesh_point")]


@pytest.mark.parametrize("kind, path", REQUIRED_CONTROL, ids=[f"{k.decode()}.{p}" for k, p in REQUIRED_CONTROL])
def test_control_missing_required_field(kind, path):
    """A control message without one of its required fields is refused, naming the field."""
    body, allowed = BODIES[kind]
    error = assert_frame_error(mesh.read_control, control(kind, mutate(body, path, DROP)), allowed,
                               field=f"{kind.decode()}.{path}")
    assert "required" in str(error)


OPTIONAL_CONTROL = [
    (b"REG", "node_id", 0), (b"REG", "started_at", 0), (b"REG", "state", NodeState()),
    (b"REG", "state.interest", ()), (b"REG", "state.consumers", ()), (b"REG", "state.clients", ()),
    (b"HB", "stats", {}),
    (b"ADV", "interest", ()), (b"ADV", "consumers", ()), (b"ADV", "opened", ()), (b"ADV", "closed", ()),
    (b"WELCOME", "not_before_ms", 0), (b"WELCOME", "snapshot.interest", ()), (b"WELCOME", "snapshot.consumers", ()),
    (b"WELCOME", "snapshot.nodes[0].clients", 0), (b"WELCOME", "snapshot.nodes[0].started_at", 0),
    (b"UPD", "nodes", None), (b"UPD", "dead", ()), (b"UPD", "interest", ()), (b"UPD", "consumers", ()),
    (b"UPD", "nodes[0].clients", 0), (b"UPD", "nodes[0].started_at", 0),
    (b"SNAP", "interest", ()), (b"SNAP", "consumers", ()),
    (b"SNAP", "nodes[0].clients", 0), (b"SNAP", "nodes[0].started_at", 0),
    (b"REFUSED", "reason", ""), (b"REFUSED", "retry", False),
]


@pytest.mark.parametrize("kind, path, default", OPTIONAL_CONTROL,
                         ids=[f"{k.decode()}.{p}" for k, p, _ in OPTIONAL_CONTROL])
def test_control_absent_optional_field(kind, path, default):
    """An absent optional field takes its default."""
    body, allowed = BODIES[kind]
    got = pick(mesh.read_control(control(kind, mutate(body, path, DROP)), allowed), path)
    same(got, default)


@pytest.mark.parametrize("kind, body, expected", [
    (b"REG", {"host": "h", "pid": 1, "api_server": "a", "mesh_point": "m"},
     Register(0, "h", 1, "a", "m", 0, NodeState())),
    (b"HB", {"node_id": 3}, Heartbeat(3, {})),
    (b"ADV", {}, Advert()),
    (b"SYNC", {"node_id": 3}, Sync(3)),
    (b"BYE", {"node_id": 3}, Bye(3)),
    (b"WELCOME", {"node_id": 3, "snapshot": {"v": 0, "nodes": []}}, Welcome(3, 0, Snapshot(0, []))),
    (b"UPD", {"v": 1}, Update(1)),
    (b"UPD", {"v": 1, "nodes": None}, Update(1)),
    (b"SNAP", {"v": 0, "nodes": [{"node_id": 1, "host": "h", "pid": 0, "api_server": "a", "mesh_point": "tcp://h:1"}]},
     Snapshot(0, [NodeEntry(1, "h", 0, "a", "tcp://h:1", 0, 0)])),
    (b"REREG", {}, Reregister()),
    (b"REFUSED", {}, Refused("", False)),
    (b"EXIT", {"host": "h", "pid": 1, "started_at": 0, "exited_at": 0, "code": 0}, Exited("h", 1, 0, 0, 0)),
], ids=lambda value: label(value)[:16])
def test_control_minimal(kind, body, expected):
    """A control message with only its required fields reads with every default filled in."""
    same(mesh.read_control(control(kind, body), side(expected)), expected)


EXTRA_AT = [(b"REG", ""), (b"REG", "state"), (b"HB", ""), (b"ADV", ""), (b"SYNC", ""), (b"BYE", ""),
            (b"WELCOME", ""), (b"WELCOME", "snapshot"), (b"WELCOME", "snapshot.nodes[0]"),
            (b"UPD", ""), (b"UPD", "nodes[0]"), (b"SNAP", ""), (b"SNAP", "nodes[0]"), (b"REREG", ""), (b"REFUSED", ""),
            (b"EXIT", "")]


EXTRAS = [None, 1, "x", [1, "two"], {"nested": {"deep": [NAN]}}, "\x00 not checked"]


@pytest.mark.parametrize("kind, path", EXTRA_AT, ids=[f"{k.decode()}.{p}" for k, p in EXTRA_AT])
def test_control_unknown_keys_ignored(kind, path):
    """Keys a newer version may add, at the top or in a nested object, are ignored whatever they hold."""
    body, allowed = BODIES[kind]
    expected = mesh.read_control(control(kind, body), allowed)
    for extra in EXTRAS:
        same(mesh.read_control(control(kind, mutate(body, join(path, "x_future"), extra)), allowed), expected)


@pytest.mark.parametrize("started_at, exited_at", [(2.5, 2.0), (1e12, 0), (1.0000001, 1.0)])
def test_exit_notice_ends_before_it_starts(started_at, exited_at):
    """An exit notice whose process exited before it started is refused, naming exited_at."""
    body = {"host": "h", "pid": 7, "started_at": started_at, "exited_at": exited_at, "code": -9}
    error = assert_frame_error(mesh.read_control, control(b"EXIT", body), FROM_SUPERVISOR, field="EXIT.exited_at")
    assert "before started_at" in str(error)


# --- control messages: bad framing -----------------------------------------------------------

@pytest.mark.parametrize("frames", [
    [], [b"SYNC"], [b"SYNC", b'{"node_id": 1}', b""], [b"x", b"SYNC", b'{"node_id": 1}'],
], ids=label)
def test_control_frame_count(frames):
    """A control message is exactly two frames (the routing id already removed)."""
    error = assert_frame_error(mesh.read_control, frames, FROM_NODE)
    assert f"{len(frames)} frames" in str(error)


@pytest.mark.parametrize("kind", [b"", b"sync", b"Sync", b"SYNC ", b" SYNC", b"SYNC\x00", b"HELLO", b"\x01",
                                  b"\xff" * 40, b"REG\n"], ids=label)
def test_control_unknown_kind(kind):
    """A kind that is not one of the eleven documented bytes strings is refused, from any side."""
    for allowed in SIDES:
        error = assert_frame_error(mesh.read_control, [kind, b'{"node_id": 1}'], allowed)
        assert "unexpected control kind" in str(error)


NOT_AN_OBJECT = [b"", b" ", b"{", b"}", b"[]", b"null", b"1", b'"x"', b"true", b"{} x", b"{'node_id': 1}",
                 b'{"node_id": 1,}', b"\xff", b"\xef\xbb\xbf{}", b"{}\x00", b"{}{}"]


@pytest.mark.parametrize("kind", list(BODIES))
def test_control_body_not_an_object(kind):
    """A control body that is not one JSON object (bad JSON, another JSON value) is refused, naming the kind."""
    allowed = BODIES[kind][1]
    for raw in NOT_AN_OBJECT:
        assert_frame_error(mesh.read_control, [kind, raw], allowed, field=kind.decode(), case=raw)


@pytest.mark.parametrize("kind", list(BODIES))
def test_control_truncated(kind):
    """Every proper prefix of a control body is refused."""
    body, allowed = BODIES[kind]
    raw = mesh.encode_control(mesh.read_control(control(kind, body), allowed))[1]
    for size in range(len(raw)):
        assert_frame_error(mesh.read_control, [kind, raw[:size]], allowed)


@pytest.mark.parametrize("kind, raw, field", [
    (b"REG", b'{"host": "\xff", "pid": 1, "api_server": "a", "mesh_point": "m"}', "REG"),
    (b"REG", b'{"host": "\xed\xa0\x80", "pid": 1, "api_server": "a", "mesh_point": "m"}', "REG.host"),
    (b"REFUSED", b'{"reason": "\xc0\x80"}', "REFUSED"),
    (b"REFUSED", b'{"reason": "\xed\xbf\xbf"}', "REFUSED.reason"),
    (b"ADV", b'{"interest": [["\xed\xa0\x80", 1, 1]]}', "ADV.interest[0][0]"),
    (b"ADV", b'{"interest": [["\xe2\x82", 1, 1]]}', "ADV"),
])
def test_control_invalid_utf8(kind, raw, field):
    """Text that is not valid UTF-8 (bad bytes, overlong forms, encoded surrogates) is refused."""
    allowed = FROM_NODE if kind in (b"REG", b"ADV") else FROM_COORDINATOR
    assert_frame_error(mesh.read_control, [kind, raw], allowed, field=field)


# --- mesh requests: round trips --------------------------------------------------------------

@pytest.mark.parametrize("frame", WS_FRAMES)
def test_send_round_trip(frame):
    """A Send of any client id and any text or binary frame reads back equal."""
    for client_id in (0, 1, 1463786910324359168, MAX_ID):
        outbound = mesh.send_request(client_id, frame)
        assert outbound.kind is Send
        got = mesh.read_request(mesh.frame_request(outbound, 11))
        same(got, Request(11, Send(client_id, frame)))
        assert type(got.message.frame) is bytes


@pytest.mark.parametrize("frame", WS_FRAMES)
def test_publish_round_trip(frame):
    """A Publish to unicode and edge-size channel names with any frame reads back equal."""
    for channels in (["news"], ["新闻/头条", "émoji-🎉", NAME_255], ["a", "a"],
                     [f"room:{index}" for index in range(100)]):
        outbound = mesh.publish_request(channels, frame)
        assert outbound.kind is Publish
        same(mesh.read_request(mesh.frame_request(outbound, 12)), Request(12, Publish(channels, frame)))


CALLS = [
    ("set_context_value", ["k", "v"]),
    ("set_context_value", ["ключ", {"nested": [1, 2.5, None, True], "é": "ü"}]),
    ("set_context_value", ["k", None]),
    ("set_context_value", ["k", MAX_ID]),
    ("set_context", [{}]),
    ("set_context", [{"user": "u-1", "roles": ["a", "b"], "n": 0}]),
    ("subscribe", ["news"]),
    ("subscribe", ["新闻", "émoji-🎉", NAME_255]),
    ("unsubscribe", ["news"]),
    ("unsubscribe", ["a", "b"]),
    ("close", []),
    ("close", [1000]),
    ("close", [1003]),
    ("close", [1007]),
    ("close", [1011]),
    ("close", [3000, "bye"]),
    ("close", [4999, "é" * 61 + "a"]),
    ("get_context", []),
]


def test_calls_cover_every_function():
    """The Call table holds every conn.call function."""
    assert {function for function, _ in CALLS} == set(protocol.CALL_FUNCTIONS)


@pytest.mark.parametrize("function, args", CALLS, ids=label)
def test_call_round_trip(function, args):
    """A Call of every conn.call function with valid args reads back equal (no body)."""
    for client_id in (0, MAX_ID):
        outbound = mesh.call_request(client_id, function, args)
        assert outbound.kind is Call and outbound.body == b""
        same(mesh.read_request(mesh.frame_request(outbound, 13)), Request(13, Call(client_id, function, args)))


@pytest.mark.parametrize("function, args, expected", [
    ("subscribe", ["a", "b", "a"], ["a", "b"]),
    ("unsubscribe", ["x", "x"], ["x"]),
])
def test_call_args_normalised(function, args, expected):
    """Call args are read as parse_call_args reads them: repeated channels are folded."""
    got = mesh.read_request(mesh.frame_request(mesh.call_request(5, function, args), 1))
    assert got.message.args == expected


QUEUE_EVENTS = [
    protocol.queue_event(1, 0, "jobs", "text"),
    protocol.queue_event(MAX_NODE_ID, MAX_ID, "émoji-🎉", {"k": "é", "n": [1, 2]}),
    protocol.queue_event(7, 42, "jobs", [1, "two", None]),
    protocol.queue_event(7, 42, "jobs", None),
    protocol.queue_event(7, 42, NAME_255, 0),
    protocol.queue_event(7, 42, "jobs", "x" * 70000),
]


@pytest.mark.parametrize("event", QUEUE_EVENTS, ids=label)
def test_queue_event_round_trip(event):
    """A QueueEvent carrying a queue.pop event built by protocol.queue_event reads back equal."""
    for topic, consumer_id in (("jobs", 1), ("新闻", BIG), (NAME_255, 12345)):
        outbound = mesh.queue_event_request(topic, consumer_id, event)
        assert outbound.kind is QueueEvent
        got = mesh.read_request(mesh.frame_request(outbound, 14))
        same(got, Request(14, QueueEvent(topic, consumer_id, event)))
        assert type(got.message.event) is bytes


@pytest.mark.parametrize("body", [
    b'{"e":"queue.pop","p":{"n":1,"c":"2","t":"jobs","d":"\\ud800"},"i":null}',
    b'{"e":"queue.pop","p":{"n":1,"c":"2","t":"jobs","d":"\\uDC00x"},"i":null}',
    b'{"e":"queue.pop","p":{"n":1,"c":"2","t":"jobs","d":NaN},"i":null}',
    b'{"e":"queue.pop","p":{"n":1,"c":"2","t":"jobs","d":[-Infinity]},"i":null}',
    b'{"e":"queue.pop","p":{"n":1,"c":"2","t":"jobs","d":1e999},"i":null}',
    b'{"e":"queue.pop","p":{"n":1,"c":"2","t":"jobs","d":' + b"9" * 400 + b'.5},"i":null}',
], ids=["lone-high", "lone-low", "nan", "infinity", "overflow-exponent", "overflow-digits"])
def test_queue_event_that_could_not_be_written_again_is_refused(body):
    """A peer's event holding what JSON cannot carry to a consumer (a lone surrogate, NaN, Infinity, a number
    beyond a double) is refused, naming the body."""
    outbound = mesh.Outbound(QueueEvent, b'{"t":"jobs","k":9}', body)
    with pytest.raises(mesh.FrameError, match="body"):
        mesh.read_request(mesh.frame_request(outbound, 3))


@pytest.mark.parametrize("data", ["\U0001f389 party", 1e300, -0.5e-300, 10 ** 40, "E000 e123"])
def test_queue_event_with_pairs_big_numbers_and_look_alikes_reads_back(data):
    """What only looks like those (a surrogate pair, large but finite numbers, 'e123' in text) is taken."""
    event = protocol.queue_event(1, 2, "jobs", data)
    got = mesh.read_request(mesh.frame_request(mesh.queue_event_request("jobs", 9, event), 3))
    assert got.message.event == event


def test_queue_event_with_an_escaped_surrogate_pair_reads_back():
    body = b'{"e":"queue.pop","p":{"n":1,"c":"2","t":"jobs","d":"\\ud83c\\udf89"},"i":null}'
    got = mesh.read_request(mesh.frame_request(mesh.Outbound(QueueEvent, b'{"t":"jobs","k":9}', body), 3))
    assert got.message.event == body


@pytest.mark.parametrize("origin, interest, consumers", [
    (1, [], []),
    (MAX_NODE_ID, [["news", 2, 7]], []),
    (7, [], [["jobs", 3, 1, 9]]),
    (7, [["新闻", 0, BIG], [NAME_255, BIG, 1]], [["émoji-🎉", BIG, 0, 1], ["jobs", 1, 1, 2]]),
], ids=label)
def test_peer_advert_round_trip(origin, interest, consumers):
    """A PeerAdvert reads back equal; empty changes read as the () defaults."""
    outbound = mesh.advert_request(origin, interest, consumers)
    assert outbound.kind is PeerAdvert and outbound.body == b""
    got = mesh.read_request(mesh.frame_request(outbound, 15)).message
    same(got, PeerAdvert(origin, interest or (), consumers or ()))


REQUESTS = [
    (mesh.send_request(MAX_ID, TEXT_FRAME), Send(MAX_ID, TEXT_FRAME)),
    (mesh.publish_request(["news", "新闻"], TEXT_FRAME), Publish(["news", "新闻"], TEXT_FRAME)),
    (mesh.call_request(5, "close", [1000, "bye"]), Call(5, "close", [1000, "bye"])),
    (mesh.queue_event_request("jobs", 9, EVENT), QueueEvent("jobs", 9, EVENT)),
    (mesh.advert_request(7, [["news", 1, 2]]), PeerAdvert(7, [["news", 1, 2]])),
    (mesh.presence_request("room:1", True, 100000), Presence("room:1", True, 100000)),
    (mesh.queue_delivery_request("jobs", ACK_CONSUMER | 9, 7, BIG, 3, True, EVENT),
     QueueDelivery("jobs", ACK_CONSUMER | 9, 7, BIG, 3, True, EVENT)),
    (mesh.queue_acks_request(7, BIG, [1, BIG], [(2, 1)], True), QueueAcks(7, BIG, [1, BIG], [[2, 1]], True)),
]


@pytest.mark.parametrize("outbound, message", REQUESTS, ids=lambda value: type(value).__name__)
def test_request_id_round_trip(outbound, message):
    """Every request id (0: no reply wanted, up to 2**64-1) survives the framing."""
    for request_id in (0, 1, 0x0102030405060708, 2 ** 64 - 1):
        same(mesh.read_request(mesh.frame_request(outbound, request_id)), Request(request_id, message))


@pytest.mark.parametrize("outbound, message", REQUESTS, ids=lambda value: type(value).__name__)
def test_request_bytearray_frame(outbound, message):
    """A request frame given as bytearray reads the same as bytes."""
    frames = [bytearray(frame) for frame in mesh.frame_request(outbound, 9)]
    got = mesh.read_request(frames)
    same(got, Request(9, message))
    for value in got.message:
        assert not isinstance(value, bytearray)


# --- mesh requests: stable wire values -------------------------------------------------------

REQUEST_WIRE = [
    (mesh.send_request(MAX_ID, TEXT_FRAME), 1, {"c": MAX_ID}, TEXT_FRAME, Send(MAX_ID, TEXT_FRAME)),
    (mesh.publish_request(["news", "新闻"], TEXT_FRAME), 2, {"ch": ["news", "新闻"]}, TEXT_FRAME,
     Publish(["news", "新闻"], TEXT_FRAME)),
    (mesh.call_request(5, "close", [1000, "bye"]), 3, {"c": 5, "f": "close", "a": [1000, "bye"]}, b"",
     Call(5, "close", [1000, "bye"])),
    (mesh.queue_event_request("jobs", 9, EVENT), 4, {"t": "jobs", "k": 9}, EVENT, QueueEvent("jobs", 9, EVENT)),
    (mesh.advert_request(7, [["news", 1, 2]], [["jobs", 9, 1, 3]]), 5,
     {"o": 7, "interest": [["news", 1, 2]], "consumers": [["jobs", 9, 1, 3]]}, b"",
     PeerAdvert(7, [["news", 1, 2]], [["jobs", 9, 1, 3]])),
    (mesh.advert_request(7), 5, {"o": 7}, b"", PeerAdvert(7)),
    (mesh.presence_request("room", False, 0), 8, {"ch": "room", "x": False, "l": 0}, b"", Presence("room", False, 0)),
    (mesh.queue_delivery_request("jobs", ACK_CONSUMER | 9, 7, 3, 1, False, EVENT), 9,
     {"t": "jobs", "k": ACK_CONSUMER | 9, "o": 7, "q": 3, "a": 1}, EVENT,
     QueueDelivery("jobs", ACK_CONSUMER | 9, 7, 3, 1, False, EVENT)),
    (mesh.queue_delivery_request("jobs", ACK_CONSUMER | 9, 7, 3, 2, True, EVENT), 9,
     {"t": "jobs", "k": ACK_CONSUMER | 9, "o": 7, "q": 3, "a": 2, "r": True}, EVENT,
     QueueDelivery("jobs", ACK_CONSUMER | 9, 7, 3, 2, True, EVENT)),
    (mesh.queue_acks_request(7, ACK_CONSUMER | 9, [3, 4], [(5, 1)], True), 10,
     {"n": 7, "k": ACK_CONSUMER | 9, "acked": [3, 4], "released": [[5, 1]], "room": True}, b"",
     QueueAcks(7, ACK_CONSUMER | 9, [3, 4], [[5, 1]], True)),
    (mesh.queue_acks_request(7, ACK_CONSUMER | 9), 10, {"n": 7, "k": ACK_CONSUMER | 9}, b"",
     QueueAcks(7, ACK_CONSUMER | 9)),
]
WIRE_IDS = ["SEND", "PUB", "CALL", "QEV", "ADV", "ADV-empty", "PRES", "QAEV", "QAEV-resume", "QACK", "QACK-empty"]


@pytest.mark.parametrize("outbound, code, header, body, message", REQUEST_WIRE, ids=WIRE_IDS)
def test_request_encodes_to_wire(outbound, code, header, body, message):
    """A request frame is code | 8-byte request id | 4-byte header length | header JSON | body."""
    frames = mesh.frame_request(outbound, 0x0102030405060708)
    assert len(frames) == 1
    frame = frames[0]
    assert frame[0] == code
    assert frame[1:9] == b"\x01\x02\x03\x04\x05\x06\x07\x08"
    size = int.from_bytes(frame[9:13], "big")
    assert json.loads(frame[13:13 + size]) == header
    assert frame[13 + size:] == body


@pytest.mark.parametrize("outbound, code, header, body, message", REQUEST_WIRE, ids=WIRE_IDS)
def test_request_reads_from_wire(outbound, code, header, body, message):
    """A hand-laid request frame with the documented code and keys reads as its class."""
    same(mesh.read_request(request(code, header, body, request_id=99)), Request(99, message))


@pytest.mark.parametrize("kind, name", [(Send, "SEND"), (Publish, "PUB"), (Call, "CALL"), (QueueEvent, "QEV"),
                                        (PeerAdvert, "ADV"), (QueueDelivery, "QAEV"), (QueueAcks, "QACK")])
def test_kind_name(kind, name):
    """Each request class has its documented wire name."""
    assert mesh.kind_name(kind) == name


def test_request_exact_bytes():
    """A Send frame is exactly these bytes."""
    frame = mesh.frame_request(mesh.send_request(5, b"\x81\x02hi"), 9)
    assert frame == [b"\x01" + b"\x00" * 7 + b"\x09" + b"\x00\x00\x00\x07" + b'{"c":5}' + b"\x81\x02hi"]


# --- mesh requests: bad headers --------------------------------------------------------------

NAMES = {1: "SEND", 2: "PUB", 3: "CALL", 4: "QEV", 5: "ADV", 8: "PRES", 9: "QAEV", 10: "QACK"}
REQUEST_BASES = {
    1: ({"c": 5}, TEXT_FRAME),
    2: ({"ch": ["news", "jobs"]}, TEXT_FRAME),
    3: ({"c": 5, "f": "set_context_value", "a": ["k", "v"]}, b""),
    4: ({"t": "jobs", "k": 9}, EVENT),
    5: ({"o": 7, "interest": [["news", 2, 7]], "consumers": [["jobs", 3, 1, 9]]}, b""),
    8: ({"ch": "room", "x": True, "l": 10}, b""),
    9: ({"t": "jobs", "k": ACK_CONSUMER | 9, "o": 7, "q": 3, "a": 1, "r": True}, EVENT),
    10: ({"n": 7, "k": ACK_CONSUMER | 9, "acked": [3], "released": [[4, 2]], "room": True}, b""),
}
BAD["channels"] = BAD["list"] + [[]]
BAD["function"] = ["nope", "", "Close", "close ", "get_context\x00", "CALL", None, 1, True, [], {}]
REQUEST_FIELDS = {
    1: [("c", "client_id")],
    2: [("ch", "channels"), ("ch[0]", "name"), ("ch[1]", "name")],
    3: [("c", "client_id"), ("f", "function"), ("a", "list")],
    4: [("t", "name"), ("k", "consumer_id")],
    5: [("o", "node_id")] + rows("interest", INTEREST) + rows("consumers", CONSUMERS),
    8: [("ch", "name"), ("x", "flag"), ("l", "limit")],
    9: [("t", "name"), ("k", "ack_consumer_id"), ("o", "node_id"), ("q", "seq"), ("a", "seq"), ("r", "flag")],
    10: [("n", "node_id"), ("k", "ack_consumer_id"), ("acked", "list"), ("acked[0]", "seq"), ("released", "list"),
         ("released[0]", "row2"), ("released[0][0]", "seq"), ("released[0][1]", "seq"), ("room", "flag")],
}
BAD["limit"] = WRONG_INT + [-1, protocol.MAX_PRESENCE_LIMIT + 1]


def test_request_bases_are_valid():
    """Every base header of the bad-header tables reads as it stands, and each of its keys has a check."""
    for code, (header, body) in REQUEST_BASES.items():
        mesh.read_request(request(code, header, body))
        listed = {path for path, _ in REQUEST_FIELDS[code]} | ({"a[0]", "a[1]"} if code == 3 else set())
        assert set(json_paths(header)) == listed, code


REQUEST_FIELD_CASES = [
    pytest.param(code, path, check, id=f"{NAMES[code]}.{path}")
    for code, fields in REQUEST_FIELDS.items() for path, check in fields
]


@pytest.mark.parametrize("code, path, check", REQUEST_FIELD_CASES)
def test_request_bad_field(code, path, check):
    """Each value of BAD[check] in the header field is refused (type, range, name form), the message naming it."""
    header, body = REQUEST_BASES[code]
    for value in BAD[check]:
        assert_frame_error(mesh.read_request, request(code, mutate(header, path, value), body),
                           field=f"{NAMES[code]}.{path}", case=value)


REQUIRED_HEADER = [(1, "c"), (2, "ch"), (3, "c"), (3, "f"), (3, "a"), (4, "t"), (4, "k"), (5, "o"), (8, "ch"), (8, "x"),
                   (8, "l"), (9, "t"), (9, "k"), (9, "o"), (9, "q"), (9, "a"), (10, "n"), (10, "k")]


@pytest.mark.parametrize("code, key", REQUIRED_HEADER, ids=[f"{NAMES[c]}.{k}" for c, k in REQUIRED_HEADER])
def test_request_missing_header_key(code, key):
    """A request header without one of its required keys is refused, naming the key."""
    header, body = REQUEST_BASES[code]
    assert_frame_error(mesh.read_request, request(code, mutate(header, key, DROP), body), field=f"{NAMES[code]}.{key}")


@pytest.mark.parametrize("key, default", [("r", False), ("acked", ()), ("released", ()), ("room", False)])
def test_queue_delivery_and_acks_absent_optional_keys(key, default):
    """A QAEV without `r`, a QACK without `acked`, `released` or `room` takes the default."""
    code = 9 if key == "r" else 10
    header, body = REQUEST_BASES[code]
    got = mesh.read_request(request(code, mutate(header, key, DROP), body)).message
    same(getattr(got, {"r": "resume"}.get(key, key)), default)


@pytest.mark.parametrize("key, most", [("acked", protocol.MAX_ACK_IDS), ("released", protocol.MAX_WINDOW)])
def test_queue_acks_lists_are_bounded(key, most):
    """A QACK carries at most a window's worth of keys in each list."""
    header, body = REQUEST_BASES[10]
    row = 3 if key == "acked" else [3, 1]
    assert len(getattr(mesh.read_request(request(10, dict(header, **{key: [row] * most}), body)).message, key)) == most
    assert_frame_error(mesh.read_request, request(10, dict(header, **{key: [row] * (most + 1)}), body),
                       field=f"QACK.{key}")


def test_queue_acks_has_no_body():
    """A QACK with a body is refused."""
    assert_frame_error(mesh.read_request, request(10, REQUEST_BASES[10][0], b"x"), field="QACK body")


@pytest.mark.parametrize("key, default", [("interest", ()), ("consumers", ())])
def test_peer_advert_absent_lists(key, default):
    """A PeerAdvert header without interest or consumers takes the () default."""
    header, body = REQUEST_BASES[5]
    got = mesh.read_request(request(5, mutate(header, key, DROP), body)).message
    same(getattr(got, key), default)


@pytest.mark.parametrize("code", list(NAMES), ids=NAMES.get)
def test_request_unknown_header_keys_ignored(code):
    """Header keys a newer version may add are ignored whatever they hold."""
    header, body = REQUEST_BASES[code]
    expected = mesh.read_request(request(code, header, body))
    for extra in EXTRAS:
        same(mesh.read_request(request(code, dict(header, x_future=extra), body)), expected)


BAD_CALL_ARGS = [
    ("set_context_value", []), ("set_context_value", ["k"]), ("set_context_value", ["k", 1, 2]),
    ("set_context_value", ["", 1]), ("set_context_value", [1, 2]), ("set_context_value", [None, 2]),
    ("set_context", []), ("set_context", [[]]), ("set_context", ["x"]), ("set_context", [None]),
    ("set_context", [{}, {}]),
    ("subscribe", []), ("subscribe", [""]), ("subscribe", ["a b"]), ("subscribe", [1]), ("subscribe", [["a"]]),
    ("subscribe", ["a" * 256]), ("unsubscribe", []), ("unsubscribe", ["a\nb"]),
    ("close", [999]), ("close", [1004]), ("close", [1005]), ("close", [1006]), ("close", [1012]), ("close", [2999]),
    ("close", [5000]), ("close", [True]), ("close", ["1000"]), ("close", [1000.0]), ("close", [None]),
    ("close", [1000, 5]), ("close", [1000, None]), ("close", [1000, "x" * 124]), ("close", [1000, "é" * 62]),
    ("close", [1000, "r", 3]),
    ("get_context", [1]), ("get_context", [None]),
]


@pytest.mark.parametrize("function, args", BAD_CALL_ARGS, ids=label)
def test_call_bad_args(function, args):
    """conn.call args that parse_call_args refuses are refused, naming CALL.a."""
    header = {"c": 5, "f": function, "a": args}
    assert_frame_error(mesh.read_request, request(3, header), field="CALL.a")


# --- mesh requests: bad bodies ---------------------------------------------------------------

def ws_header(first: int, length_bytes: bytes) -> bytes:
    return bytes((first,)) + length_bytes


BAD_WS = [
    (b"", "empty"),
    (b"\x81", "one byte"),
    (b"\x01\x02hi", "text not final"),
    (b"\x02\x02hi", "binary not final"),
    (b"\x00\x02hi", "continuation not final"),
    (b"\x80\x02hi", "continuation final"),
    (b"\x88\x02\x03\xe8", "close"),
    (b"\x89\x00", "ping"),
    (b"\x8a\x00", "pong"),
    (b"\x83\x00", "reserved opcode 3"),
    (b"\x8b\x00", "reserved opcode b"),
    (b"\x91\x02hi", "rsv1"),
    (b"\xa1\x02hi", "rsv2"),
    (b"\xc1\x02hi", "rsv1 and rsv2"),
    (b"\xc2\x02hi", "binary rsv1"),
    (b"\x81\x82\x01\x02\x03\x04\x69\x6b", "masked text"),
    (b"\x82\x80\x00\x00\x00\x00", "masked empty binary"),
    (b"\x81\xfe\x00\x7e" + b"\x00" * 4 + b"a" * 126, "masked 16-bit"),
    (b"\x82\x80" + b"\x00" * 128, "masked, sized to fit if the mask bit were length"),
    (b"\x81\x05abc", "shorter than its length"),
    (b"\x81\x02abc", "longer than its length"),
    (b"\x81\x00a", "empty but data follows"),
    (b"\x82\x7d" + b"x" * 124, "125 says, 124 given"),
    (b"\x82\x7e\x00", "16-bit length truncated"),
    (b"\x82\x7e", "16-bit length absent"),
    (b"\x82\x7e\x00\xc8" + b"x" * 199, "16-bit length short"),
    (b"\x82\x7e\x00\xc8" + b"x" * 201, "16-bit length long"),
    (b"\x82\x7f\x00\x00\x00", "64-bit length truncated"),
    (b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00" + b"x" * 65535, "64-bit length short"),
    (b"\x82\x7f\x80" + b"\x00" * 7, "64-bit length most significant bit"),
    (b"\x81\x7e\x00\x05hello", "non-minimal 16-bit for 5"),
    (b"\x81\x7e\x00\x7d" + b"a" * 125, "non-minimal 16-bit for 125"),
    (b"\x82\x7f" + (5).to_bytes(8, "big") + b"hello", "non-minimal 64-bit for 5"),
    (b"\x82\x7f" + (126).to_bytes(8, "big") + b"x" * 126, "non-minimal 64-bit for 126"),
    (b"\x82\x7f" + (65535).to_bytes(8, "big") + b"x" * 65535, "non-minimal 64-bit for 65535"),
    (b"\x81\x01\xff", "text byte ff"),
    (b"\x81\x02\xc3\x28", "text bad continuation"),
    (b"\x81\x01\xc3", "text truncated sequence"),
    (b"\x81\x02\xc0\x80", "text overlong"),
    (b"\x81\x03\xed\xa0\x80", "text encoded surrogate"),
    (b"\x81\x04\xf4\x90\x80\x80", "text above U+10FFFF"),
    (protocol.encode_ws_frame(b"\xff" * 126), "text 16-bit length not UTF-8"),
    (protocol.encode_ws_frame(b"a" * 65535 + b"\x80"), "text 64-bit length not UTF-8"),
]


@pytest.mark.parametrize("body, why", BAD_WS, ids=[why for _, why in BAD_WS])
def test_bad_websocket_body(body, why):
    """SEND and PUB bodies must be one unmasked final text or binary frame of exact, minimal length; text UTF-8."""
    for code in (1, 2):
        header = REQUEST_BASES[code][0]
        assert_frame_error(mesh.read_request, request(code, header, body), field=f"{NAMES[code]} body", case=code)


@pytest.mark.parametrize("body", [
    protocol.encode_ws_frame(b"\xff\x00\xc3", binary=True),
    protocol.encode_ws_frame(b"\xed\xa0\x80" * 100, binary=True),
    b"\x82\x7e\x00\x7e" + b"x" * 126,
    b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00" + b"a" * 65536,
], ids=label)
def test_good_websocket_body(body):
    """Binary frames carry any bytes; a hand-laid minimal 16- or 64-bit length is accepted."""
    assert mesh.read_request(request(1, {"c": 5}, body)).message == Send(5, body)


BAD_QUEUE_EVENTS = [
    b"", b" ", b"{", b"null", b"[]", b"1", b'"queue.pop"', b"{}", b"\xff",
    b'{"e": "queue.push", "p": {}}', b'{"e": "Queue.pop", "p": {}}', b'{"e": null, "p": {}}',
    b'{"e": ["queue.pop"], "p": {}}', b'{"e": "queue.pop"}', b'{"e": "queue.pop", "p": null}',
    b'{"e": "queue.pop", "p": []}', b'{"e": "queue.pop", "p": "x"}', b'{"p": {}}',
    b'{"e": "queue.pop", "p": {}} x', b'{"e": "queue.pop", "p": {"d": "\xff"}}',
    b'{"e": "queue.pop", "p": {"d": "\xc0\x80"}}',
    protocol.encode_ws_frame(EVENT),
]


@pytest.mark.parametrize("body", BAD_QUEUE_EVENTS, ids=label)
def test_bad_queue_event_body(body):
    """A QEV (or QAEV) body must be the bare JSON of a queue.pop event (an object whose e is queue.pop and p an
    object)."""
    assert_frame_error(mesh.read_request, request(4, {"t": "jobs", "k": 9}, body), field="QEV body")
    assert_frame_error(mesh.read_request, request(9, REQUEST_BASES[9][0], body), field="QAEV body")


# --- mesh requests: bad framing --------------------------------------------------------------

SEND_FRAME = request(1, {"c": 5}, TEXT_FRAME)[0]


@pytest.mark.parametrize("frames, words", [
    ([], "0 frames"),
    ([SEND_FRAME, b""], "2 frames"),
    ([b"peer", SEND_FRAME], "2 frames"),
    ([b""], "truncated"),
    ([b"\x01"], "truncated"),
    ([SEND_FRAME[:12]], "truncated"),
    ([b"\x01" + b"\x00" * 8 + (100).to_bytes(4, "big") + b'{"c": 5}'], "header is truncated"),
    ([b"\x01" + b"\x00" * 8 + b"\xff\xff\xff\xff" + b"{}"], "header is truncated"),
    ([b"\x00" + SEND_FRAME[1:]], "unknown mesh kind code 0"),
    ([b"\x06" + SEND_FRAME[1:]], "unknown mesh kind code 6"),
    ([b"\x07" + SEND_FRAME[1:]], "unknown mesh kind code 7"),
    ([b"\xff" + SEND_FRAME[1:]], "unknown mesh kind code 255"),
    ([reply(7, b'{"s": true}')[0]], "unknown mesh kind code 6"),
], ids=label)
def test_request_bad_framing(frames, words):
    """A request is one frame of at least 13 bytes with a known code and a header that fits."""
    error = assert_frame_error(mesh.read_request, frames)
    assert words in str(error)


@pytest.mark.parametrize("code", list(NAMES), ids=NAMES.get)
def test_request_header_not_an_object(code):
    """A header that is JSON but not an object is refused, naming the kind."""
    for header in (b"[]", b"null", b"1", b'"c"', b"true", b"[{}]"):
        error = assert_frame_error(mesh.read_request, request(code, header, REQUEST_BASES[code][1]),
                                   field=NAMES[code], case=header)
        assert "JSON object" in str(error)


@pytest.mark.parametrize("code", list(NAMES), ids=NAMES.get)
def test_request_header_bad_json(code):
    """A header that is not JSON is refused, naming the kind."""
    for header in (b"", b" ", b"{", b"{'c': 5}", b'{"c": 5,}', b"\xff", b'{"c": 5} x', b"\xef\xbb\xbf{}",
                   b'{"c": "\xed"}', b"{}\x00", b"{}{}"):
        error = assert_frame_error(mesh.read_request, request(code, header, REQUEST_BASES[code][1]),
                                   field=NAMES[code], case=header)
        assert "bad JSON" in str(error)


@pytest.mark.parametrize("code", list(NAMES), ids=NAMES.get)
def test_request_truncated(code):
    """Every proper prefix of a valid request frame is refused."""
    header, body = REQUEST_BASES[code]
    frame = request(code, header, body)[0]
    for size in range(len(frame)):
        assert_frame_error(mesh.read_request, [frame[:size]])


@pytest.mark.parametrize("code", list(NAMES), ids=NAMES.get)
def test_request_bad_input_as_bytearray(code):
    """A bad request given as bytearray is refused like the same bytes."""
    header, body = REQUEST_BASES[code]
    frame = request(code, header, body)[0]
    assert_frame_error(mesh.read_request, [bytearray(frame[:-1])])
    assert_frame_error(mesh.read_request, [bytearray(b"\xff" + frame[1:])])


@pytest.mark.parametrize("header, field", [
    (b'{"ch": ["\xed\xa0\x80"]}', "PUB.ch[0]"),
    (b'{"ch": ["\\ud800"]}', "PUB.ch[0]"),
    (b'{"ch": ["a\\u0000"]}', "PUB.ch[0]"),
])
def test_publish_channel_not_unicode_text(header, field):
    """A channel name holding a surrogate or a control character is refused, however it is written."""
    assert_frame_error(mesh.read_request, request(2, header, TEXT_FRAME), field=field)


# --- replies ---------------------------------------------------------------------------------

RESULTS = [
    (Send, mesh.send_result(True), True),
    (Send, mesh.send_result(False), False),
    (Send, mesh.send_result(None), None),
    (Publish, mesh.publish_result(0, 0), Delivered(0, 0)),
    (Publish, mesh.publish_result(5, 2), Delivered(5, 2)),
    (Publish, mesh.publish_result(BIG, BIG), Delivered(BIG, BIG)),
    (Call, mesh.call_result({"s": True}), {"s": True}),
    (Call, mesh.call_result({"s": True, "d": {}}), {"s": True, "d": {}}),
    (Call, mesh.call_result({"s": True, "d": {"user": "é", "n": [1, 2.5], "id": MAX_ID}}),
     {"s": True, "d": {"user": "é", "n": [1, 2.5], "id": MAX_ID}}),
    (QueueEvent, mesh.queue_event_result(True), True),
    (QueueEvent, mesh.queue_event_result(False), False),
    (PeerAdvert, mesh.advert_result(), True),
    (QueueDelivery, mesh.queue_delivery_result(mesh.WRITTEN, 30.0), DeliveryOutcome("written", 30.0)),
    (QueueDelivery, mesh.queue_delivery_result(mesh.WRITTEN, 3600), DeliveryOutcome("written", 3600)),
    (QueueDelivery, mesh.queue_delivery_result(mesh.FULL), DeliveryOutcome("full")),
    (QueueDelivery, mesh.queue_delivery_result(mesh.GONE), DeliveryOutcome("gone")),
    (QueueAcks, mesh.queue_acks_result(), True),
    (Presence, mesh.presence_result(0, []), Present(0, [])),
    (Presence, mesh.presence_result(3, [[5], [MAX_ID, {"seat": "é", "n": [1]}]]),
     Present(3, [(5, None), (MAX_ID, {"seat": "é", "n": [1]})])),
]


@pytest.mark.parametrize("kind, result, expected", RESULTS, ids=lambda value: label(value)[:24])
def test_result_round_trip(kind, result, expected):
    """Each kind's result goes through frame_reply, read_reply and read_result unchanged."""
    for request_id in (1, 2 ** 64 - 1):
        frames = mesh.frame_reply(request_id, result)
        assert len(frames) == 1
        got_id, raw = mesh.read_reply(frames)
        assert got_id == request_id
        same(mesh.read_result(kind, raw), expected)


@pytest.mark.parametrize("kind, result, expected", RESULTS, ids=lambda value: label(value)[:24])
def test_result_bytearray_frame(kind, result, expected):
    """A reply frame given as bytearray reads the same as bytes."""
    got_id, raw = mesh.read_reply([bytearray(frame) for frame in mesh.frame_reply(3, result)])
    assert got_id == 3
    same(mesh.read_result(kind, raw), expected)


KINDS = (Send, Publish, Call, QueueEvent, PeerAdvert, QueueDelivery, QueueAcks)


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda code: code.name)
def test_failure_round_trip(code):
    """A failure of any error code reads back as Failure for a request of any kind."""
    for kind in KINDS:
        got_id, raw = mesh.read_reply(mesh.frame_reply(8, mesh.failure(code, "peer says no: ü")))
        got = mesh.read_result(kind, raw)
        assert got_id == 8
        same(got, Failure(code, "peer says no: ü"))
        assert got.code is code


@pytest.mark.parametrize("message, expected", [
    ("", ""),
    ("x" * 1000, "x" * 1000),
    ("x" * 1001, "x" * 1000),
    ("é" * 5000, "é" * 1000),
], ids=label)
def test_failure_message_length(message, expected):
    """A failure message is kept up to 1000 characters and cut beyond."""
    assert mesh.read_result(Send, mesh.failure(ErrorCode.SEND_FAILED, message)) == Failure(
        ErrorCode.SEND_FAILED, expected)


@pytest.mark.parametrize("result, body", [
    (mesh.send_result(True), {"s": True}),
    (mesh.send_result(False), {"s": False}),
    (mesh.send_result(None), {"s": None}),
    (mesh.publish_result(3, 1), {"s": 3, "f": 1}),
    (mesh.call_result({"s": True, "d": {"a": 1}}), {"r": {"s": True, "d": {"a": 1}}}),
    (mesh.queue_event_result(True), {"ok": True}),
    (mesh.queue_event_result(False), {"ok": False}),
    (mesh.advert_result(), {"ok": True}),
    (mesh.queue_delivery_result(mesh.WRITTEN, 1.5), {"s": "written", "to": 1.5}),
    (mesh.queue_delivery_result(mesh.FULL), {"s": "full"}),
    (mesh.queue_delivery_result(mesh.GONE), {"s": "gone"}),
    (mesh.queue_acks_result(), {"ok": True}),
    (mesh.failure(ErrorCode.SEND_FAILED, "gone"), {"e": 401, "m": "gone"}),
    (mesh.failure(ErrorCode.MESH_UNAVAILABLE, "busy"), {"e": 501, "m": "busy"}),
], ids=label)
def test_result_encodes_to_wire(result, body):
    """Each result builder writes the documented keys."""
    assert json.loads(result) == body


@pytest.mark.parametrize("kind, body, expected", [
    (Send, {"s": True}, True), (Send, {"s": None}, None),
    (Publish, {"s": 3, "f": 1}, Delivered(3, 1)),
    (Call, {"r": {"s": True, "d": {"a": 1}}}, {"s": True, "d": {"a": 1}}),
    (QueueEvent, {"ok": False}, False), (PeerAdvert, {"ok": True}, True),
    (Call, {"e": 301, "m": "not connected"}, Failure(ErrorCode.CALL_FAILED, "not connected")),
    (Send, {"s": True, "x_future": [1]}, True),
    (Publish, {"s": 3, "f": 1, "x_future": {}}, Delivered(3, 1)),
    (Call, {"e": 301, "m": "x", "x_future": 1}, Failure(ErrorCode.CALL_FAILED, "x")),
], ids=lambda value: label(value)[:24])
def test_result_reads_from_wire(kind, body, expected):
    """A hand-written result (extra keys ignored) reads as its kind's value."""
    got_id, raw = mesh.read_reply(reply(5, wire(body)))
    assert got_id == 5
    same(mesh.read_result(kind, raw), expected)


def test_reply_exact_bytes():
    """A reply frame is exactly code 6 | 8-byte request id | result JSON."""
    assert mesh.frame_reply(0x0102030405060708, b'{"s":true}') == [b"\x06\x01\x02\x03\x04\x05\x06\x07\x08{\"s\":true}"]
    assert mesh.send_result(True) == b'{"s":true}'
    assert mesh.failure(ErrorCode.SEND_FAILED, "gone") == b'{"e":401,"m":"gone"}'


@pytest.mark.parametrize("frames", [
    [], [b""], [b"\x06"], [b"\x06" + b"\x00" * 7], [reply(1, b"{}")[0], b""], [b"peer", reply(1, b"{}")[0]],
    [SEND_FRAME], [b"\x05" + b"\x00" * 8 + b"{}"], [b"\x00" * 9], [b"\x07" + b"\x00" * 8 + b"{}"],
], ids=label)
def test_reply_bad_framing(frames):
    """A reply is one frame starting with code 6 and an 8-byte request id."""
    error = assert_frame_error(mesh.read_reply, frames)
    assert "not a mesh reply" in str(error)


BAD_RESULTS = [
    (Send, b"", "mesh result"), (Send, b"{", "mesh result"), (Send, b"\xff", "mesh result"),
    (Send, b"[]", "mesh result"), (Send, b"null", "mesh result"), (Send, b"true", "mesh result"),
    (Send, b'"s"', "mesh result"),
    (Send, wire({}), "SEND result.s"), (Send, wire({"s": 1}), "SEND result.s"), (Send, wire({"s": 0}), "SEND result.s"),
    (Send, wire({"s": "true"}), "SEND result.s"), (Send, wire({"s": []}), "SEND result.s"),
    (Send, wire({"ok": True}), "SEND result.s"),
    (Publish, wire({}), "PUB result.s"), (Publish, wire({"f": 1}), "PUB result.s"),
    (Publish, wire({"s": 1}), "PUB result.f"), (Publish, wire({"s": -1, "f": 0}), "PUB result.s"),
    (Publish, wire({"s": 1, "f": -1}), "PUB result.f"), (Publish, wire({"s": True, "f": 0}), "PUB result.s"),
    (Publish, wire({"s": 1, "f": False}), "PUB result.f"), (Publish, wire({"s": 1.5, "f": 0}), "PUB result.s"),
    (Publish, wire({"s": "1", "f": 0}), "PUB result.s"), (Publish, wire({"s": None, "f": 0}), "PUB result.s"),
    (Publish, wire({"s": BIG + 1, "f": 0}), "PUB result.s"), (Publish, wire({"s": NAN, "f": 0}), "PUB result.s"),
    (Call, wire({}), "CALL result.r"), (Call, wire({"r": None}), "CALL result.r"),
    (Call, wire({"r": {}}), "CALL result.r"),
    (Call, wire({"r": {"s": False}}), "CALL result.r"), (Call, wire({"r": {"s": 1}}), "CALL result.r"),
    (Call, wire({"r": {"s": "true"}}), "CALL result.r"), (Call, wire({"r": {"s": True, "d": []}}), "CALL result.r"),
    (Call, wire({"r": {"s": True, "d": "x"}}), "CALL result.r"),
    (Call, wire({"r": {"s": True, "d": None}}), "CALL result.r"),
    (Call, wire({"r": []}), "CALL result.r"), (Call, wire({"r": "ok"}), "CALL result.r"),
    (Call, wire({"s": True}), "CALL result.r"),
    (QueueEvent, wire({}), "QEV result.ok"), (QueueEvent, wire({"ok": 1}), "QEV result.ok"),
    (QueueEvent, wire({"ok": None}), "QEV result.ok"), (QueueEvent, wire({"ok": "true"}), "QEV result.ok"),
    (PeerAdvert, wire({}), "ADV result.ok"), (PeerAdvert, wire({"ok": 1}), "ADV result.ok"),
    (PeerAdvert, wire({"ok": None}), "ADV result.ok"), (PeerAdvert, wire({"s": True}), "ADV result.ok"),
    (Presence, wire({"c": []}), "PRES result.n"), (Presence, wire({"n": -1, "c": []}), "PRES result.n"),
    (Presence, wire({"n": 1}), "PRES result.c"), (Presence, wire({"n": 1, "c": {}}), "PRES result.c"),
    (Presence, wire({"n": 1, "c": [5]}), "PRES result.c[0]"), (Presence, wire({"n": 1, "c": [[]]}), "PRES result.c[0]"),
    (Presence, wire({"n": 1, "c": [[5, {}, 1]]}), "PRES result.c[0]"),
    (Presence, wire({"n": 1, "c": [["x"]]}), "PRES result.c[0]"),
    (Presence, wire({"n": 1, "c": [[-1]]}), "PRES result.c[0]"),
    (Presence, wire({"n": 1, "c": [[5, []]]}), "PRES result.c[0][1]"),
    (Presence, wire({"n": 1, "c": [[5, "ctx"]]}), "PRES result.c[0][1]"),
    (Presence, wire({"n": 1, "c": [[5]] * (protocol.MAX_PRESENCE_LIMIT + 1)}), "PRES result.c"),
    (QueueDelivery, wire({}), "QAEV result.s"), (QueueDelivery, wire({"s": "lost"}), "QAEV result.s"),
    (QueueDelivery, wire({"s": 1}), "QAEV result.s"), (QueueDelivery, wire({"s": ["full"]}), "QAEV result.s"),
    (QueueDelivery, wire({"s": "Written", "to": 30}), "QAEV result.s"),
    (QueueDelivery, wire({"s": "written"}), "QAEV result.to"),
    (QueueDelivery, wire({"s": "written", "to": 0.5}), "QAEV result.to"),
    (QueueDelivery, wire({"s": "written", "to": 3601}), "QAEV result.to"),
    (QueueDelivery, wire({"s": "written", "to": "30"}), "QAEV result.to"),
    (QueueDelivery, wire({"s": "written", "to": True}), "QAEV result.to"),
    (QueueDelivery, wire({"s": "written", "to": NAN}), "QAEV result.to"),
    (QueueAcks, wire({}), "QACK result.ok"), (QueueAcks, wire({"ok": 1}), "QACK result.ok"),
]


@pytest.mark.parametrize("kind, raw, field", BAD_RESULTS, ids=[f"{k.__name__}-{label(r)}" for k, r, _ in BAD_RESULTS])
def test_bad_result(kind, raw, field):
    """A result of the wrong shape for its kind is refused, naming the key."""
    assert_frame_error(mesh.read_result, kind, raw, field=field)


BAD_FAILURES = [
    {"e": 999, "m": "x"}, {"e": 0, "m": "x"}, {"e": -401, "m": "x"}, {"e": 100, "m": "x"},
    {"e": "401", "m": "x"}, {"e": True, "m": "x"}, {"e": None, "m": "x"}, {"e": NAN, "m": "x"},
    {"e": 401}, {"e": 401, "m": 5}, {"e": 401, "m": None}, {"e": 401, "m": []}, {"e": 401, "m": {}},
    {"e": 401, "m": True},
]


@pytest.mark.parametrize("body", BAD_FAILURES, ids=label)
def test_bad_failure(body):
    """A failure needs a known error code (an integer) and a string message, whatever the request's kind."""
    for kind in KINDS:
        assert_frame_error(mesh.read_result, kind, wire(body), field="mesh failure", case=kind)


@pytest.mark.parametrize("kind, result", [(kind, result) for kind, result, _ in RESULTS],
                         ids=lambda value: label(value)[:24])
def test_result_truncated(kind, result):
    """Every proper prefix of a reply frame is refused by read_reply or read_result."""
    frame = mesh.frame_reply(4, result)[0]
    for size in range(len(frame)):
        with pytest.raises(FrameError):
            mesh.read_result(kind, mesh.read_reply([frame[:size]])[1])


# --- cases that once slipped through ----------------------------------------------------------

@pytest.mark.parametrize("code", [[401], {"c": 401}], ids=label)
def test_failure_code_unhashable(code):
    """A failure whose code is a list or an object is refused with FrameError."""
    assert_frame_error(mesh.read_result, Send, wire({"e": code, "m": "x"}), field="mesh failure")


@pytest.mark.parametrize("code", [401.0, 101.0], ids=label)
def test_failure_code_float(code):
    """A failure whose code is a float is refused like any other wrong type."""
    assert_frame_error(mesh.read_result, Send, wire({"e": code, "m": "x"}), field="mesh failure")


@pytest.mark.parametrize("mesh_point", ["tcp://host:0", "tcp://host:65536", "tcp://host:99999",
                                        "tcp://host:\u0666\u0668\u0660\u0660", "tcp://[::1]:\uff16\uff18\uff10\uff10"])
def test_node_entry_mesh_point_port(mesh_point):
    """A node entry's mesh point needs an ASCII port in 1..65535."""
    body = {"v": 1, "nodes": [dict(ENTRY_JSON, mesh_point=mesh_point)]}
    assert_frame_error(mesh.read_control, control(b"SNAP", body), FROM_COORDINATOR, field="SNAP.nodes[0].mesh_point")


@pytest.mark.parametrize("body", [
    b'{"e": "queue.pop", "p": {"d": "\xed\xa0\x80"}}',
    b'{"e": "queue.pop", "p": {"t": "jobs", "d": "ok \xed\xbf\xbf"}, "i": null}',
], ids=["high-surrogate", "low-surrogate"])
def test_queue_event_body_not_utf8(body):
    """A QEV body that is not valid UTF-8 is refused (it becomes a client's text frame)."""
    assert_frame_error(mesh.read_request, request(4, {"t": "jobs", "k": 9}, body), field="QEV body")


@pytest.mark.parametrize("header", [
    b'{"c": 5, "f": "set_context_value", "a": ["\\ud800", 1]}',
    b'{"c": 5, "f": "set_context_value", "a": ["k", "\\udfff"]}',
    b'{"c": 5, "f": "set_context_value", "a": ["\xed\xa0\x80", 1]}',
    b'{"c": 5, "f": "set_context", "a": [{"k": ["\\ud800"]}]}',
], ids=["key-escape", "value-escape", "key-utf8-bytes", "set_context-escape"])
def test_call_args_lone_surrogate(header):
    """conn.call args holding a lone surrogate are refused, as the API refuses them."""
    assert_frame_error(mesh.read_request, request(3, header), field="CALL")


def test_failure_message_lone_surrogate():
    """A failure message holding a lone surrogate is refused."""
    assert_frame_error(mesh.read_result, Send, b'{"e": 401, "m": "\\ud800"}', field="mesh failure")


@pytest.mark.parametrize("count", [0, mesh.MAX_BATCH + 1])
def test_batch_refuses_no_frame_and_too_many(count):
    with pytest.raises(mesh.FrameError, match=f"has {count} frames, expected 1 to {mesh.MAX_BATCH}"):
        mesh.batch([b"x"] * count)


@pytest.mark.parametrize("count", [1, 2, mesh.MAX_BATCH])
def test_batch_keeps_every_frame_in_order(count):
    frames = [mesh.frame_request(mesh.publish_request([f"c{n}"], b"\x81\x00"), n + 1)[0] for n in range(count)]
    assert [mesh.read_request([frame]).request_id for frame in mesh.batch(frames)] == list(range(1, count + 1))



def _messages(count: int) -> list:
    return [mesh.frame_request(mesh.publish_request([f"c{n}"], b"\x81\x00"), n + 1)[0] for n in range(count)]


@pytest.mark.parametrize("count", [1, 2, 17, mesh.MAX_BATCH])
def test_pack_and_unpack_keep_every_message_in_order(count):
    messages = _messages(count)
    packed = mesh.pack(messages)
    assert (packed == messages[0]) if count == 1 else packed[0] == 7
    assert mesh.unpack(packed) == messages
    assert mesh.batch([packed]) == messages
    assert mesh.batch([packed, packed]) == messages + messages


@pytest.mark.parametrize("frame, problem", [
    (b"\x07", "mesh batch is empty"),
    (b"\x07\x00\x00", "mesh batch is cut short"),
    (b"\x07\x00\x00\x00\x05abc", "mesh batch is cut short"),
    (b"\x07\x00\x00\x00\x00", "mesh batch holds an empty message"),
])
def test_unpack_refuses_a_bad_batch(frame, problem):
    with pytest.raises(mesh.FrameError, match=problem):
        mesh.unpack(frame)


def test_unpack_refuses_more_than_max_batch_messages():
    with pytest.raises(mesh.FrameError, match=f"more than {mesh.MAX_BATCH}"):
        mesh.unpack(mesh.pack(_messages(mesh.MAX_BATCH + 1)))


def _replies_one_by_one(frames: list) -> list:
    """What read_replies must give: batch, then read_reply of each message (None where it raises)."""
    out = []
    for message in mesh.batch(frames):
        try:
            out.append(mesh.read_reply([message]))
        except mesh.FrameError:
            out.append(None)
    return out


_REPLIES = [mesh.frame_reply(n, mesh.send_result(n % 2 == 0))[0] for n in range(1, 6)]


@pytest.mark.parametrize("frames", [
    [_REPLIES[0]],                                            # one reply, not a batch
    [mesh.pack(_REPLIES)],                                     # a batch of replies
    [mesh.pack([_REPLIES[0], mesh.frame_reply(9, b"")[0]])],   # a reply with an empty result
    [mesh.pack(_REPLIES[:2] + _messages(1) + _REPLIES[2:])],   # a request among them: None in its place
    [mesh.pack(_REPLIES[:2] + [b"\x06\x00"] + _REPLIES[2:])],  # a reply head cut short
    [mesh.pack(_REPLIES[:2]), _REPLIES[2], mesh.pack(_REPLIES[3:])],   # several frames
])
def test_read_replies_reads_as_batch_and_read_reply_do(frames):
    assert mesh.read_replies(frames) == _replies_one_by_one(frames)


@pytest.mark.parametrize("frames, problem", [
    ([], "has 0 frames"),
    ([b"\x07"], "mesh batch is empty"),
    ([mesh.pack(_REPLIES)[:-3]], "mesh batch is cut short"),
    ([mesh.pack(_REPLIES) + b"\x00\x00"], "mesh batch is cut short"),
    ([mesh.pack([_REPLIES[0]] * (mesh.MAX_BATCH + 1))], f"more than {mesh.MAX_BATCH}"),
])
def test_read_replies_refuses_what_batch_refuses(frames, problem):
    with pytest.raises(mesh.FrameError, match=problem):
        mesh.read_replies(frames)


def test_a_batch_inside_a_batch_is_not_a_request():
    inner = mesh.pack(_messages(2))
    [message] = mesh.unpack(b"\x07" + len(inner).to_bytes(4, "big") + inner)
    with pytest.raises(mesh.FrameError, match="unknown mesh kind code 7"):
        mesh.read_request([message])


@pytest.mark.parametrize("raw", [
    mesh.publish_result(0, 0), mesh.publish_result(50, 3), mesh.publish_result(10 ** 18 - 1, 7),
    mesh.publish_result(10 ** 18, 0), mesh.publish_result(2 ** 63, 0), b'{"s":01,"f":0}', b'{"s":1,"f":0} ',
    b'{"f":0,"s":1}', b'{"s":-1,"f":0}', b'{"s":1,"f":0,"x":2}', b'{"s":1.0,"f":0}', b'{"s":1,"f":0}\n',
    bytearray(b'{"s":4,"f":1}'), memoryview(b'{"s":4,"f":1}'),
])
def test_a_publish_result_read_without_json_is_what_json_reads(monkeypatch, raw):
    """read_result reads what publish_result writes with a regular expression; the same value, or the
    same error, as through JSON, at and past each bound of the form."""
    def outcome():
        try:
            value = mesh.read_result(mesh.Publish, raw)
        except mesh.FrameError as exc:
            return ("error", str(exc))
        return ("ok", value, type(value))
    fast = outcome()
    monkeypatch.setattr(mesh, "_PUBLISH_READ", re.compile(rb"(?!)"))   # matches nothing: JSON reads it all
    assert fast == outcome()
