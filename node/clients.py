"""Local hub: client_id -> connection, channel -> subscribers, and the write path.

Every frame to a client goes through `write_frame`: the bytes were encoded
once (cluster.protocol.encode_ws_frame) and the same object is written to each
recipient's stream, whose write buffer is bounded (`write_buffer_limit`); over
the bound the connection is closed 1008 and counted. Owned by the node's IOLoop.
"""

import logging

from tornado.iostream import StreamBufferFullError, StreamClosedError

from cluster.protocol import CloseCode

log = logging.getLogger("meshgate.node")


class Counters:
    """Figures a node reports in its heartbeat (coordinator/http.py NODE_FIGURES)."""

    def __init__(self):
        self.in_total = 0          # client messages received
        self.out_total = 0         # frames written to clients and consumers
        self.slow_closed = 0       # connections closed 1008 for a full write buffer
        self.hook_errors = 0
        self.handshakes_refused = 0   # client handshakes refused 401, 431 or 503 (node/client_limits.py)
        self.limit_closed = 0      # client connections closed for breaking a limit or the protocol


def write_frame(conn, frame: bytes, counters: Counters) -> bool:
    """Writes one pre-encoded frame to a connection; returns False when it could not.

    `conn` is a WebSocket handler with `stream` set when it opened. When the
    stream has nothing queued, the frame goes straight to the socket (no
    Future, no buffer); only what the kernel does not take is queued on the
    stream, whose bound (`max_write_buffer_size`) closes a slow reader.
    """
    stream = conn.stream
    if stream is None:
        return False
    try:
        if not stream._write_buffer:   # tornado's queue; empty means the socket is ours
            try:
                sent = stream.socket.send(frame)
            except BlockingIOError:
                sent = 0
            if sent == len(frame):
                counters.out_total += 1
                return True
            frame = frame[sent:]
        stream.write(frame)
    except StreamBufferFullError:
        counters.slow_closed += 1
        close_slow(conn)
        return False
    except (StreamClosedError, OSError, AttributeError):
        return False
    counters.out_total += 1
    return True


def close_slow(conn) -> None:
    """Closes a connection whose write buffer is full (docs/protocol.md, Client WebSocket server: close 1008)."""
    stream = conn.stream
    conn.stream = None
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
        return write_frame(conn, frame, self.counters)

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
        written = 0
        counters = self.counters
        for conn in targets:
            if write_frame(conn, frame, counters):
                written += 1
        return written, len(targets) - written
