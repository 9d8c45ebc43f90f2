"""ZeroMQ sockets of the cluster: made alike (`new_socket`), read on the running asyncio loop in batches.

ZeroMQ signals readiness through an edge-triggered file descriptor, and any
operation on the socket (a send included) may consume the edge. So after every
read batch and every send we check `EVENTS` once more on the next loop turn
(one coalesced callback, not one per message). Owned by one loop.
"""

import asyncio
import logging

import zmq

log = logging.getLogger("meshgate.mesh")

_BATCH = 512


def new_socket(context: zmq.Context, kind: int, hwm: int, routing_id: bytes = None) -> zmq.Socket:
    """A socket with what every socket of the cluster has: no linger, bounded queues both ways.

    Args:
        kind: zmq.ROUTER or zmq.DEALER.
        hwm: messages that may wait in each direction (ZeroMQ's high-water marks).
        routing_id: a DEALER's fixed identity, if it needs one.
    """
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, hwm)
    socket.setsockopt(zmq.RCVHWM, hwm)
    if routing_id is not None:
        socket.setsockopt(zmq.ROUTING_ID, routing_id)
    return socket


class ZSocket:
    """Args:
        socket: a zmq socket (not shared with anything else).
        on_message: called with the list of frames of each message received.
    """

    def __init__(self, socket: zmq.Socket, on_message):
        self.socket = socket
        self.on_message = on_message
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
                frames = socket.recv_multipart(zmq.NOBLOCK)
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
