"""ZeroMQ sockets of the cluster: made alike (`new_socket`), let in by the cluster key (`ZapHandler`),
read on the running asyncio loop in batches (`ZSocket`).

ZeroMQ signals readiness through an edge-triggered file descriptor, and any
operation on the socket (a send included) may consume the edge. So after every
read batch and every send we check `EVENTS` once more on the next loop turn
(one coalesced callback, not one per message). Owned by one loop.
"""

import asyncio
import logging

import zmq
from zmq.utils import z85

from cluster.logs import Throttled

log = logging.getLogger("meshgate.mesh")

_BATCH = 512


ZAP_DOMAIN = b"meshgate"


def new_socket(context: zmq.Context, kind: int, hwm: int, key, max_bytes: int, routing_id: bytes = None) -> zmq.Socket:
    """A socket with what every socket of the cluster has: the cluster key, no linger, bounded queues and messages.

    A ROUTER serves with the cluster key (CURVE) and lets the process's ZapHandler
    decide who may connect; a DEALER connects with the key as its own and as the
    server's. A peer that sends a message over `max_bytes` is disconnected by ZeroMQ.

    Args:
        kind: zmq.ROUTER or zmq.DEALER.
        hwm: messages that may wait in each direction (ZeroMQ's high-water marks).
        key: the ClusterKey (cluster/cluster_key.py).
        max_bytes: the largest message taken from the network (ZMQ_MAXMSGSIZE).
        routing_id: a DEALER's fixed identity, if it needs one.
    """
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, hwm)
    socket.setsockopt(zmq.RCVHWM, hwm)
    socket.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    socket.curve_secretkey = key.secret
    socket.curve_publickey = key.public
    if kind == zmq.ROUTER:
        socket.curve_server = True
        socket.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)   # no handler, no connection
    else:
        socket.curve_serverkey = key.public
    if routing_id is not None:
        socket.setsockopt(zmq.ROUTING_ID, routing_id)
    return socket


class ZapHandler:
    """This process's ZAP handler (ZeroMQ RFC 27): only connections that hold the cluster key get in.

    Bind it before any socket of `new_socket` serves. `refused` counts the
    handshakes it turned away; each is logged, at most once a second.

    Args:
        context: the process's zmq.Context.
        key: the ClusterKey.
    """

    def __init__(self, context: zmq.Context, key):
        socket = context.socket(zmq.REP)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind("inproc://zeromq.zap.01")
        self._allowed = z85.decode(key.public)
        self.refused = 0
        self._log = Throttled(log)
        self.stream = ZSocket(socket, self.on_request)

    def on_request(self, frames: list) -> None:
        frames = [bytes(frame) for frame in frames] + [b""] * (7 - len(frames))
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        allowed = domain == ZAP_DOMAIN and mechanism == b"CURVE" and credentials[:1] == [self._allowed]
        if not allowed:
            self.refused += 1
            self._log.warning("refused a %s connection from %s: it does not hold the cluster key",
                              mechanism.decode("ascii", "replace")[:10] or "?", address.decode("ascii", "replace")[:64])
        self.stream.send([version, request_id, b"200" if allowed else b"400",
                          b"OK" if allowed else b"the cluster key is required", b"", b""])

    def close(self) -> None:
        self.stream.close()


class ZSocket:
    """Args:
        socket: a zmq socket (not shared with anything else).
        on_message: called with the list of frames of each message received.
        copy: False hands `on_message` zmq.Frame objects, whose `get("Peer-Address")` says where a
            message came from; True (faster for small messages) hands it bytes.
    """

    def __init__(self, socket: zmq.Socket, on_message, copy: bool = True):
        self.socket = socket
        self.on_message = on_message
        self._copy = copy
        self._loop = asyncio.get_running_loop()
        self._fd = socket.getsockopt(zmq.FD)
        self._scheduled = False
        self._closed = False
        self._loop.add_reader(self._fd, self._drain)
        self._schedule()

    def send(self, frames: list) -> None:
        """Sends without blocking.

        Raises:
            zmq.Again: the socket's queue is full (its high-water mark).
        """
        self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        socket = self.socket
        for _ in range(_BATCH):
            try:   # until EAGAIN: then the descriptor signals the next arrival again
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=self._copy)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("zmq receive failed: %s", exc)
                return
            try:
                self.on_message(frames)
            except Exception:
                log.exception("zmq message handler failed")
            if self._closed:
                return
        self._schedule()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self.socket.close(linger=0)
