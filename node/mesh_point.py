"""This node's mesh point (ROUTER) and its links to peers (one DEALER each).

Request/reply correlation and per-request deadlines live here: every
forwarded request ends within its timeout, as a reply, `PeerTimeout`,
`PeerUnavailable` or `BadReply`, and at once (`PeerUnreachable`, `LinkDown`)
while the peer's link is down (node/peer_links.py watches the links).
Deadlines are checked by one periodic sweep, not a timer per request:
those of the default timeout in the order made (which is their order), the
few with a timeout of their own in a heap; after a turn that held the loop
up, a deadline that passed during it waits for the next sweep, so that the
replies that came meanwhile are read first (`sweep`). Every frame in or out goes
through cluster/mesh.py. The requests to one peer during one loop turn leave
packed into one ZeroMQ frame at the end of the turn (`mesh.pack`, within the
mesh's size bound): one hand-over to ZeroMQ's I/O thread, and one frame for
pyzmq, instead of one per message. The replies to one batch of a peer's
requests leave the same way as soon as that batch is served, not at the end
of the turn: the peer waits for them, and the rest of the turn may be a long
fan-out. Peers of the same host are reached, and reach this node, over local
links instead (node.mesh.local_links, on by default; node/local_links.py:
`listen_local`); the requests and replies are the same.
Owned by the node's IOLoop.
"""

import asyncio
import collections
import heapq
import logging
import time

import zmq
from tornado.ioloop import PeriodicCallback

from cluster import mesh
from cluster.logs import Throttled
from cluster.protocol import ErrorCode
from cluster.zloop import ZSocket, new_socket
from node.local_links import LocalListener, key_material, socket_name
from node.metrics import Timings
from node.peer_links import PeerLinks

log = logging.getLogger("meshgate.mesh")

_HWM = 100000
# A batch leaves as soon as it holds this many messages, not only at the end of the turn: the peer
# starts on them while this node reads on. For pipelined cross-node requests, 32 did about 5 % more
# per second than 128, and 128 about 10 % more than 1,024, in alternating runs (bench/README.md).
_SEND_AT = 32


class PeerError(Exception):
    """A request to a peer did not get a usable reply."""


class PeerUnavailable(PeerError):
    """The peer is not in the routing table (dead, or never known), its link is full, or it has too much unanswered."""


class PeerTimeout(PeerError):
    """The peer did not answer within the forward timeout."""


class PeerUnreachable(PeerError):
    """The peer's mesh link is down (its process died, or it stopped answering heartbeats): nothing was sent."""


class LinkDown(PeerError):
    """The peer's mesh link went down while the request waited for the reply: it may have been served."""


class BadReply(PeerError):
    """The peer answered something that does not follow cluster/mesh.py."""


class TooLarge(PeerError):
    """The request is larger than any mesh socket takes (mesh.max_mesh_bytes)."""


class _Batch:
    """Mesh messages for one peer waiting for the end of the loop turn; `mesh.pack` makes them one frame."""
    __slots__ = ("messages", "request_ids", "size")

    def __init__(self):
        self.messages = []
        self.request_ids = []   # of the requests among them, to fail if the link is full
        self.size = 1           # packed: the batch code, then each message with its length


class MeshPoint:
    """Args:
        context: the process's zmq.Context.
        bind: address for the ROUTER, e.g. `tcp://127.0.0.1:0`.
        timeout: default seconds a request may take.
        max_pending_bytes: bytes of requests one peer has not answered yet; past it, requests
            to that peer fail at once (a frozen peer must not grow this node's memory for a
            whole forward timeout).
        key: the ClusterKey every socket here uses.
        max_bytes: the largest mesh message sent or taken (mesh.max_mesh_bytes).
        local_links: whether peers of this host are reached over local links (node.mesh.local_links).

    `handle_request(peer_routing_id, mesh.Request)` serves what peers ask (set
    it before the loop runs): it returns the result bytes, an awaitable of
    them, or None for a request that wants no reply.
    """

    def __init__(self, context: zmq.Context, bind: str, timeout: float, max_pending_bytes: int, key,
                 max_bytes: int, local_links: bool = False):
        self.timeout = timeout
        self.max_pending_bytes, self.max_bytes = max_pending_bytes, max_bytes
        self.handle_request = None
        self._loop = asyncio.get_running_loop()   # once: on Python 3.11 each lookup is a getpid() system call
        self.refused = 0          # requests and replies dropped by the readers of cluster/mesh.py
        self._bad_log = Throttled(log)
        socket = new_socket(context, zmq.ROUTER, _HWM, key, max_bytes)
        if bind.endswith(":0"):
            port = socket.bind_to_random_port(bind[:-2])
            self.address = f"{bind[:-2]}:{port}"
        else:
            socket.bind(bind)
            self.address = bind
        self.router = ZSocket(socket, self.on_request)
        self._material = key_material(key) if local_links else None
        self.local = None   # the LocalListener, once listen_local ran
        self.links = PeerLinks(context, key, _HWM, max_bytes, self.on_reply,   # the node sets links.on_up
                               (self._material, max_pending_bytes + max_bytes) if local_links else None)
        self.links.on_down = lambda node_id, why: self._fail(node_id, LinkDown, why)
        self._pending = {}      # request id -> (future, time sent, node_id, size, kind)
        # (deadline, request id); answered ids are skipped when they come up. One timeout for nearly every
        # request keeps their deadlines in the order they were made: a deque, not a heap (O(1), not log n).
        self._deadlines = collections.deque()
        self._own_deadlines = []   # heap of the requests with a timeout of their own
        self._peer_bytes = {}   # node_id -> bytes of its pending requests
        self._out = {}          # node_id -> _Batch of requests for the end of this turn
        self._replies = {}      # peer routing id -> _Batch of replies for the end of this turn
        self._flush_scheduled = False
        self._counter = 0
        self.timeouts = 0
        self.round_trips = Timings()   # (peer node id,) -> request to reply (node/metrics.py)
        self._sweep_s = max(10, min(100, timeout * 250)) / 1000
        self._swept = time.monotonic()   # when the last sweep ran
        self._sweeper = PeriodicCallback(self.sweep, self._sweep_s * 1000)
        self._sweeper.start()

    def close(self) -> None:
        self._sweeper.stop()
        for node_id in self.links.node_ids():
            self.disconnect(node_id)
        if self.local is not None:
            self.local.close()
        self.router.close()

    def local_refused(self) -> int:
        return self.local.refused if self.local is not None else 0

    def listen_local(self, address: str) -> None:
        """Takes local links from peers of this host, named after this node's mesh address as peers know it."""
        name = socket_name(address) if self._material is not None else None
        if name is None:
            return
        try:
            self.local = LocalListener(name, self._material, self.max_bytes, self.on_request)
        except OSError as exc:
            log.warning("no local mesh socket for %s (%s); peers of this host use ZeroMQ", address, exc)

    # --- peers -------------------------------------------------------------

    def connect(self, node_id: int, address: str, own_id: int) -> None:
        """Opens (or re-opens) the DEALER link to a peer's mesh point."""
        self.disconnect(node_id)
        self.links.open(node_id, address, own_id)

    def disconnect(self, node_id: int) -> None:
        """Drops the link to a peer; its pending requests fail at once with PeerUnavailable."""
        self.links.close(node_id)
        self._fail(node_id, PeerUnavailable, f"node {node_id} left the mesh")

    def _fail(self, node_id: int, error: type, message: str, request_ids=None) -> None:
        """Fails requests to a peer with `error(message)`: `request_ids`, or all (and its batch of this turn)."""
        if request_ids is None:
            self._out.pop(node_id, None)
            request_ids = [request_id for request_id, entry in self._pending.items() if entry[2] == node_id]
        for request_id in request_ids:
            entry = self._pending.pop(request_id, None)
            if entry is not None:   # its deadline is skipped when it comes up
                self._settled(node_id, entry[3])
                if not entry[0].done():
                    self._failed_now(entry[0], error(message))   # (a full link fails a batch inside request())

    def connected(self) -> list:   # up or down
        return self.links.node_ids()

    def reachable(self, node_id: int) -> bool:
        """Whether requests to a peer are sent now (a link, and not down)."""
        return self.links.usable(node_id) is not None

    # --- outbound ----------------------------------------------------------

    def notify(self, node_id: int, message: mesh.Outbound) -> None:
        """Sends a request that wants no reply; dropped when the peer is unknown or down, or its queue is full."""
        if self.links.usable(node_id) is None:
            return
        frames = mesh.frame_request(message, 0)
        if len(frames[0]) > self.max_bytes:
            log.warning("a %s to node %d is larger than the mesh takes; dropped", mesh.kind_name(message.kind), node_id)
            return
        self._queue(node_id, frames[0], 0)

    def request(self, node_id: int, message: mesh.Outbound, timeout: float = None, then=None):
        """Sends a request and returns a future of the peer's result (cluster/mesh.py, read_result).

        The future fails with a PeerError: PeerUnavailable (unknown peer, link
        full, too much unanswered, peer dropped), PeerUnreachable (its link is
        down), LinkDown (it went down meanwhile), PeerTimeout (no reply within
        `timeout`), BadReply, or TooLarge.

        With `then`, no Future: `then(outcome)` is called with an `Outcome` (done, with the same result
        or error) as soon as the reply or the error is there, or in the next turn when the request
        fails at once; that Outcome is returned. `then` may also be an Outcome the caller made, whose
        function is set later (`Outcome.when_done`). For the requests made once per event or per API
        request, where a Future and its loop turn cost more than the rest of the bookkeeping.
        """
        if then is None:
            future = self._loop.create_future()
        else:
            future = then if isinstance(then, Outcome) else Outcome(then)
        if self.links.usable(node_id) is None:
            return self._failed_now(future, PeerUnreachable(f"node {node_id} is unreachable (its mesh link is down)")
                                    if self.links.known(node_id) else PeerUnavailable(f"node {node_id} is not in the mesh"))
        size = len(message.body)
        waiting = self._peer_bytes.get(node_id, 0)
        if waiting + size > self.max_pending_bytes:
            return self._failed_now(future, PeerUnavailable(f"node {node_id} has {waiting} bytes of requests unanswered"))
        self._counter += 1
        request_id = self._counter
        frame = mesh.request_frame(message, request_id)
        if len(frame) > self.max_bytes:
            return self._failed_now(future, TooLarge(f"a {len(frame)}-byte request is larger than the mesh "
                                                     f"takes ({self.max_bytes} bytes)"))
        now = time.monotonic()
        self._pending[request_id] = (future, now, node_id, size, message.kind)
        if timeout is None:
            self._deadlines.append((now + self.timeout, request_id))
        else:
            heapq.heappush(self._own_deadlines, (now + timeout, request_id))
        self._peer_bytes[node_id] = waiting + size
        self._add(self._out, node_id, frame, request_id, self._send_batch)
        return future

    def _failed_now(self, future, error: Exception):
        """Fails a request that may still be inside its own `request()` call: an Outcome's `then`
        runs in the next turn, as a Future's callbacks would."""
        if isinstance(future, Outcome):
            self._loop.call_soon(future.set_exception, error)
        else:
            future.set_exception(error)
        return future

    def _queue(self, node_id: int, frame: bytes, request_id: int) -> None:
        self._add(self._out, node_id, frame, request_id, self._send_batch)

    def _add(self, batches: dict, key, frame: bytes, request_id: int, send) -> None:
        """Adds a message to the batch of `key` (a peer) in `batches`; `send(key, batch)` sends one."""
        added = len(frame) + mesh.PACKED_HEAD
        batch = batches.get(key)
        if batch is not None and batch.size + added > self.max_bytes:
            send(key, batches.pop(key))   # a batch is one frame: it stays within what the peer takes
            batch = None
        if batch is None:
            batch = batches[key] = _Batch()
        messages = batch.messages
        messages.append(frame)
        batch.size += added
        if request_id:
            batch.request_ids.append(request_id)
        if len(messages) >= _SEND_AT:
            send(key, batches.pop(key))
        elif not self._flush_scheduled:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """The end of the turn: each peer's requests, and each peer's replies, leave as one message."""
        self._flush_scheduled = False
        requests, self._out = self._out, {}
        for node_id, batch in requests.items():
            self._send_batch(node_id, batch)
        replies, self._replies = self._replies, {}
        for peer, batch in replies.items():
            self._send_replies(peer, batch)

    def _send_batch(self, node_id: int, batch: "_Batch") -> None:
        try:
            self.links.usable(node_id).send([mesh.pack(batch.messages)])
        except zmq.Again:
            log.warning("mesh link to node %d is full; %d messages not sent", node_id, len(batch.messages))
            self._fail(node_id, PeerUnavailable, f"mesh link to node {node_id} is full", batch.request_ids)

    def _settled(self, node_id: int, size: int) -> None:
        left = self._peer_bytes.get(node_id, 0) - size
        if left > 0:
            self._peer_bytes[node_id] = left
        else:
            self._peer_bytes.pop(node_id, None)

    def on_reply(self, frames: list) -> None:
        try:
            replies = mesh.read_replies(frames)
        except mesh.FrameError as exc:
            self.refused += 1
            self._bad_log.warning("dropped a bad mesh reply: %s", exc)
            return
        now = time.monotonic()
        pending, round_trips = self._pending, self.round_trips
        for reply in replies:   # (once per forwarded request: no more calls than it needs)
            if reply is None:
                self.refused += 1
                self._bad_log.warning("dropped a bad mesh reply: not a mesh reply")
                continue
            request_id, raw = reply
            entry = pending.pop(request_id, None)
            if entry is None:
                continue
            future, sent, node_id, size, kind = entry
            self._settled(node_id, size)
            round_trips.observe((node_id,), now - sent)
            if future.done():
                continue
            try:
                result = mesh.read_result(kind, raw)
            except mesh.FrameError as exc:
                self.refused += 1
                self._bad_log.warning("dropped a bad %s reply from node %d: %s", mesh.kind_name(kind), node_id, exc)
                future.set_exception(BadReply(f"node {node_id} sent a reply that could not be read"))
                continue
            future.set_result(result)

    def sweep(self) -> None:
        """Fails the requests whose deadline passed with PeerTimeout.

        After a turn that held the loop up (a sweep later than one and a half periods), only those
        already due at the sweep before: uvloop runs its timers before it reads its sockets, so a
        reply that came in time, during that turn, is still unread here. Its turn to be read comes
        before the next sweep, which fails whatever is still waiting; a loop held up turn after turn
        still ends each request, a turn later.
        """
        now = time.monotonic()
        due = self._swept if now - self._swept > 1.5 * self._sweep_s else now
        self._swept = now
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= due:
            self._expire(deadlines.popleft()[1])
        deadlines = self._own_deadlines
        while deadlines and deadlines[0][0] <= due:
            self._expire(heapq.heappop(deadlines)[1])

    def _expire(self, request_id: int) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is None:   # answered (or its peer dropped) already
            return
        future, _, node_id, size, _ = entry
        self._settled(node_id, size)
        self.timeouts += 1
        if not future.done():
            future.set_exception(PeerTimeout(f"node {node_id} did not answer in time"))

    # --- inbound -----------------------------------------------------------

    def on_request(self, frames: list) -> None:
        peer = bytes(frames[0])
        try:
            frames = mesh.batch(frames[1:])
        except mesh.FrameError as exc:
            self.refused += 1
            self._bad_log.warning("dropped a bad mesh request from %r: %s", peer[:64], exc)
            return
        # Replies leave before what the requests wrote to clients: this batch's at once, after it is
        # served (the peer waits for them; the rest of this turn may be a long fan-out), and any that
        # come later in the turn at its end, with the flush queued first.
        self._schedule_flush()
        for frame in frames:
            self._on_request(peer, frame)
        replies = self._replies.pop(peer, None)
        if replies is not None:
            self._send_replies(peer, replies)

    def _on_request(self, peer: bytes, frame) -> None:
        try:
            request = mesh.read_request([frame])
        except mesh.FrameError as exc:
            self.refused += 1
            self._bad_log.warning("dropped a bad mesh request from %r: %s", peer[:64], exc)
            return
        try:
            result = self.handle_request(peer, request)
        except Exception:
            log.exception("mesh request %s from %r failed", type(request.message).__name__, peer[:64])
            result = _INTERNAL_ERROR
        if type(result) is not bytes and (asyncio.iscoroutine(result) or asyncio.isfuture(result)):
            asyncio.ensure_future(self._reply_later(peer, request, result))   # (asking is slow for bytes: an ABC)
        elif request.request_id:
            self.send_reply(peer, request.request_id, result)

    async def _reply_later(self, peer: bytes, request: mesh.Request, awaitable) -> None:
        try:
            result = await awaitable
        except Exception:
            log.exception("mesh request %s from %r failed", type(request.message).__name__, peer[:64])
            result = _INTERNAL_ERROR
        if request.request_id:
            self.send_reply(peer, request.request_id, result)

    def send_reply(self, peer: bytes, request_id: int, result: bytes) -> None:
        """Queues a reply for the end of the turn, with the peer's other replies."""
        frames = mesh.frame_reply(request_id, result)
        if len(frames[0]) > self.max_bytes:   # a context an entry filled beyond what the mesh carries
            frames = mesh.frame_reply(request_id, mesh.failure(
                ErrorCode.CALL_FAILED, f"the reply ({len(result)} bytes) is larger than the mesh carries"))
        self._add(self._replies, peer, frames[0], 0, self._send_replies)

    def _send_replies(self, peer: bytes, batch: "_Batch") -> None:
        payload = mesh.pack(batch.messages)
        if self.local is not None and self.local.send(peer, payload):
            return
        try:
            self.router.send([peer, payload])
        except zmq.Again:
            log.warning("%d mesh replies dropped: peer link full", len(batch.messages))
        except zmq.ZMQError as exc:
            log.warning("%d mesh replies dropped: %s", len(batch.messages), exc)


class Outcome:
    """A request's outcome for `request(..., then=...)`: the little of a Future its callers use
    (`done`, `result`, `exception`), set once, handed to `then` right away."""
    __slots__ = ("_then", "_result", "_error", "_done")

    def __init__(self, then=None):
        self._then, self._result, self._error, self._done = then, None, None, False

    def when_done(self, then) -> None:
        """`then(self)` once it is done: now, if it is already."""
        self._then = then
        if self._done:
            self._call()

    def future(self) -> asyncio.Future:
        """A Future done when this is (its result None): for a coroutine that awaits it."""
        future = asyncio.get_running_loop().create_future()
        self.when_done(lambda _: future.done() or future.set_result(None))
        return future

    def done(self) -> bool:
        return self._done

    def result(self):
        if self._error is not None:
            raise self._error
        return self._result

    def exception(self):
        return self._error

    def set_result(self, result) -> None:
        self._result, self._done = result, True
        self._call()

    def set_exception(self, error: Exception) -> None:
        self._error, self._done = error, True
        self._call()

    def _call(self) -> None:
        if self._then is None:   # nobody waits yet: `when_done` calls it
            return
        try:
            self._then(self)
        except Exception:   # as the loop does for a Future's callback: logged, the other replies go on
            log.exception("a mesh reply's callback failed")


_INTERNAL_ERROR = mesh.failure(ErrorCode.MESH_UNAVAILABLE, "internal error on the peer")
