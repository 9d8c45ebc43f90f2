"""The node-to-node and node-to-coordinator contract: one builder and one strict reader per kind.

PURE: builds and reads ZeroMQ frames (bytes); no sockets here. What arrives
from another process is checked as strictly as an API request (types, ranges,
sizes, name rules) before anything uses it: a reader returns a message with
named fields or raises `FrameError`, never anything half-checked. node/ and
coordinator/ never touch the wire keys below.

ZeroMQ sockets of a cluster:

| socket | type | bind/connect | owner | purpose |
| --- | --- | --- | --- | --- |
| registry | ROUTER | bind `coordinator.registry` (6786) | coordinator | registration, heartbeats, adverts in; table updates out |
| coordinator link | DEALER | connect registry | each node | the node's side of the above (fixed routing id) |
| mesh point | ROUTER | bind `node.mesh` (one port per node) | each node | requests from peers in; replies out |
| peer link | DEALER | connect a peer's mesh point | each node, one per peer | requests to that peer out; its replies in |
| exit notices | DEALER | connect registry | each supervisor (`meshgate start`, `meshgate node`) | `EXIT` out, nothing in |

Every socket uses the cluster key (CURVE, cluster/zloop.py). A peer link is
also watched (node/peer_links.py): a socket monitor puts it down the moment its
connection closes (a peer process that dies has its connection closed by its
kernel), and ZeroMQ heartbeats put it down when a peer stops answering
(`ZMQ_HEARTBEAT_IVL` 1 s, `ZMQ_HEARTBEAT_TIMEOUT` 5 s, `ZMQ_HEARTBEAT_TTL` 5 s,
`ZMQ_HANDSHAKE_IVL` 5 s); a link that is down is tried again every 0.1 s,
backing off to 1 s (`ZMQ_RECONNECT_IVL_MAX`). Heartbeats are answered by
ZeroMQ's I/O thread, not by the peer's event loop: a peer busy in a long loop
turn still answers them. The registry reads where each message comes from
(ZeroMQ's `Peer-Address`): an `EXIT` counts only from the address its node
registered from.

Control messages (node or supervisor <-> registry) are two frames, `[kind, JSON object]`;
the JSON keys are the field names of the classes below:

| kind | class | from | fields |
| --- | --- | --- | --- |
| `REG` | Register | node | node_id (0: give me one), host, pid, api_server, mesh_point, started_at, state {interest, consumers, clients, watched}, lease |
| `HB` | Heartbeat | node | node_id, stats {figure: number} |
| `MT` | Metrics | node | node_id, text (its metrics in Prometheus' text format, at most `MAX_METRICS_BYTES`) |
| `ADV` | Advert | node | interest, consumers, opened, closed, watched (coalesced changes of this node; watched: `[client_id, topic]` of clients whose close goes to a lifecycle topic) |
| `SYNC` | Sync | node | node_id (a version was skipped: send a snapshot) |
| `BYE` | Bye | node | node_id (leaving for good) |
| `EXIT` | Exited | supervisor | host, pid, started_at, exited_at, code (a node process of that host exited) |
| `WELCOME` | Welcome | coordinator | node_id, not_before_ms, snapshot, lease |
| `UPD` | Update | coordinator | v (1 and up), nodes (absent: unchanged), dead, interest, consumers |
| `SNAP` | Snapshot | coordinator | v (0 before the first update), nodes, interest, consumers |
| `REREG` | Reregister | coordinator | (none: register again) |
| `REFUSED` | Refused | coordinator | reason, retry |
| `LOST` | Lost | coordinator | node_id (a node that died), clients `[client_id, topic]`: push their lifecycle close messages |

Mesh messages (node -> node) are one frame each: kind code (1 byte) |
request id (8 bytes; 0 = no reply wanted) | header length (4 bytes) | header
JSON | body. A reply is: code 6 | request id | result JSON. What a node has
for one peer in one loop turn leaves together, read in order: packed into one
frame (`pack`: code 7, then each message's length (4 bytes) and bytes; at
most `MAX_BATCH` messages, within the mesh's size bound). A ZeroMQ message
may also carry up to `MAX_BATCH` frames, each a message or a batch (`batch`).

| kind | code | class | header | body | result |
| --- | --- | --- | --- | --- | --- |
| `SEND` | 1 | Send | `c` client_id | one WebSocket frame | `s`: true written, false failed, null no such client |
| `PUB` | 2 | Publish | `ch` channels | one WebSocket frame | `s` written, `f` failed |
| `CALL` | 3 | Call | `c` client_id, `f` function, `a` args | (none) | `r` the conn.call result |
| `QEV` | 4 | QueueEvent | `t` topic, `k` consumer_id | the queue event (JSON) | `ok`: written |
| `ADV` | 5 | PeerAdvert | `o` origin, `interest`, `consumers` | (none) | `ok` |
| `PRES` | 8 | Presence | `ch` channel, `x` with contexts, `l` limit | (none) | `n` local subscribers, `c` up to `l` of `[client_id]` or `[client_id, context]` |
| `QAEV` | 9 | QueueDelivery | `t` topic, `k` consumer_id (an at-least-once one), `o` origin node, `q` the origin's key, `a` attempt, `r` resume (optional) | the queue event (JSON) | `s`: `written` (and `to`, the consumer's ack_timeout), `full` (its window) or `gone` |
| `QACK` | 10 | QueueAcks | `n` the consumer's node, `k` consumer_id, `acked` [key], `released` [[key, attempt]], `room` | (none) | none: sent with request id 0 |

At-least-once consumers (docs/protocol.md, Queue acknowledgements) have
consumer ids with bit 62 set (`ACK_CONSUMER`): the node that received an
event from its client (its origin) sends it to such a consumer as `QAEV`
and holds it under its key until the consumer's node says, with `QACK`,
that it was acknowledged, or released (delivered again), or that a full
window has room again.

Any result may instead be a failure `{"e": code, "m": message}` (an
`ErrorCode`): the peer could not serve the request.

Wire forms of changes (cluster/interest_table.py): interest `[channel, count,
seq]`, consumers `[topic, consumer_id, present, seq]`; in the coordinator's
updates and snapshots each starts with its origin node id.

Every socket refuses messages over a bound (ZMQ_MAXMSGSIZE): `MAX_CONTROL_BYTES`
for control messages, `max_mesh_bytes(...)` for mesh messages, a little over
the largest legal one; a process never sends one over it.

Kinds, codes and keys are exchanged between processes: append only.
"""

import math
import re
import struct
from itertools import repeat
from typing import Any, NamedTuple, Optional


from cluster import protocol, speedups
from cluster.ids import MAX_ID_MS, MAX_NODE_ID
from cluster.protocol import MAX_CLIENT_ID, ApiError, ErrorCode


# A registration's full state or a cluster's snapshot: tens of bytes per channel, consumer and client.
MAX_CONTROL_BYTES = 256 * 1024 * 1024
# A node's metrics (node/metrics.py): a few kilobytes, plus a round-trip histogram per peer.
MAX_METRICS_BYTES = 8 * 1024 * 1024
# Mesh messages (requests or replies) in one batch or one ZeroMQ message; each frame is still bounded by
# max_mesh_bytes.
MAX_BATCH = 1024
_MESH_SLACK = 64 * 1024


def max_mesh_bytes(max_body: int, max_message_size: int) -> int:
    """The largest mesh message a node sends or takes (node.api.max_body, the largest client message).

    Over the largest legal one: a request carries at most a body's worth of
    header and a body's worth of frame; a queue event may hold a client
    message written as JSON text (base64 or escapes grow it up to six times).
    """
    return max(8 * max(max_body, max_message_size), 16 * 1024 * 1024) + _MESH_SLACK


class FrameError(ValueError):
    """A message that does not follow this module: framing, kind, or a field's type, range, size or name."""


_BIG = 2 ** 63 - 1
_MISSING = object()


# --- field checks --------------------------------------------------------------------------
# Each check takes a value and returns the value to use, or raises _Bad with the reason.
# The path to the field is added on the way out (nothing is formatted while all is well),
# and the reader that was called turns it into FrameError("PUB.ch[0]: <reason>").

class _Bad(Exception):
    def __init__(self, reason: str, part: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.path = [part] if part else []   # innermost first

    def at(self, part: str) -> "_Bad":
        self.path.append(part)
        return self

    def error(self, where: str) -> FrameError:
        return FrameError(f"{where}{''.join(reversed(self.path))}: {self.reason}")


def _int(low: int, high: int):
    def check(value):
        if type(value) is not int or not low <= value <= high:
            raise _Bad(f"expected an integer in {low}..{high}")
        return value
    return check


_node_id = _int(1, MAX_NODE_ID)
_node_id_or_zero = _int(0, MAX_NODE_ID)
_client_id = _int(0, MAX_CLIENT_ID)
_consumer_id = _int(1, _BIG)
_seq = _int(1, _BIG)
_count = _int(0, _BIG)
_present = _int(0, 1)
_id_ms = _int(0, MAX_ID_MS)   # a time client ids can hold


def _number(value):
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise _Bad("expected a finite number >= 0")
    return value


def _flag(value):
    if type(value) is not bool:
        raise _Bad("expected true or false")
    return value


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _text(max_bytes: int, min_bytes: int = 0):
    """Printable text (no control characters) of `min_bytes` to `max_bytes` UTF-8 bytes."""
    def check(value):
        if (type(value) is not str or _CONTROL_CHARS.search(value)
                or not min_bytes <= protocol.utf8_size(value) <= max_bytes):
            raise _Bad(f"expected Unicode text of {min_bytes} to {max_bytes} bytes, no control characters")
        return value
    return check


_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _lines(max_bytes: int):
    """Lines of printable text (newlines, no other control characters) of at most `max_bytes` UTF-8 bytes."""
    def check(value):
        if type(value) is not str or _CONTROL_BUT_NEWLINE.search(value) or protocol.utf8_size(value) > max_bytes:
            raise _Bad(f"expected lines of Unicode text of at most {max_bytes} bytes, no control characters")
        return value
    return check


def _name(kind: str):
    def check(value):
        problem = protocol.name_problem(value, kind)
        if problem is not None:
            raise _Bad(problem)
        return value
    return check


_channel = _name("channel")
_topic = _name("topic")

_MESH_POINT = re.compile(r"tcp://(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})\Z")


def is_mesh_point(value) -> bool:
    """True for `tcp://HOST:PORT` (HOST a name, an IPv4 address or a bracketed IPv6 one; PORT 1..65535)."""
    match = _MESH_POINT.match(value) if isinstance(value, str) else None
    return match is not None and 1 <= int(match.group(1)) <= 65535


def _mesh_point(value):
    if not is_mesh_point(value):
        raise _Bad("expected tcp://HOST:PORT")
    return value


def _checked(pairs) -> list:
    """Each `(check, item)` checked, in order; a failure names the item's index."""
    items = []
    for index, (check, item) in enumerate(pairs):
        try:
            items.append(check(item))
        except _Bad as bad:
            raise bad.at(f"[{index}]") from None
    return items


def _list_of(check, max_items: int = _BIG, nonempty: bool = False):
    def read(value):
        if type(value) is not list:
            raise _Bad("expected a list")
        if len(value) > max_items:
            raise _Bad(f"more than {max_items} items")
        if nonempty and not value:
            raise _Bad("must not be empty")
        return _checked(zip(repeat(check), value))
    return read


def _row(*checks):
    """A fixed-length list whose items pass `checks` in order (a change in wire form)."""
    def read(value):
        if type(value) is not list or len(value) != len(checks):
            raise _Bad(f"expected a list of {len(checks)} items")
        return _checked(zip(checks, value))
    return read


_interest = _list_of(_row(_channel, _count, _seq))
_consumers = _list_of(_row(_topic, _consumer_id, _present, _seq))
_origin_interest = _list_of(_row(_node_id, _channel, _count, _seq))
_origin_consumers = _list_of(_row(_node_id, _topic, _consumer_id, _present, _seq))
_watched = _list_of(_row(_client_id, _topic))
_client_ids = _list_of(_client_id)
_node_ids = _list_of(_node_id)
_channels = _list_of(_channel, nonempty=True)

_LEASE = re.compile(r"[0-9a-f]{64}\Z")


def _lease(value):
    if type(value) is not str or not _LEASE.match(value):
        raise _Bad("expected 64 hexadecimal digits")
    return value


_FIGURE = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
MAX_FIGURES = 64


MAX_FIGURE = 2 ** 53   # figures are summed and shown: they stay exact in JSON and never overflow a total


def _stats(value):
    if type(value) is not dict or len(value) > MAX_FIGURES:
        raise _Bad(f"expected an object of at most {MAX_FIGURES} figures")
    for key, figure in value.items():
        if not _FIGURE.match(key):
            raise _Bad(f"figure name {key[:70]!r} is not lower_case_with_underscores")
        try:
            if _number(figure) > MAX_FIGURE:
                raise _Bad(f"expected at most {MAX_FIGURE}")
        except _Bad as bad:
            raise bad.at(f".{key}") from None
    return value


def _object(cls, fields):
    """Reads a JSON object into `cls` (a NamedTuple) by `fields`: `(key, check, default)` per field, in order.

    A key that is absent takes its default (`_MISSING`: required); null is
    taken only where the default is None. Keys this version does not know are
    ignored, so a newer peer can add some.
    """
    def read(value):
        if type(value) is not dict:
            raise _Bad("expected a JSON object")
        values = []
        for key, check, default in fields:
            item = value.get(key, _MISSING)
            if item is _MISSING:
                if default is _MISSING:
                    raise _Bad("is required", f".{key}")
                item = dict(default) if isinstance(default, dict) else default   # never a shared dict
            elif item is not None or default is not None:
                try:
                    item = check(item)
                except _Bad as bad:
                    raise bad.at(f".{key}") from None
            values.append(item)
        return cls(*values)
    return read


def _dumps(value: Any) -> bytes:
    return protocol.json_text(value).encode("utf-8")


def _loads(raw, field: str) -> Any:
    try:
        return protocol.json_loads(bytes(raw))
    except (ValueError, TypeError, OverflowError) as exc:
        raise FrameError(f"{field}: bad JSON: {exc}") from None


def _json_value(value):
    """Any JSON value that can be written again as UTF-8 JSON (no lone surrogate, NaN or Infinity)."""
    try:
        _dumps(value)
    except (UnicodeEncodeError, OverflowError, TypeError):
        raise _Bad("holds a lone UTF-16 surrogate, NaN or Infinity") from None
    return value


# --- control messages (node <-> coordinator) ----------------------------------------------

class NodeEntry(NamedTuple):
    """A live node as the coordinator lists it (also the `/v1/nodes` entry)."""
    node_id: int
    host: str
    pid: int
    api_server: str
    mesh_point: str
    clients: int
    started_at: float


class NodeState(NamedTuple):
    """Everything one node advertises, sent when it (re-)registers."""
    interest: list = ()       # [channel, count, seq]
    consumers: list = ()      # [topic, consumer_id, present, seq]
    clients: list = ()        # client ids it owns
    watched: Optional[list] = None   # [client_id, topic] of those with a lifecycle topic (node/lifecycle.py)


class Register(NamedTuple):
    node_id: int              # 0: a new node, give it an id; else the id it holds
    host: str
    pid: int
    api_server: str
    mesh_point: str           # the registry checks its form and refuses it with a reason
    started_at: float
    state: NodeState
    lease: Optional[str] = None   # with node_id: the lease its Welcome gave (cluster_key.ClusterKey.lease)


class Heartbeat(NamedTuple):
    node_id: int
    stats: dict


class Metrics(NamedTuple):
    """A node's metrics, as prometheus_client writes them; the coordinator parses them before use."""
    node_id: int
    text: str


class Advert(NamedTuple):
    """A node's coalesced changes since its last advert."""
    interest: list = ()
    consumers: list = ()
    opened: list = ()         # client ids
    closed: list = ()
    watched: Optional[list] = None   # [client_id, topic]: opened clients whose close goes to that lifecycle topic


class Sync(NamedTuple):
    node_id: int


class Bye(NamedTuple):
    node_id: int


class Snapshot(NamedTuple):
    v: int
    nodes: list               # NodeEntry
    interest: list = ()       # [origin, channel, count, seq]
    consumers: list = ()      # [origin, topic, consumer_id, present, seq]


class Welcome(NamedTuple):
    node_id: int
    not_before_ms: int
    snapshot: Snapshot
    lease: Optional[str] = None   # proof that node_id is this process's, for a registration after a coordinator restart


class Update(NamedTuple):
    v: int
    nodes: Optional[list] = None   # the whole node list when it changed
    dead: list = ()
    interest: list = ()
    consumers: list = ()


class Reregister(NamedTuple):
    """The coordinator does not know the sender (it restarted): register again."""


class Exited(NamedTuple):
    """A supervisor saw one of the node processes it started exit (cluster/supervisor.py).

    The coordinator drops the node registered with this host and pid whose own
    `started_at` lies between the two times below, and only when the notice
    comes from the address that node registered from (coordinator/registry.py,
    `exited`): a stale notice, or a pid used again by a newer process, drops nothing.
    """
    host: str                 # socket.gethostname(), as the supervisor's nodes register it
    pid: int
    started_at: float         # wall clock (time.time()) just before the supervisor started the process
    exited_at: float          # wall clock when the supervisor saw it gone
    code: int                 # its exit status; -N: killed by signal N


class Refused(NamedTuple):
    reason: str
    retry: bool


class Lost(NamedTuple):
    """A node process died: push the lifecycle close message of each of its watched clients."""
    node_id: int
    clients: list             # [client_id, topic]


_node_entry = _object(NodeEntry, (
    ("node_id", _node_id, _MISSING), ("host", _text(255, 1), _MISSING), ("pid", _count, _MISSING),
    ("api_server", _text(300, 1), _MISSING), ("mesh_point", _mesh_point, _MISSING),
    ("clients", _count, 0), ("started_at", _number, 0),
))
_node_list = _list_of(_node_entry, MAX_NODE_ID)


def _node_entries(value):
    entries = _node_list(value)
    if len({entry.node_id for entry in entries}) != len(entries):
        raise _Bad("a node id is listed twice")
    return entries


_PID = _int(1, 2 ** 31 - 1)
_read_exited = _object(Exited, (
    ("host", _text(255, 1), _MISSING), ("pid", _PID, _MISSING), ("started_at", _number, _MISSING),
    ("exited_at", _number, _MISSING), ("code", _int(-255, 255), _MISSING),
))


def _exited(value) -> Exited:
    notice = _read_exited(value)
    if notice.started_at > notice.exited_at:
        raise _Bad("is before started_at", ".exited_at")
    return notice


_snapshot = _object(Snapshot, (
    ("v", _count, _MISSING), ("nodes", _node_entries, _MISSING),
    ("interest", _origin_interest, ()), ("consumers", _origin_consumers, ()),
))

# kind bytes -> (class, reader); which side may send it
_CONTROL = {
    b"REG": (Register, _object(Register, (
        ("node_id", _node_id_or_zero, 0), ("host", _text(255, 1), _MISSING), ("pid", _count, _MISSING),
        ("api_server", _text(300, 1), _MISSING), ("mesh_point", _text(300, 1), _MISSING),
        ("started_at", _number, 0),
        ("state", _object(NodeState, (("interest", _interest, ()), ("consumers", _consumers, ()),
                                      ("clients", _client_ids, ()), ("watched", _watched, None))), NodeState()),
        ("lease", _lease, None),
    ))),
    b"HB": (Heartbeat, _object(Heartbeat, (("node_id", _node_id, _MISSING), ("stats", _stats, {})))),
    b"MT": (Metrics, _object(Metrics, (("node_id", _node_id, _MISSING), ("text", _lines(MAX_METRICS_BYTES), _MISSING)))),
    b"ADV": (Advert, _object(Advert, (("interest", _interest, ()), ("consumers", _consumers, ()),
                                      ("opened", _client_ids, ()), ("closed", _client_ids, ()),
                                      ("watched", _watched, None)))),
    b"SYNC": (Sync, _object(Sync, (("node_id", _node_id, _MISSING),))),
    b"BYE": (Bye, _object(Bye, (("node_id", _node_id, _MISSING),))),
    b"WELCOME": (Welcome, _object(Welcome, (("node_id", _node_id, _MISSING), ("not_before_ms", _id_ms, 0),
                                            ("snapshot", _snapshot, _MISSING), ("lease", _lease, None)))),
    b"UPD": (Update, _object(Update, (
        ("v", _int(1, _BIG), _MISSING), ("nodes", _node_entries, None), ("dead", _node_ids, ()),
        ("interest", _origin_interest, ()), ("consumers", _origin_consumers, ()),
    ))),
    b"SNAP": (Snapshot, _snapshot),
    b"REREG": (Reregister, _object(Reregister, ())),
    b"REFUSED": (Refused, _object(Refused, (("reason", _text(1000), ""), ("retry", _flag, False)))),
    b"EXIT": (Exited, _exited),
    b"LOST": (Lost, _object(Lost, (("node_id", _node_id, _MISSING), ("clients", _watched, _MISSING)))),
}
_CONTROL_KIND = {cls: kind for kind, (cls, _) in _CONTROL.items()}
FROM_NODE = frozenset((Register, Heartbeat, Metrics, Advert, Sync, Bye))
FROM_COORDINATOR = frozenset((Welcome, Update, Snapshot, Reregister, Refused, Lost))
FROM_SUPERVISOR = frozenset((Exited,))   # the coordinator refuses it from a routing id that holds a node


def _fields(message) -> dict:
    """A message's fields as a JSON object; None (an absent optional field) is left out."""
    return {key: _wire(item) for key, item in zip(message._fields, message) if item is not None}


def _wire(value):
    """A field as a JSON value (nested messages become objects)."""
    if isinstance(value, (Snapshot, NodeState, NodeEntry)):
        return _fields(value)
    if isinstance(value, list) and value and isinstance(value[0], NodeEntry):
        return [_fields(item) for item in value]
    return value


def encode_control(message) -> list:
    """The frames `[kind, JSON]` of a control message (one of the classes above)."""
    return [_CONTROL_KIND[type(message)], _dumps(_fields(message))]


def control_kind(message) -> str:
    """The kind of a control message, for logs."""
    return _CONTROL_KIND[type(message)].decode()


def read_control(frames: list, allowed: frozenset):
    """Reads a control message (without any routing id) whose class is in `allowed`.

    Raises:
        FrameError: wrong frame count, unknown or unexpected kind, or a bad field.
    """
    if len(frames) != 2:
        raise FrameError(f"control message has {len(frames)} frames, expected 2")
    kind = bytes(frames[0])
    known = _CONTROL.get(kind)
    if known is None or known[0] not in allowed:
        raise FrameError(f"unexpected control kind {kind[:20]!r}")
    where = kind.decode()
    try:
        return known[1](_loads(frames[1], where))
    except _Bad as bad:
        raise bad.error(where) from None


# --- mesh requests (node -> node) --------------------------------------------------------

class Send(NamedTuple):
    client_id: int
    frame: bytes              # one encoded WebSocket frame


class Publish(NamedTuple):
    channels: list
    frame: bytes


class Call(NamedTuple):
    client_id: int
    function: str             # one of protocol.CALL_FUNCTIONS
    args: list                # checked as protocol.parse_call_args does


class QueueEvent(NamedTuple):
    topic: str
    consumer_id: int
    event: bytes              # the encoded queue.pop event


class PeerAdvert(NamedTuple):
    origin: int
    interest: list = ()       # [channel, count, seq]
    consumers: list = ()      # [topic, consumer_id, present, seq]


class Presence(NamedTuple):
    """Who of this node's clients is subscribed to `channel` (docs/protocol.md, Presence)."""
    channel: str
    context: bool
    limit: int


# A consumer id with this bit acknowledges its events (docs/protocol.md, Queue acknowledgements). On the wire.
ACK_CONSUMER = 1 << 62


class QueueDelivery(NamedTuple):
    """An event for an at-least-once consumer; its origin holds it under `seq` until acknowledged."""
    topic: str
    consumer_id: int          # with ACK_CONSUMER
    origin: int               # the node that holds the event (its client's node)
    seq: int                  # the origin's key of the event
    attempt: int              # 1 the first time
    resume: bool              # the first event since the consumer's window refused this origin
    event: bytes              # the encoded queue.pop event, without `k` and `a`


class QueueAcks(NamedTuple):
    """What became of events an origin delivered to one at-least-once consumer."""
    node: int                 # the consumer's node
    consumer_id: int
    acked: list = ()          # keys (QueueDelivery.seq) acknowledged
    released: list = ()       # [key, attempt] to deliver again
    room: bool = False        # the consumer's window, full for this origin before, has room


class Request(NamedTuple):
    """One request from a peer: reply to `request_id` unless it is 0."""
    request_id: int
    message: Any              # Send, Publish, Call, QueueEvent, PeerAdvert, Presence, QueueDelivery or QueueAcks


class Outbound(NamedTuple):
    """A request encoded but for its request id (which mesh_point.py adds with `frame_request`)."""
    kind: type                # the request's class: its reply is read with read_result(kind, ...)
    head: bytes
    body: bytes


_OPCODE_TEXT = 0x81
_OPCODE_BINARY = 0x82


def _ws_frame(value: bytes) -> bytes:
    """One unmasked, final server-to-client data frame, its length exact; text must be UTF-8."""
    size = len(value)
    if size < 2 or value[0] not in (_OPCODE_TEXT, _OPCODE_BINARY) or value[1] & 0x80:
        raise _Bad("not a WebSocket data frame", " body")
    length, start = value[1], 2
    if length == 126:
        length, start = (int.from_bytes(value[2:4], "big") if size >= 4 else -1), 4
        ok = length >= 126
    elif length == 127:
        length, start = (int.from_bytes(value[2:10], "big") if size >= 10 else -1), 10
        ok = length > 0xFFFF
    else:
        ok = True
    if not ok or start + length != size:
        raise _Bad("WebSocket frame length does not match", " body")
    if value[0] == _OPCODE_TEXT and not value.isascii():   # ASCII is UTF-8: the common case costs nothing more
        try:
            str(memoryview(value)[start:], "utf-8")
        except UnicodeDecodeError:
            raise _Bad("text frame is not UTF-8", " body") from None
    return value


def _no_body(value: bytes) -> None:
    if value:
        raise _Bad("this kind has no body", " body")


def _queue_event(value: bytes) -> bytes:
    try:
        str(value, "utf-8")   # it goes to a consumer as a text frame
        event = _json_value(protocol.json_loads(value))   # what JSON cannot carry to a consumer: refused here
    except _Bad as bad:
        raise bad.at(" body") from None
    except (ValueError, TypeError, OverflowError):   # UnicodeDecodeError included
        raise _Bad("not UTF-8 JSON", " body") from None
    if type(event) is not dict or event.get("e") != "queue.pop" or type(event.get("p")) is not dict:
        raise _Bad("not a queue.pop event", " body")
    return value


def _field(header: dict, key: str, check):
    try:
        return check(header.get(key))
    except _Bad as bad:
        raise bad.at(f".{key}") from None


def _read_send(header: dict, body: bytes) -> Send:
    return Send(_field(header, "c", _client_id), _ws_frame(body))


def _read_publish(header: dict, body: bytes) -> Publish:
    return _new(Publish, (_field(header, "ch", _channels), _ws_frame(body)))


def _read_call(header: dict, body: bytes) -> Call:
    function = header.get("f")
    if type(function) is not str or function not in protocol.CALL_FUNCTIONS:
        raise _Bad("unknown conn.call function", ".f")
    _no_body(body)
    args = header.get("a")
    if type(args) is not list:
        raise _Bad("expected a list", ".a")
    try:
        args = protocol.parse_call_args(function, args, "")
    except ApiError as exc:   # its message starts with the field: "a[0]: ..."
        field, _, reason = exc.message.partition(": ")
        raise _Bad(reason, "." + field) from None
    try:
        _json_value(args)
    except _Bad as bad:
        raise bad.at(".a") from None
    return Call(_field(header, "c", _client_id), function, args)


def _read_queue_event(header: dict, body: bytes) -> QueueEvent:
    return QueueEvent(_field(header, "t", _topic), _field(header, "k", _consumer_id), _queue_event(body))


_peer_advert = _object(PeerAdvert, (("o", _node_id, _MISSING), ("interest", _interest, ()),
                                    ("consumers", _consumers, ())))


def _read_peer_advert(header: dict, body: bytes) -> PeerAdvert:
    _no_body(body)
    return _peer_advert(header)


_limit = _int(0, protocol.MAX_PRESENCE_LIMIT)


def _read_presence(header: dict, body: bytes) -> Presence:
    _no_body(body)
    return Presence(_field(header, "ch", _channel), _field(header, "x", _flag), _field(header, "l", _limit))


def _ack_consumer_id(value):
    if type(value) is not int or not value & ACK_CONSUMER or not 1 <= value <= _BIG:
        raise _Bad("expected an at-least-once consumer id")
    return value


_attempt = _int(1, _BIG)


def _read_queue_delivery(header: dict, body: bytes) -> QueueDelivery:
    resume = header.get("r", False)
    if type(resume) is not bool:
        raise _Bad("expected true or false", ".r")
    return QueueDelivery(_field(header, "t", _topic), _field(header, "k", _ack_consumer_id),
                         _field(header, "o", _node_id), _field(header, "q", _seq), _field(header, "a", _attempt),
                         resume, _queue_event(body))


_queue_acks = _object(QueueAcks, (
    ("n", _node_id, _MISSING), ("k", _ack_consumer_id, _MISSING),
    ("acked", _list_of(_seq, protocol.MAX_ACK_IDS), ()),
    ("released", _list_of(_row(_seq, _attempt), protocol.MAX_WINDOW), ()),
    ("room", _flag, False),
))


def _read_queue_acks(header: dict, body: bytes) -> QueueAcks:
    _no_body(body)
    return _queue_acks(header)


# class -> (code, kind name, reader of (header, body)); the codes are on the wire: append only
_REQUESTS = {
    Send: (1, "SEND", _read_send),
    Publish: (2, "PUB", _read_publish),
    Call: (3, "CALL", _read_call),
    QueueEvent: (4, "QEV", _read_queue_event),
    PeerAdvert: (5, "ADV", _read_peer_advert),
    Presence: (8, "PRES", _read_presence),
    QueueDelivery: (9, "QAEV", _read_queue_delivery),
    QueueAcks: (10, "QACK", _read_queue_acks),
}
_BY_CODE = {code: (cls, name, read) for cls, (code, name, read) in _REQUESTS.items()}
_new = tuple.__new__
_REPLY_CODE = 6
_BATCH_CODE = 7   # a frame that packs several messages (pack, unpack)
_BATCH_MARK = bytes((_BATCH_CODE,))
_LENGTH = struct.Struct("!I")
_REQUEST_HEAD = struct.Struct("!BQI")
_REPLY_HEAD = struct.Struct("!BQ")


def kind_name(kind: type) -> str:
    """The wire name of a request class, for logs."""
    return _REQUESTS[kind][1]


def send_request(client_id: int, frame: bytes) -> Outbound:
    # The JSON of {"c": client_id}, made per send; the tuple without Outbound's Python-level constructor.
    return _new(Outbound, (Send, b'{"c":%d}' % client_id, frame))


def publish_request(channels: list, frame: bytes) -> Outbound:
    return _new(Outbound, (Publish, _dumps({"ch": channels}), frame))   # once per publish: no Python-level constructor


def call_request(client_id: int, function: str, args: list) -> Outbound:
    return Outbound(Call, _dumps({"c": client_id, "f": function, "a": args}), b"")


def queue_event_request(topic: str, consumer_id: int, event: bytes) -> Outbound:
    return Outbound(QueueEvent, _dumps({"t": topic, "k": consumer_id}), event)


def advert_request(origin: int, interest=(), consumers=()) -> Outbound:
    header = {"o": origin}
    if interest:
        header["interest"] = interest
    if consumers:
        header["consumers"] = consumers
    return Outbound(PeerAdvert, _dumps(header), b"")


def presence_request(channel: str, context: bool, limit: int) -> Outbound:
    return Outbound(Presence, _dumps({"ch": channel, "x": context, "l": limit}), b"")


def queue_delivery_request(topic: str, consumer_id: int, origin: int, seq: int, attempt: int, resume: bool,
                           event: bytes) -> Outbound:
    header = {"t": topic, "k": consumer_id, "o": origin, "q": seq, "a": attempt}
    if resume:
        header["r"] = True
    return Outbound(QueueDelivery, _dumps(header), event)


def queue_acks_request(node: int, consumer_id: int, acked=(), released=(), room: bool = False) -> Outbound:
    """`released`: (key, attempt) pairs. Each list holds at most protocol.MAX_WINDOW items."""
    header = {"n": node, "k": consumer_id}
    if acked:
        header["acked"] = list(acked)
    if released:
        header["released"] = [list(pair) for pair in released]
    if room:
        header["room"] = True
    return Outbound(QueueAcks, _dumps(header), b"")


def frame_request(message: Outbound, request_id: int) -> list:
    """The one frame of a request; `request_id` 0 means no reply is wanted."""
    return [request_frame(message, request_id)]


def request_frame(message: Outbound, request_id: int) -> bytes:
    """`frame_request`'s one frame itself (made once per forwarded request)."""
    return _request_frame(_REQUESTS[message.kind][0], request_id, message.head, message.body)


def request_frame_python(code: int, request_id: int, head: bytes, body: bytes) -> bytes:
    """A request's frame: its kind's code, id and head length (_REQUEST_HEAD), the head, the body.
    (cluster/_speedups.c has the same function in C.)"""
    return _REQUEST_HEAD.pack(code, request_id, len(head)) + head + body


# In C when built: the frame, and a peer's mesh.send or mesh.publish as send_request or publish_request
# and request_frame made it (read_request reads the rest).
_request_frame, _read_common_request = request_frame_python, None
if speedups.native is not None:
    speedups.native.set_python("request_frame", request_frame_python)
    speedups.native.setup_mesh(Request, Send, Publish)
    _request_frame, _read_common_request = speedups.native.request_frame, speedups.native.read_common_request


def read_request(frames: list) -> Request:
    """Reads a request from a peer (without the routing id the ROUTER prepends).

    Raises:
        FrameError: wrong frame count, truncation, unknown kind, or a bad field.
    """
    if len(frames) != 1:
        raise FrameError(f"mesh request has {len(frames)} frames, expected 1")
    if _read_common_request is not None:   # the commonest requests, in C: None for anything else
        request = _read_common_request(frames[0])
        if request is not None:
            return request
    frame = bytes(frames[0])
    if len(frame) < _REQUEST_HEAD.size:
        raise FrameError("mesh request is truncated")
    code, request_id, head_size = _REQUEST_HEAD.unpack_from(frame)
    known = _BY_CODE.get(code)
    if known is None:
        raise FrameError(f"unknown mesh kind code {code}")
    end = _REQUEST_HEAD.size + head_size
    if end > len(frame):
        raise FrameError("mesh request header is truncated")
    _, name, read = known
    header = _loads(frame[_REQUEST_HEAD.size:end], name)
    if type(header) is not dict:
        raise FrameError(f"{name}: header must be a JSON object")
    try:
        return _new(Request, (request_id, read(header, frame[end:])))
    except _Bad as bad:
        raise bad.error(name) from None


# --- replies ----------------------------------------------------------------------------

class Delivered(NamedTuple):
    """What a publish did on one node."""
    written: int
    failed: int


class Present(NamedTuple):
    """Who of one node's clients is subscribed to a channel."""
    count: int
    clients: list             # up to the request's limit: (client_id, context or None)


class DeliveryOutcome(NamedTuple):
    """What became of a QAEV: `status` one of DELIVERY_STATUSES; `ack_timeout` the consumer's, when written."""
    status: str
    ack_timeout: float = 0.0


WRITTEN, FULL, GONE = "written", "full", "gone"
DELIVERY_STATUSES = (WRITTEN, FULL, GONE)   # on the wire: append only


class Failure(NamedTuple):
    """The peer could not serve a request (any kind)."""
    code: ErrorCode
    message: str


_SEND_RESULTS = {True: b'{"s":true}', False: b'{"s":false}', None: b'{"s":null}'}


_SEND_READ = {raw: written for written, raw in _SEND_RESULTS.items()}


def send_result(written: Optional[bool]) -> bytes:
    """True written, False the write failed, None: no such client on that node."""
    return _SEND_RESULTS[written]


def publish_result(written: int, failed: int) -> bytes:
    return b'{"s":%d,"f":%d}' % (written, failed)


# What publish_result writes, counts of at most 18 digits (within _count's bound): read_result reads
# it without JSON; anything else (a failure, another form) goes through _RESULTS.
_PUBLISH_READ = re.compile(rb'\{"s":(0|[1-9][0-9]{0,17}),"f":(0|[1-9][0-9]{0,17})\}\Z')


def call_result(result: dict) -> bytes:
    """Raises TypeError or OverflowError when `result` holds something JSON cannot carry."""
    return _dumps({"r": result})


def queue_event_result(written: bool) -> bytes:
    return _dumps({"ok": written})


def queue_delivery_result(status: str, ack_timeout: float = 0.0) -> bytes:
    """`status` one of DELIVERY_STATUSES; `ack_timeout` goes with WRITTEN."""
    if status == WRITTEN:
        return _dumps({"s": status, "to": ack_timeout})
    return _dumps({"s": status})


def queue_acks_result() -> bytes:
    """Only when a QACK asked for a reply (they are sent with request id 0)."""
    return _dumps({"ok": True})


def advert_result() -> bytes:
    return _dumps({"ok": True})


def presence_result(count: int, clients: list) -> bytes:
    """`clients`: `[client_id]` or `[client_id, context]` rows. Raises TypeError or OverflowError when a
    context holds something JSON cannot carry."""
    return _dumps({"n": count, "c": clients})


def failure(code: ErrorCode, message: str) -> bytes:
    return _dumps({"e": int(code), "m": message})


def batch(frames: list) -> list:
    """The mesh messages of one ZeroMQ message from a peer (without a ROUTER's routing id), in order.

    Each frame is one mesh message, or a packed batch of them (`pack`).

    Raises:
        FrameError: no frame, more than MAX_BATCH frames or messages, or a batch that is cut short.
    """
    if not frames or len(frames) > MAX_BATCH:
        raise FrameError(f"a mesh message has {len(frames)} frames, expected 1 to {MAX_BATCH}")
    if len(frames) == 1:
        return unpack(frames[0])
    return [message for frame in frames for message in unpack(frame)]


def pack(messages: list) -> bytes:
    """Mesh messages (requests or replies) as one frame: one message as it is, several as a batch.

    A batch is code 7 | (length (4 bytes) | message) for each: one frame for ZeroMQ to carry, where
    a frame per message costs pyzmq several microseconds each way. Keep it under max_mesh_bytes.
    """
    if len(messages) == 1:
        return messages[0]
    parts = [_BATCH_MARK]
    for message in messages:
        parts.append(_LENGTH.pack(len(message)))
        parts.append(message)
    return b"".join(parts)


# What a message adds to a batch besides its own bytes: its length.
PACKED_HEAD = _LENGTH.size


def unpack(frame) -> list:
    """The mesh messages of one frame: itself, or those of a batch (`pack`), in order.

    Raises:
        FrameError: an empty or cut short batch, an empty message in it, or more than MAX_BATCH.
    """
    if not frame or frame[0] != _BATCH_CODE:
        return [frame]
    frame = bytes(frame)
    messages, at, end = [], 1, len(frame)
    while at < end:
        if at + _LENGTH.size > end:
            raise FrameError("mesh batch is cut short")
        size = _LENGTH.unpack_from(frame, at)[0]
        at += _LENGTH.size
        if not size or at + size > end:
            raise FrameError("mesh batch is cut short" if size else "mesh batch holds an empty message")
        messages.append(frame[at:at + size])
        at += size
        if len(messages) > MAX_BATCH:
            raise FrameError(f"mesh batch holds more than {MAX_BATCH} messages")
    if not messages:
        raise FrameError("mesh batch is empty")
    return messages


def frame_reply(request_id: int, result: bytes) -> list:
    return [_REPLY_HEAD.pack(_REPLY_CODE, request_id) + result]


def read_reply(frames: list) -> tuple:
    """Returns `(request_id, result bytes)` of a reply; read the result with `read_result`.

    Raises:
        FrameError: not a reply frame.
    """
    frame = bytes(frames[0]) if len(frames) == 1 else b""
    if len(frame) < _REPLY_HEAD.size or frame[0] != _REPLY_CODE:
        raise FrameError("not a mesh reply")
    return _REPLY_HEAD.unpack_from(frame)[1], frame[_REPLY_HEAD.size:]


_BATCHED_REPLY = struct.Struct("!IBQ")   # in a batch: a reply's length, then its head (_REPLY_HEAD)


def read_replies(frames: list) -> list:
    """`(request_id, result bytes)` of each reply in one ZeroMQ message from a peer, in order, as
    `batch` then `read_reply` each would give them (one pass over a batch); None in place of a
    message that is not a reply.

    Raises:
        FrameError: what `batch` raises.
    """
    if len(frames) != 1 or not frames[0] or frames[0][0] != _BATCH_CODE:
        return [_reply_or_none(message) for message in batch(frames)]
    frame = bytes(frames[0])
    replies = _batched_replies(frame)
    if replies is not None:
        return replies
    return [_reply_or_none(message) for message in unpack(frame)]   # not all replies, cut short, or empty


def batched_replies_python(frame: bytes):
    """The replies of a batch (`pack`) that holds only whole replies, at most MAX_BATCH of them:
    `(request_id, result bytes)` each, in order; None for any other batch (`unpack` says what it
    holds, or what is wrong). (cluster/_speedups.c has the same function in C.)"""
    replies, at, end = [], 1, len(frame)
    head, reply_head = _BATCHED_REPLY.size, _REPLY_HEAD.size
    while at < end:
        if at + head > end:
            return None
        size, code, request_id = _BATCHED_REPLY.unpack_from(frame, at)
        if code != _REPLY_CODE or size < reply_head or at + _LENGTH.size + size > end:
            return None
        at += _LENGTH.size
        replies.append((request_id, frame[at + reply_head:at + size]))
        at += size
        if len(replies) > MAX_BATCH:
            return None
    return replies or None


_batched_replies = batched_replies_python if speedups.native is None else speedups.native.batched_replies


def _reply_or_none(message):
    try:
        return read_reply([message])
    except FrameError:
        return None


_any_text = _text(1 << 29)


def _read_send_result(result: dict):
    written = result.get("s", _MISSING)
    if written is not None and type(written) is not bool:
        raise _Bad("expected true, false or null", ".s")
    return written


def _read_publish_result(result: dict) -> Delivered:
    return _new(Delivered, (_field(result, "s", _count), _field(result, "f", _count)))


def _read_call_result(result: dict) -> dict:
    value = result.get("r")
    if type(value) is not dict or value.get("s") is not True or type(value.get("d", {})) is not dict:
        raise _Bad("expected {\"s\": true} (and \"d\": an object)", ".r")
    return value


def _present_row(row):
    if type(row) is not list or len(row) not in (1, 2):
        raise _Bad("expected [client_id] or [client_id, context]")
    if len(row) == 2 and type(row[1]) is not dict:
        raise _Bad("a context must be an object", "[1]")
    return (_client_id(row[0]), _json_value(row[1]) if len(row) == 2 else None)


_present_rows = _list_of(_present_row, protocol.MAX_PRESENCE_LIMIT)


def _read_presence_result(result: dict) -> Present:
    return Present(_field(result, "n", _count), _field(result, "c", _present_rows))


def _read_delivery_result(result: dict) -> DeliveryOutcome:
    status = result.get("s")
    if type(status) is not str or status not in DELIVERY_STATUSES:
        raise _Bad(f"expected one of {', '.join(DELIVERY_STATUSES)}", ".s")
    if status != WRITTEN:
        return DeliveryOutcome(status)
    timeout = _field(result, "to", _number)
    if not 1 <= timeout <= protocol.MAX_ACK_TIMEOUT:
        raise _Bad(f"expected 1 to {protocol.MAX_ACK_TIMEOUT} seconds", ".to")
    return DeliveryOutcome(status, timeout)


def _read_failure(result: dict) -> Failure:
    code = result["e"]
    if type(code) is not int or code not in ErrorCode._value2member_map_:
        raise _Bad("expected an error code", ".e")
    return Failure(ErrorCode(code), _field(result, "m", _any_text)[:1000])   # kept up to 1000 characters


_RESULTS = {
    Send: _read_send_result,
    Publish: _read_publish_result,
    Call: _read_call_result,
    QueueEvent: lambda result: _field(result, "ok", _flag),
    PeerAdvert: lambda result: _field(result, "ok", _flag),
    Presence: _read_presence_result,
    QueueDelivery: _read_delivery_result,
    QueueAcks: lambda result: _field(result, "ok", _flag),
}


def read_result(kind: type, raw: bytes):
    """The result of a request of class `kind`, or a `Failure`.

    Returns:
        Send: True, False or None; Publish: Delivered; Call: the `r` object;
        QueueEvent: written (bool); PeerAdvert: the peer's `ok` (bool);
        QueueDelivery: DeliveryOutcome. Or Failure for any kind.

    Raises:
        FrameError: not a result of that kind.
    """
    if kind is Send:   # the commonest result, exactly as send_result writes it: no JSON to read
        known = _SEND_READ.get(bytes(raw), _MISSING)
        if known is not _MISSING:
            return known
    elif kind is Publish:   # the next commonest, exactly as publish_result writes it
        counts = _PUBLISH_READ.match(raw)
        if counts is not None:
            return _new(Delivered, (int(counts[1]), int(counts[2])))
    result = _loads(raw, "mesh result")
    if type(result) is not dict:
        raise FrameError("mesh result must be a JSON object")
    try:
        if "e" in result:
            return _read_failure(result)
        return _RESULTS[kind](result)
    except _Bad as bad:
        raise bad.error("mesh failure" if "e" in result else f"{kind_name(kind)} result") from None
