"""The mesh between nodes of one host over Unix sockets, where ZeroMQ's threads would stand in the way.

A ZeroMQ message from one node to another passes four threads (the sender,
its I/O thread, the receiver's I/O thread, the receiver), and on a busy host
each hand-over may wait for a core: measured on two cores, a forwarded
publish waited milliseconds for its reply. Between two nodes of one host this
module carries the same mesh messages over a Unix socket instead, written and
read by the nodes' own event loops: one hand-over each way.

- Each node listens on an abstract Unix socket named after its mesh address
  (`socket_name`; Linux, where such names belong to the network namespace,
  as the TCP address does). A peer whose address names a socket here connects
  to it; on another host there is none, and the peer's ZeroMQ link carries
  the messages as before.
- Neither side sends a mesh message before both have shown that they hold
  the cluster key (an abstract socket has no file permissions, so anyone on
  the host may connect): the listener sends MAGIC and a nonce, the connecting
  node its own nonce and an HMAC of both, the listener an HMAC of both the
  other way (`_proof`). A connection that does not complete this within
  HANDSHAKE_S, or shows a wrong proof, is closed and counted (`refused`).
- Then each message is a 4-byte length and a packed batch (cluster/mesh.py,
  `pack`), at most `max_bytes`; a longer one closes the connection. What
  waits to be written is bounded (`max_buffer`): past it a send raises
  zmq.Again, as a full ZeroMQ link does.
- On by default (node.mesh.local_links): on two cores it raised pipelined
  cross-node sends and publishes; a stream of small one-way messages (queue
  events) went about 8 % slower, the socket work then falling on the busiest
  thread instead of ZeroMQ's I/O threads.
- Liveness stays ZeroMQ's (node/peer_links.py keeps the peer's DEALER, its
  heartbeats and its monitor, and closes this link when that one goes down);
  a local connection that ends is a link down at once.

Owned by the node's IOLoop.
"""

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import sys
from functools import partial

import zmq

from cluster.logs import Throttled

log = logging.getLogger("meshgate.mesh")

MAGIC = b"meshgate-link/1\n"
HANDSHAKE_S = 1.0          # from connect to the last proof; then the peer's ZeroMQ link is used instead
MAX_HANDSHAKES = 64        # connections of the listener that have not shown the key yet; more are closed at once
_NONCE = 16
_MAC = 32
_LENGTH = 4

CONNECTING, OPEN, FAILED, CLOSED = "connecting", "open", "failed", "closed"


def socket_name(address: str):
    """The abstract Unix socket a node with mesh address `address` listens on; None where there is none."""
    return "\0meshgate-mesh " + address if sys.platform.startswith("linux") else None


def key_material(key) -> bytes:
    """What the proofs of local links are made with: derived from the cluster key, used for nothing else."""
    return hashlib.sha256(b"meshgate local link\0" + key.secret).digest()


def _proof(material: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(material, role + first + second, hashlib.sha256).digest()


class _Connection(asyncio.Protocol):
    """One local link connection, either end: the handshake (`_need` bytes for `_step`), then messages."""

    def __init__(self, material: bytes, max_bytes: int, on_frame, on_open, on_end):
        self.material, self.max_bytes = material, max_bytes
        self.on_frame, self.on_open, self.on_end = on_frame, on_open, on_end
        self.transport = None
        self.state = CONNECTING
        self._partial = bytearray()   # the start of what is not whole yet
        self._short = 0               # bytes `_partial` needs before anything can be read from it
        self._step, self._need = None, 0
        self._nonce = os.urandom(_NONCE)
        self._timer = None

    # --- the handshake --------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_S, self.fail, "no handshake in time", True)

    def _expect(self, size: int, step) -> None:
        self._need, self._step = size, step

    def _opened(self) -> None:
        self._step = None
        self.state = OPEN
        self._timer.cancel()
        self.on_open(self)

    def fail(self, why: str, refused: bool = False) -> None:
        """Ends the connection; `refused`: the other end broke the rules (a proof, a size, the time)."""
        if self.state in (FAILED, CLOSED):
            return
        was = self.state
        self.state = FAILED if was == CONNECTING else CLOSED
        self._step = None
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.abort()
        self.on_end(self, was, why, refused)

    def connection_lost(self, exc) -> None:
        self.fail("the connection closed" if exc is None else f"the connection failed ({exc})")

    # --- messages -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._partial:
            self._partial += data
            if len(self._partial) < self._short:   # a large message arriving in pieces: no copy per piece
                return
            data, self._partial = bytes(self._partial), bytearray()
        size, offset = len(data), 0
        while self._step is not None:
            if size - offset < self._need:
                self._keep(data, offset, self._need)
                return
            piece = data[offset:offset + self._need]
            offset += self._need
            self._step(piece)
            if self.state == FAILED:
                return
        while size - offset >= _LENGTH:
            length = int.from_bytes(data[offset:offset + _LENGTH], "big")
            if length > self.max_bytes:
                self.fail(f"a {length}-byte message, larger than the mesh takes", True)
                return
            end = offset + _LENGTH + length
            if end > size:
                self._keep(data, offset, _LENGTH + length)
                return
            self.on_frame(self, data[offset + _LENGTH:end])
            if self.state != OPEN:
                return
            offset = end
        if offset < size:
            self._keep(data, offset, _LENGTH)

    def _keep(self, data: bytes, offset: int, needed: int) -> None:
        self._partial = bytearray(data[offset:])
        self._short = needed

    def write(self, payload: bytes) -> None:
        self.transport.write(len(payload).to_bytes(_LENGTH, "big") + payload)

    def waiting(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0


class _Accepted(_Connection):
    """The listener's end: MAGIC and a nonce out; the peer's nonce and proof in; this end's proof out."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.write(MAGIC + self._nonce)
        self._expect(_NONCE + _MAC, self._check)

    def _check(self, piece: bytes) -> None:
        theirs, proof = piece[:_NONCE], piece[_NONCE:]
        if not hmac.compare_digest(proof, _proof(self.material, b"connect", self._nonce, theirs)):
            self.fail("it does not hold the cluster key", True)
            return
        self.transport.write(_proof(self.material, b"listen", theirs, self._nonce))
        self._opened()


class _Connected(_Connection):
    """The connecting end: the listener's MAGIC and nonce in; this end's nonce and proof out; the listener's in."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._expect(len(MAGIC) + _NONCE, self._greeted)

    def _greeted(self, piece: bytes) -> None:
        if piece[:len(MAGIC)] != MAGIC:
            self.fail("it is not a meshgate node", True)
            return
        self._theirs = piece[len(MAGIC):]
        self.transport.write(self._nonce + _proof(self.material, b"connect", self._theirs, self._nonce))
        self._expect(_MAC, self._answered)

    def _answered(self, proof: bytes) -> None:
        if not hmac.compare_digest(proof, _proof(self.material, b"listen", self._nonce, self._theirs)):
            self.fail("it does not hold the cluster key", True)
            return
        self._opened()


class LocalListener:
    """This node's end of the local links: takes peers' connections and hands their requests on.

    Args:
        name: the abstract socket name (`socket_name` of this node's mesh address).
        material: `key_material(key)`.
        max_bytes: the largest mesh message (mesh.max_mesh_bytes).
        on_request: called with `[peer, payload]` for each message, like a ROUTER's frames.

    `send(peer, payload)` writes a reply to a peer that came this way. `refused`
    counts connections closed for breaking the rules (the proof, the time, a size).

    Raises:
        OSError: the name is taken (another process listens on it).
    """

    def __init__(self, name: str, material: bytes, max_bytes: int, on_request):
        self.material, self.max_bytes, self.on_request = material, max_bytes, on_request
        self.refused = 0
        self._peers = {}          # peer id -> open _Accepted
        self._handshaking = set()
        self._counter = 0
        self._log = Throttled(log)
        self._loop = asyncio.get_running_loop()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._socket.setblocking(False)
            self._socket.bind(name)
            self._socket.listen(128)
        except OSError:
            self._socket.close()
            raise
        self._loop.add_reader(self._socket.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self._socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:   # out of descriptors: the next readiness tries again
                self._log.warning("local mesh link not accepted: %s", exc)
                return
            if len(self._handshaking) >= MAX_HANDSHAKES:
                self.refused += 1
                self._log.warning("refused a local mesh connection: %d others have not shown the key yet",
                                  MAX_HANDSHAKES)
                sock.close()
                continue
            self._counter += 1
            peer = b"local-%d" % self._counter
            connection = _Accepted(self.material, self.max_bytes, partial(self._frame, peer),
                                   partial(self._open, peer), partial(self._end, peer))
            self._handshaking.add(connection)
            made = asyncio.ensure_future(self._loop.connect_accepted_socket(lambda c=connection: c, sock))
            made.add_done_callback(partial(_made, connection, sock))

    def _frame(self, peer: bytes, connection, payload: bytes) -> None:
        self.on_request([peer, payload])

    def _open(self, peer: bytes, connection: _Accepted) -> None:
        self._handshaking.discard(connection)
        self._peers[peer] = connection

    def _end(self, peer: bytes, connection, was: str, why: str, refused: bool) -> None:
        self._handshaking.discard(connection)
        self._peers.pop(peer, None)
        if refused:
            self.refused += 1
            self._log.warning("refused a local mesh connection: %s", why)

    def send(self, peer: bytes, payload: bytes) -> bool:
        """Writes to a peer of this listener; False when `peer` is not one (a ZeroMQ peer, or gone)."""
        connection = self._peers.get(peer)
        if connection is None:
            return False
        connection.write(payload)
        return True

    def close(self) -> None:
        self._loop.remove_reader(self._socket.fileno())
        self._socket.close()
        for connection in list(self._peers.values()) + list(self._handshaking):
            connection.fail("closing")


class LocalLink:
    """The connecting end of one local link, to one peer: what is sent before it is open waits, in order.

    Args:
        name: the peer's abstract socket name.
        material: `key_material(key)`.
        max_bytes: the largest mesh message.
        max_buffer: bytes that may wait to be written; past it `send` raises zmq.Again (a link with
            nothing waiting takes any one message).
        on_reply: called with `[payload]` for each message from the peer (replies).
        on_end: called with `(link, was_open, why, waiting)` when it fails to open (then `waiting`,
            the payloads sent meanwhile, are for ZeroMQ to carry) or, once open, when it ends.

    A link whose peer has no local socket is FAILED from the start (`why` says so); nothing is called.
    """

    def __init__(self, name: str, material: bytes, max_bytes: int, max_buffer: int, on_reply, on_end):
        self.max_buffer = max_buffer
        self._on_reply, self._on_end = on_reply, on_end
        self._waiting, self._waiting_bytes = [], 0
        self._connection = _Connected(material, max_bytes, self._frame, self._open, self._end)
        self.why = ""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(name)   # a Unix socket connects at once or not at all (EAGAIN: its backlog is full)
        except OSError as exc:
            sock.close()
            self._connection.state = FAILED
            self.why = f"no local socket ({exc.strerror or exc})"
            return
        made = asyncio.ensure_future(asyncio.get_running_loop().create_unix_connection(
            lambda: self._connection, sock=sock))
        made.add_done_callback(partial(_made, self._connection, sock))

    @property
    def state(self) -> str:
        return self._connection.state

    def send(self, frames: list) -> None:
        """Writes `[payload]` (the interface of ZSocket.send), or keeps it until the link is open.

        Raises:
            zmq.Again: more than `max_buffer` bytes wait already.
        """
        payload = frames[0]
        connection = self._connection
        if connection.state == OPEN:
            waiting = connection.waiting()
            if waiting and waiting + len(payload) > self.max_buffer:   # an empty link takes any one message
                raise zmq.Again()
            connection.write(payload)
        elif self._waiting_bytes and self._waiting_bytes + len(payload) > self.max_buffer:
            raise zmq.Again()
        else:
            self._waiting.append(payload)
            self._waiting_bytes += len(payload)

    def _frame(self, connection, payload: bytes) -> None:
        self._on_reply([payload])

    def _open(self, connection) -> None:
        waiting, self._waiting, self._waiting_bytes = self._waiting, [], 0
        for payload in waiting:
            connection.write(payload)

    def _end(self, connection, was: str, why: str, refused: bool) -> None:
        waiting, self._waiting, self._waiting_bytes = self._waiting, [], 0
        self.why = why
        self._on_end(self, was == OPEN, why, waiting)

    def close(self) -> None:
        """Ends the link without a word to its owner (who is replacing or dropping it)."""
        self._on_end = _ignore
        self._connection.fail("closed")


def _made(connection: _Connection, sock: socket.socket, made: asyncio.Future) -> None:
    """A connection the loop could not take on (no protocol ever ran): ended like any other."""
    if not made.cancelled() and made.exception() is not None:
        sock.close()
        connection.fail(f"the loop did not take the connection ({made.exception()})")


def _ignore(*_args) -> None:
    pass
