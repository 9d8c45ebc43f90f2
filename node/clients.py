"""Local hub: client_id -> connection, channel -> subscribers, and the write path.

Every frame to a client goes through `write_frame`: the bytes were encoded
once (cluster.protocol.encode_ws_frame) and the same object is handed to each
recipient. Frames for one connection are corked and leave together in one
`send` (`flush_corked`): fewer system calls for the node, fewer reads for the
client, order kept. The flush comes FLUSH_TURNS loop turns after the turn
that corked the first of them: each of those turns reads what the sockets
hold meanwhile (more publishes, forwarded ones, requests), answers it, and
corks its frames behind the first ones. It comes at the end of the turn
instead when a backend waits on a frame (`write_to_backend`: a reply or a
queue event on an API connection, where a pipelining backend's window waits
for its replies), or once the first frame has waited FLUSH_WAIT_S; at once
for a connection past CORK_BYTES, and before a close frame. When the loop
has nothing else to do, those turns take microseconds. What the kernel does
not take waits in the stream's buffer, bounded by `write_buffer_limit`: over
it the connection is closed 1008 and counted. Owned by the node's IOLoop.
"""

import asyncio
import logging
import socket
import ssl
import time

from tornado.iostream import StreamBufferFullError, StreamClosedError

from cluster import speedups
from cluster.protocol import CloseCode
from node.metrics import Timings

log = logging.getLogger("meshgate.node")


class Counters:
    """Figures a node reports in its heartbeat (coordinator/http.py NODE_FIGURES) and metrics (node/metrics.py)."""

    def __init__(self):
        self.in_total = 0          # client messages received
        self.out_total = 0         # frames written to clients and consumers
        self.slow_closed = 0       # connections closed 1008 for a full write buffer
        self.hook_errors = 0
        self.handshakes_refused = 0   # client handshakes refused 401, 431 or 503 (node/client_limits.py)
        self.limit_closed = 0      # client connections closed for breaking a limit or the protocol
        self.client_auth_refused = 0   # of handshakes_refused: a token refused (401)
        self.sends = 0             # frames written to one client (mesh.send, here or for a peer)
        self.publishes = 0         # publishes fanned out to this node's subscribers
        self.queue_events = 0      # queue events written to a consumer
        self.fanout = Timings()    # () -> how long handing one publish to the local subscribers took
        self.hooks = Timings()     # (hook,) -> how long an entry hook took


class _Frames(list):
    """Two or more frames corked for one connection, and their size."""
    __slots__ = ("size",)


# Past this many corked bytes a connection's frames leave at once: coalescing is for small frames.
CORK_BYTES = 65536

# What a socket's send raises when the kernel takes nothing now: a plain socket's EAGAIN, or a TLS
# socket's want-write (an OSError but no BlockingIOError; the same bytes are written again later, by
# the stream, as OpenSSL asks). Either way the bytes wait in the stream's bounded buffer.
_REFUSED = (BlockingIOError, ssl.SSLWantWriteError)

# How many loop turns corked frames wait for later ones, and how long at most. In bench/README.md's
# pairs, four turns made about three publishes' frames leave in each send instead of two with 100
# subscribers, HTTP publishes about a quarter faster, and fan-out to 1,000 and 5,000 subscribers
# about half again as fast; idle fan-out took as long as before.
FLUSH_TURNS = 4
FLUSH_WAIT_S = 0.02

# Connection -> its corked frame (bytes) or frames (_Frames), written by the next flush.
# Kept here, not on the connection: an attribute set once would grow every connection's __dict__.
_corked = {}
_flush_scheduled = False
_turns_left = 0         # turns the scheduled flush may still let pass
_flush_by = 0.0         # time.monotonic() past which it waits no more
_backend_waits = False  # a frame for an API connection is corked: the flush comes at the end of the turn


def write_frame(conn, frame: bytes, counters: Counters) -> bool:
    """Hands one pre-encoded frame to a connection; returns False when it cannot take it.

    `conn` is a WebSocket handler with `stream` set when it opened and `node`
    (for its counters). The frame leaves with the next flush, with whatever
    else the connection got until then, or at once past CORK_BYTES. When the
    kernel already refuses the connection's bytes (its stream holds a
    backlog) and the backlog plus what waits would pass the stream's
    `max_write_buffer_size`, the connection is closed as a slow reader.
    Nothing is written after this side's close frame (RFC 6455, section 5.5.1):
    a frame for a closing connection is refused, to go elsewhere or fail.
    """
    stream = conn.stream
    if stream is None or conn._closed_by_server is not None:
        return False
    waiting = _corked.get(conn)
    if waiting is None:
        size = len(frame)
    elif type(waiting) is bytes:
        size = len(waiting) + len(frame)
    else:
        size = waiting.size + len(frame)
    buffer = stream._write_buffer   # tornado's queue (what the kernel did not take yet); None once closed
    if buffer is None:
        return False
    backlog = buffer._size
    if backlog and stream.max_write_buffer_size is not None and backlog + size > stream.max_write_buffer_size:
        counters.slow_closed += 1
        close_slow(conn)
        return False
    if waiting is None:
        if size > CORK_BYTES:
            return _write(conn, frame) and _counted(counters)
        _corked[conn] = frame
        _schedule_flush()
    else:
        if type(waiting) is bytes:
            waiting = _corked[conn] = _Frames((waiting,))
        waiting.append(frame)
        waiting.size = size
        if size > CORK_BYTES:
            return flush(conn) and _counted(counters)
    counters.out_total += 1
    return True


def write_to_backend(conn, frame: bytes, counters: Counters) -> bool:
    """`write_frame` to an API connection (a reply, a queue event): a backend waits on it, so what is
    corked leaves at the end of this turn, not FLUSH_TURNS later (when the frame itself waits corked)."""
    global _backend_waits
    taken = write_frame(conn, frame, counters)
    if conn in _corked:
        _backend_waits = True
    return taken


def write_to_all(conns: list, frame: bytes, counters: Counters) -> int:
    """`write_frame` of one frame to each of `conns` (a publish); returns how many took it.

    The common case, a connection with nothing queued whose corked frames stay
    within CORK_BYTES, is handled by `cork_all`: this loop runs once per subscriber.
    """
    if len(frame) > CORK_BYTES:
        return sum(1 for conn in conns if write_frame(conn, frame, counters))
    rest = _cork_all(conns, frame, _corked)
    corked_here = len(conns) - len(rest)
    if corked_here:
        counters.out_total += corked_here
        _schedule_flush()
    return corked_here + sum(1 for conn in rest if write_frame(conn, frame, counters))


def cork_all(conns: list, frame: bytes, corked: dict) -> list:
    """What `write_frame` does with `frame` (at most CORK_BYTES) for each connection of `conns` whose
    stream has nothing queued and no close of ours under way, and whose corked bytes stay within
    CORK_BYTES with it: `frame` corked, after what waits there already. Returns the others, for
    write_frame, which says what becomes of each. (cluster/_speedups.c has the same function in C.)"""
    rest = []
    size = len(frame)
    for conn in conns:
        stream = conn.stream
        if stream is not None and stream._write_buffer is not None and not stream._write_buffer._size \
                and conn._closed_by_server is None:
            waiting = corked.get(conn)
            if waiting is None:
                corked[conn] = frame
                continue
            if type(waiting) is bytes:
                if len(waiting) + size <= CORK_BYTES:
                    both = corked[conn] = _Frames((waiting, frame))
                    both.size = len(waiting) + size
                    continue
            elif type(waiting) is _Frames and waiting.size + size <= CORK_BYTES:
                waiting.append(frame)
                waiting.size += size
                continue
        rest.append(conn)
    return rest


def _schedule_flush() -> None:
    global _flush_scheduled, _turns_left, _flush_by
    if not _flush_scheduled:
        _flush_scheduled = True
        _turns_left = FLUSH_TURNS
        _flush_by = time.monotonic() + FLUSH_WAIT_S
        asyncio.get_running_loop().call_soon(flush_corked)


def _counted(counters: Counters) -> bool:
    counters.out_total += 1
    return True


def flush_corked() -> None:
    """Every corked connection gets its frames in one write, once FLUSH_TURNS more turns have passed
    (each one calls this again), a backend waits, or the frames have waited FLUSH_WAIT_S."""
    global _corked, _flush_scheduled, _turns_left, _backend_waits
    if _turns_left and not _backend_waits and time.monotonic() < _flush_by:
        _turns_left -= 1
        asyncio.get_running_loop().call_soon(flush_corked)
        return
    _flush_scheduled = _backend_waits = False
    corked, _corked = _corked, {}
    for conn, data in _send_corked(corked):
        _write(conn, data)


def send_corked(corked: dict) -> list:
    """The common case of the flush (this loop runs once per subscriber): one frame, nothing queued,
    and the kernel takes it all. Returns `(conn, data)` of the others, for _write: more than one
    frame, a stream with something queued, or what the kernel did not take. A connection whose
    stream or socket is gone is dropped (its close is on its way). (cluster/_speedups.c has the
    same function in C, for plain sockets, which also sends a connection's several frames in one
    sendmsg; a TLS socket is written through its own send.)"""
    left = []
    for conn, data in corked.items():
        stream = conn.stream
        if stream is not None and type(data) is bytes:
            buffer = stream._write_buffer
            if buffer is not None and not buffer._size:
                try:
                    sent = stream.socket.send(data)
                except _REFUSED:
                    sent = 0
                except (OSError, AttributeError):
                    continue
                if sent == len(data):
                    continue
                data = memoryview(data)[sent:]
        elif stream is None:
            continue
        left.append((conn, data))
    return left


_send_corked, _cork_all = send_corked, cork_all
if speedups.native is not None:
    speedups.native.setup_clients(socket.socket, _Frames, CORK_BYTES)
    _send_corked, _cork_all = speedups.native.send_corked, speedups.native.cork_all


def flush(conn) -> bool:
    """Writes a connection's corked frames now (before a close frame, past CORK_BYTES); False when it could not."""
    data = _corked.pop(conn, None)
    return True if data is None else _write(conn, data)


def _write(conn, data) -> bool:
    """Writes a frame or frames to a connection's stream.

    When its stream has nothing queued, the bytes go straight to the socket
    (no Future, no buffer); only what the kernel does not take is queued on
    the stream, whose bound (`max_write_buffer_size`) closes a slow reader.
    Returns False when the bytes could not be written.
    """
    stream = conn.stream
    if stream is None:
        return False
    if type(data) is _Frames:
        data = b"".join(data)
    try:
        if not stream._write_buffer:   # tornado's queue (falsy when empty); empty means the socket is ours
            try:
                sent = stream.socket.send(data)
            except _REFUSED:
                sent = 0
            if sent == len(data):
                return True
            data = memoryview(data)[sent:]
        stream.write(data)
    except StreamBufferFullError:
        conn.node.counters.slow_closed += 1
        close_slow(conn)
        return False
    except (StreamClosedError, OSError, AttributeError):
        return False
    return True


def close_slow(conn) -> None:
    """Closes a connection whose write buffer is full (docs/protocol.md, Client WebSocket server: close 1008)."""
    stream = conn.stream
    conn.stream = None
    _corked.pop(conn, None)
    log.info("closing %s: write buffer over its limit", conn.describe())
    if stream is not None:
        stream.max_write_buffer_size = None   # room for the close frame
    try:
        conn.close(int(CloseCode.POLICY_VIOLATION), "write buffer full")
    except Exception:
        if stream is not None:
            stream.close()


# A connection's channels until it subscribes to one (most never do: no set for them).
NO_CHANNELS = frozenset()


class Hub:
    """Client connections of this node and their channel subscriptions."""

    def __init__(self, counters: Counters):
        self.counters = counters
        self.conns = {}        # client_id -> ClientHandler
        self.subs = {}         # channel -> set of ClientHandler

    def add(self, conn) -> None:
        self.conns[conn.client_id] = conn

    def remove(self, conn) -> list:
        """Forgets a closed connection; returns `(channel, count)` of its channels' new counts."""
        self.conns.pop(conn.client_id, None)
        return self.unsubscribe(conn, list(conn.channels))

    def subscribe(self, conn, channels: list) -> list:
        """Returns `(channel, count)` for every channel whose subscriber count changed."""
        changes = []
        if conn.channels is NO_CHANNELS:
            conn.channels = set()
        for channel in channels:
            if channel in conn.channels:
                continue
            conn.channels.add(channel)
            members = self.subs.get(channel)
            if members is None:
                members = self.subs[channel] = set()
            members.add(conn)
            changes.append((channel, len(members)))
        return changes

    def unsubscribe(self, conn, channels: list) -> list:
        changes = []
        for channel in channels:
            if channel not in conn.channels:
                continue
            conn.channels.discard(channel)
            members = self.subs.get(channel)
            if members is None:
                continue
            members.discard(conn)
            if not members:
                del self.subs[channel]
            changes.append((channel, len(members)))
        return changes

    def send(self, client_id: int, frame: bytes):
        """Writes to one local client: True written, False write failed, None not here."""
        conn = self.conns.get(client_id)
        if conn is None:
            return None
        written = write_frame(conn, frame, self.counters)
        if written:
            self.counters.sends += 1
        return written

    def publish(self, channels: list, frame: bytes) -> tuple:
        """Writes one frame to every local subscriber of any of `channels`, once each; returns `(s, f)`."""
        if len(channels) == 1:
            members = self.subs.get(channels[0])
            if not members:
                return 0, 0
            targets = list(members)
        else:
            seen = set()
            for channel in channels:
                members = self.subs.get(channel)
                if members:
                    seen.update(members)
            targets = list(seen)
        counters = self.counters
        started = time.monotonic()
        written = write_to_all(targets, frame, counters)
        counters.fanout.observe((), time.monotonic() - started)
        counters.publishes += 1
        return written, len(targets) - written
