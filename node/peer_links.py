"""This node's links to its peers' mesh points (one DEALER each), and which of them are up.

Each link is watched so that a peer that is gone is noticed without waiting
for the coordinator (which may be gone too):

- a socket monitor: a closed connection (a peer process that died: its kernel
  closes the connection at once), a refused connection or a failed handshake
  puts the link down at once;
- ZeroMQ heartbeats (`ZMQ_HEARTBEAT_IVL`, `ZMQ_HEARTBEAT_TIMEOUT`,
  `ZMQ_HEARTBEAT_TTL`; a handshake is bounded by `ZMQ_HANDSHAKE_IVL`): a peer
  whose machine vanished, or whose process is frozen, is put down after
  HEARTBEAT_TIMEOUT_MS without an answer. ZeroMQ's I/O thread answers them,
  not the peer's event loop: a peer busy in a long loop turn still does.

With node.mesh.local_links (on by default), a peer of the same host also gets a
local link (node/local_links.py): once it is open, mesh messages go that way,
and while it opens they wait for it; a peer without one (another host) gets
them through ZeroMQ. A local link that ends is the link going down; the
ZeroMQ link going down closes the local one, which is opened again when
ZeroMQ's is back up.

A link is usable while it connects for the first time and while it is up; once
down it is up again when a handshake with the same mesh point succeeds. Going
down, the link is opened afresh, so that nothing queued on it reaches the peer
later (the mesh point fails those requests: `on_down(node_id, why)`);
coming back, `on_up(node_id)`. A link going down never removes a peer: only the
coordinator's tables do (node/node.py, `on_changes`). Owned by the node's IOLoop.
"""

import itertools
import logging
import time
from functools import partial

import zmq
from zmq.utils.monitor import parse_monitor_message

from cluster.logs import Throttled
from cluster.zloop import ZSocket, new_socket
from node.local_links import FAILED, OPEN, LocalLink, socket_name

log = logging.getLogger("meshgate.mesh")

# Fixed (docs/operations.md, Failure behaviour): a closed connection needs no timer; a silent peer is put down
# after this long, well beyond any loop turn, which the heartbeats do not depend on anyway.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000
HEARTBEAT_TTL_MS = 5000       # what the peer is told: close the link after this long without a heartbeat
HANDSHAKE_MS = 5000           # a peer that takes the connection but never completes the handshake (frozen)
RECONNECT_MAX_MS = 1000       # a peer that refuses connections is tried after 0.1 s, backing off to this

_UP = zmq.EVENT_HANDSHAKE_SUCCEEDED
_DOWN = {
    zmq.EVENT_DISCONNECTED: "connection closed, or heartbeats unanswered",
    zmq.EVENT_CONNECT_RETRIED: "connection refused",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake refused",
}
_EVENTS = _UP | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL \
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
_monitor_names = itertools.count(1)


class _Link:
    __slots__ = ("address", "own_id", "stream", "monitor", "down", "local")

    def __init__(self, address: str, own_id: int, down: bool):
        self.address, self.own_id, self.down = address, own_id, down
        self.stream = self.monitor = None
        self.local = None   # a LocalLink that is opening or open; None: ZeroMQ carries the messages


class PeerLinks:
    """Args:
        context: the process's zmq.Context.
        key: the ClusterKey.
        hwm: messages that may wait on one link.
        max_bytes: the largest mesh message (mesh.max_mesh_bytes).
        on_reply: called with the frames of every message a peer sends back.
        local: `(key_material, max_buffer)` for local links (node/local_links.py), or None for none.

    Set `on_down(node_id, why)` (the mesh point fails what waits for that peer; `why` says so in a sentence)
    and `on_up(node_id)` before the loop runs.
    """

    def __init__(self, context: zmq.Context, key, hwm: int, max_bytes: int, on_reply, local=None):
        self._context, self._key, self._hwm, self._max_bytes = context, key, hwm, max_bytes
        self._on_reply = on_reply
        self._local = local
        self.on_down = self.on_up = None
        self._links = {}   # node_id -> _Link
        self.down_count = 0   # links that are down now (0: every peer with a link is reachable)
        self._log = Throttled(log, burst=10)   # a flapping peer does not flood the log

    def open(self, node_id: int, address: str, own_id: int, down: bool = False) -> None:
        """Opens the link to a peer's mesh point (closing any it had); `down`: usable only after a handshake."""
        self.close(node_id)
        link = self._links[node_id] = _Link(address, own_id, down)
        self.down_count += down
        socket = new_socket(self._context, zmq.DEALER, self._hwm, self._key, self._max_bytes,
                            b"n%d-%d" % (own_id, time.monotonic_ns()))
        socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        socket.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL_MS)
        socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
        monitor = socket.get_monitor_socket(_EVENTS, f"inproc://meshgate.peer-link.{next(_monitor_names)}")
        link.monitor = ZSocket(monitor, lambda frames: self._on_event(node_id, link, frames))
        link.stream = ZSocket(socket, self._on_reply)
        socket.connect(address)
        if not down:
            self._open_local(node_id, link)

    def _open_local(self, node_id: int, link: _Link) -> None:
        name = socket_name(link.address) if self._local is not None else None
        if name is None:
            return
        material, max_buffer = self._local
        local = LocalLink(name, material, self._max_bytes, max_buffer, self._on_reply,
                          partial(self._local_ended, node_id))
        if local.state != FAILED:
            link.local = local
        else:
            log.debug("mesh link to node %d: %s; ZeroMQ carries its messages", node_id, local.why)

    def _local_ended(self, node_id: int, local: LocalLink, was_open: bool, why: str, waiting: list) -> None:
        link = self._links.get(node_id)
        if link is None or link.local is not local:
            return
        link.local = None
        if was_open:
            self._down(node_id, link, f"its local connection ended: {why}")
            return
        self._log.info("mesh link to node %d: the local socket did not open (%s); ZeroMQ carries its messages",
                       node_id, why)
        for payload in waiting:   # nothing went the local way: the order holds
            try:
                link.stream.send([payload])
            except zmq.Again:
                self._log.warning("mesh link to node %d is full; a message is dropped", node_id)

    def close(self, node_id: int) -> None:
        link = self._links.pop(node_id, None)
        if link is not None:
            self.down_count -= link.down
            _close(link)

    def usable(self, node_id: int):
        """What carries messages to the peer while its link is usable (its LocalLink, or its ZSocket: both
        `send([payload])`, raising zmq.Again when full); None while it is down or there is no link."""
        link = self._links.get(node_id)
        if link is None or link.down:
            return None
        return link.stream if link.local is None else link.local

    def local_count(self) -> int:
        """Peers whose messages go over an open local link."""
        return sum(1 for link in self._links.values() if link.local is not None and link.local.state == OPEN)

    def known(self, node_id: int) -> bool:
        return node_id in self._links

    def node_ids(self) -> list:
        return list(self._links)

    def _on_event(self, node_id: int, link: _Link, frames: list) -> None:
        if self._links.get(node_id) is not link:   # an event of a link closed since
            return
        event = parse_monitor_message(frames)["event"]
        if event == _UP:
            if link.down:
                link.down = False
                self.down_count -= 1
                self._log.info("mesh link to node %d is up again", node_id)
                self._open_local(node_id, link)
                self.on_up(node_id)
        elif event in _DOWN and not link.down:
            self._down(node_id, link, _DOWN[event])

    def _down(self, node_id: int, link: _Link, reason: str) -> None:
        self._log.warning("mesh link to node %d is down (%s); requests to it fail at once until it is back",
                          node_id, reason)
        self.open(node_id, link.address, link.own_id, down=True)
        self.on_down(node_id, f"the mesh link to node {node_id} went down ({reason})")


def _close(link: _Link) -> None:
    if link.local is not None:
        link.local.close()
    link.stream.socket.disable_monitor()
    link.monitor.close()
    link.stream.close()
