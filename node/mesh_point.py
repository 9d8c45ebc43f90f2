"""This node's mesh point (ROUTER) and its links to peers (one DEALER each).

Request/reply correlation and per-request deadlines live here: every
forwarded request ends within its timeout, as a reply, `PeerTimeout` or
`PeerUnavailable`. Deadlines sit in a heap checked by one periodic sweep, not a timer per
request. Owned by the node's IOLoop.
"""

import asyncio
import heapq
import logging
import time

import zmq
from tornado.ioloop import PeriodicCallback

from cluster import mesh
from cluster.zloop import ZSocket

log = logging.getLogger("meshgate.mesh")

_HWM = 100000


class PeerUnavailable(Exception):
    """The peer is not in the routing table (dead, or never known)."""


class PeerTimeout(Exception):
    """The peer did not answer within the forward timeout."""


class MeshPoint:
    """Args:
        context: the process's zmq.Context.
        bind: address for the ROUTER, e.g. `tcp://127.0.0.1:0`.
        handle_request: `(peer_routing_id, MeshRequest) -> result | awaitable | None`;
            the result is sent back when the request asked for a reply.
        timeout: default seconds a request may take.
        max_pending_bytes: bytes of requests one peer has not answered yet; past it, requests
            to that peer fail at once (a frozen peer must not grow this node's memory for a
            whole forward timeout).
    """

    def __init__(self, context: zmq.Context, bind: str, handle_request, timeout: float, max_pending_bytes: int):
        self.context = context
        self.max_pending_bytes = max_pending_bytes
        self.timeout = timeout
        self.handle_request = handle_request
        socket = context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, _HWM)
        socket.setsockopt(zmq.RCVHWM, _HWM)
        if bind.endswith(":0"):
            port = socket.bind_to_random_port(bind[:-2])
            self.address = f"{bind[:-2]}:{port}"
        else:
            socket.bind(bind)
            self.address = bind
        self.router = ZSocket(socket, self.on_request)
        self.routing_id = b""
        self._peers = {}        # node_id -> ZSocket (DEALER)
        self._pending = {}      # request id -> (future, deadline, node_id, size)
        self._deadlines = []    # heap of (deadline, request id); answered ids are skipped when they come up
        self._peer_bytes = {}   # node_id -> bytes of its pending requests
        self._counter = 0
        self.timeouts = 0
        self._sweeper = PeriodicCallback(self.sweep, max(10, min(100, timeout * 250)))
        self._sweeper.start()

    def close(self) -> None:
        self._sweeper.stop()
        for node_id in list(self._peers):
            self.disconnect(node_id)
        self.router.close()

    # --- peers -------------------------------------------------------------

    def connect(self, node_id: int, address: str, own_id: int) -> None:
        """Opens (or re-opens) the DEALER link to a peer's mesh point."""
        self.disconnect(node_id)
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, _HWM)
        socket.setsockopt(zmq.RCVHWM, _HWM)
        socket.setsockopt(zmq.ROUTING_ID, b"n%d-%d" % (own_id, time.monotonic_ns()))
        socket.connect(address)
        self._peers[node_id] = ZSocket(socket, self.on_reply)

    def disconnect(self, node_id: int) -> None:
        """Drops the link to a peer; its pending requests fail at once with PeerUnavailable."""
        stream = self._peers.pop(node_id, None)
        if stream is not None:
            stream.close()
        for request_id, (future, _, owner, _) in list(self._pending.items()):
            if owner == node_id:   # their heap entries are skipped when they come up
                del self._pending[request_id]
                if not future.done():
                    future.set_exception(PeerUnavailable(f"node {node_id} left the mesh"))
        self._peer_bytes.pop(node_id, None)

    def connected(self) -> list:
        return list(self._peers)

    # --- outbound ----------------------------------------------------------

    def notify(self, node_id: int, kind: bytes, header, body: bytes = b"") -> None:
        """Sends a request that wants no reply; silently dropped when the peer is unknown or its queue is full."""
        stream = self._peers.get(node_id)
        if stream is None:
            return
        try:
            stream.send(mesh.request(kind, 0, header, body))
        except zmq.Again:
            log.warning("mesh link to node %d is full; dropped a %s", node_id, kind.decode())

    def request(self, node_id: int, kind: bytes, header, body: bytes = b"", timeout: float = None) -> asyncio.Future:
        """Sends a request and returns a future of the peer's reply.

        The future fails with PeerUnavailable (unknown peer, link full, peer
        dropped) or PeerTimeout (no reply within `timeout`).
        """
        future = asyncio.get_running_loop().create_future()
        stream = self._peers.get(node_id)
        if stream is None:
            future.set_exception(PeerUnavailable(f"node {node_id} is not in the mesh"))
            return future
        size = len(body)
        waiting = self._peer_bytes.get(node_id, 0)
        if waiting + size > self.max_pending_bytes:
            future.set_exception(PeerUnavailable(f"node {node_id} has {waiting} bytes of requests unanswered"))
            return future
        self._counter += 1
        request_id = self._counter
        try:
            stream.send(mesh.request(kind, request_id, header, body))
        except zmq.Again:
            future.set_exception(PeerUnavailable(f"mesh link to node {node_id} is full"))
            return future
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._pending[request_id] = (future, deadline, node_id, size)
        heapq.heappush(self._deadlines, (deadline, request_id))
        self._peer_bytes[node_id] = waiting + size
        return future

    def _settled(self, node_id: int, size: int) -> None:
        left = self._peer_bytes.get(node_id, 0) - size
        if left > 0:
            self._peer_bytes[node_id] = left
        else:
            self._peer_bytes.pop(node_id, None)

    def on_reply(self, frames: list) -> None:
        try:
            request_id, result = mesh.read_reply(frames)
        except mesh.FrameError as exc:
            log.warning("bad mesh reply: %s", exc)
            return
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        self._settled(entry[2], entry[3])
        if not entry[0].done():
            entry[0].set_result(result)

    def sweep(self) -> None:
        now = time.monotonic()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, request_id = heapq.heappop(deadlines)
            entry = self._pending.pop(request_id, None)
            if entry is None:   # answered (or its peer dropped) already
                continue
            future, _, node_id, size = entry
            self._settled(node_id, size)
            self.timeouts += 1
            if not future.done():
                future.set_exception(PeerTimeout(f"node {node_id} did not answer in time"))

    # --- inbound -----------------------------------------------------------

    def on_request(self, frames: list) -> None:
        peer = bytes(frames[0])
        try:
            message = mesh.read_request(frames[1:])
        except mesh.FrameError as exc:
            log.warning("bad mesh request from %r: %s", peer, exc)
            return
        try:
            result = self.handle_request(peer, message)
        except Exception:
            log.exception("mesh request %s from %r failed", message.kind.decode(), peer)
            result = {"e": 501, "m": "internal error on the peer"}
        if not message.request_id:
            if asyncio.isfuture(result) or asyncio.iscoroutine(result):
                asyncio.ensure_future(result)
            return
        if asyncio.iscoroutine(result) or asyncio.isfuture(result):
            asyncio.ensure_future(self._reply_later(peer, message, result))
        else:
            self.send_reply(peer, message.request_id, result)

    async def _reply_later(self, peer: bytes, message, awaitable) -> None:
        try:
            result = await awaitable
        except Exception:
            log.exception("mesh request %s from %r failed", message.kind.decode(), peer)
            result = {"e": 501, "m": "internal error on the peer"}
        self.send_reply(peer, message.request_id, result)

    def send_reply(self, peer: bytes, request_id: int, result) -> None:
        try:
            frames = mesh.reply(request_id, result)
        except (TypeError, OverflowError, ValueError) as exc:   # never leave a peer waiting for nothing
            log.error("mesh reply could not be encoded: %s", exc)
            frames = mesh.reply(request_id, {"e": 501, "m": "the reply could not be encoded"})
        try:
            self.router.send([peer, *frames])
        except zmq.Again:
            log.warning("mesh reply dropped: peer link full")
        except zmq.ZMQError as exc:
            log.warning("mesh reply dropped: %s", exc)
