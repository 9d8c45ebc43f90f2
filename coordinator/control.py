"""The registry ROUTER: registrations, heartbeats and adverts in; table updates out.

Supervisors send here too: the moment a node process of their machine exits
(`mesh.Exited`), so the node is dropped at once rather than after
`coordinator.node_timeout` without a heartbeat.

Feeds coordinator/registry.py and coordinator/tables.py and pushes versioned
updates to every node. Every message goes through the strict readers of
cluster/mesh.py; a bad one is logged and dropped. Owned by the coordinator's
IOLoop. Never on a message's path: it only sees control traffic.
"""

import logging
import time

import zmq
from tornado.ioloop import PeriodicCallback

from cluster import mesh
from cluster.ids import now_ms
from cluster.logs import Throttled
from cluster.zloop import ZapHandler, ZSocket, new_socket
from coordinator.registry import Registry, RegistryError
from coordinator.tables import Tables

log = logging.getLogger("meshgate.coordinator")

_ACCEPTED = mesh.FROM_NODE | mesh.FROM_SUPERVISOR
_WITH_ADDRESS = (mesh.Register, mesh.Exited)   # handled with the sender's network address (ZeroMQ's Peer-Address)


class Control:
    """The coordinator's side of every node's link: who is alive, and what the tables say.

    Args:
        config: the cluster Config.
        context: the process's zmq.Context (this object binds its ZAP handler).
        key: the ClusterKey.
        fresh: no node of an earlier run can exist (a cluster's first start).
    """

    def __init__(self, config, context: zmq.Context, key, fresh: bool = False):
        self.config = config
        self.key = key
        self.node_timeout = config.coordinator.node_timeout
        # After a restart, nodes of the previous run reclaim their ids within one
        # heartbeat or two; fresh nodes wait that long (not on a cluster's first start).
        grace = 0.0 if fresh else self.node_timeout / 2
        self.registry = Registry(grace_until=time.monotonic() + grace, lease_of=key.lease)
        self.tables = Tables()
        self.started_at = time.time()
        self.refused = 0      # control messages dropped by the readers of cluster/mesh.py
        self._bad_log = Throttled(log)
        self._exit_log = Throttled(log)
        self.zap = ZapHandler(context, key)   # before the registry serves
        socket = new_socket(context, zmq.ROUTER, 100000, key, mesh.MAX_CONTROL_BYTES)
        listen = config.coordinator.registry
        socket.bind(f"tcp://{listen.bind}:{listen.port}")
        self.stream = ZSocket(socket, self.on_message, copy=False)   # frames that know where they came from
        self._sweeper = PeriodicCallback(self.sweep, max(50, self.node_timeout * 250))
        self._sweeper.start()
        self._handlers = {
            mesh.Register: self.handle_register, mesh.Heartbeat: self.handle_heartbeat,
            mesh.Metrics: self.handle_metrics,
            mesh.Advert: self.handle_advert, mesh.Sync: self.handle_sync, mesh.Bye: self.handle_bye,
            mesh.Exited: self.handle_exited,
        }

    def close(self) -> None:
        self._sweeper.stop()
        self.stream.close()
        self.zap.close()

    # --- inbound ---------------------------------------------------------

    def on_message(self, frames: list) -> None:
        routing_id = bytes(frames[0])
        try:
            message = mesh.read_control(frames[1:], _ACCEPTED)
        except mesh.FrameError as exc:
            self.refused += 1
            self._bad_log.warning("dropped a bad control message from %r: %s", routing_id[:64], exc)
            return
        try:
            if type(message) in _WITH_ADDRESS:
                self._handlers[type(message)](routing_id, message, _peer_address(frames[0]))
            else:
                self._handlers[type(message)](routing_id, message)
        except Exception:
            log.exception("control message %s from %r failed", mesh.control_kind(message), routing_id[:64])

    def handle_register(self, routing_id: bytes, message: mesh.Register, address: str = "") -> None:
        try:
            node_id, not_before = self.registry.register(routing_id, message, time.monotonic(), now_ms(), address)
        except RegistryError as exc:
            self.send(routing_id, mesh.Refused(str(exc), exc.retry))
            if not exc.retry:
                log.error("refused node pid %s on %s: %s", message.pid, message.host, exc)
            return
        interest, consumers = self.tables.replace_node_state(node_id, message.state)
        update = self.tables.next_update(nodes=self.registry.entries(), interest=interest, consumers=consumers)
        self.send(routing_id, mesh.Welcome(node_id, not_before, self.tables.snapshot(self.registry.entries()),
                                           self.key.lease(node_id, routing_id)))
        self.broadcast(update, skip=node_id)
        log.info("node %d registered: pid %s, api %s, mesh point %s",
                 node_id, message.pid, message.api_server, message.mesh_point)

    def handle_heartbeat(self, routing_id: bytes, message: mesh.Heartbeat) -> None:
        if not self.registry.heartbeat(routing_id, message.node_id, message.stats, time.monotonic()):
            self.send(routing_id, mesh.Reregister())

    def handle_metrics(self, routing_id: bytes, message: mesh.Metrics) -> None:
        self.registry.metrics(routing_id, message.node_id, message.text)   # a stranger's: its heartbeat says so

    def handle_advert(self, routing_id: bytes, message: mesh.Advert) -> None:
        node_id = self.registry.node_for(routing_id)
        if node_id is None:
            self.send(routing_id, mesh.Reregister())
            return
        self.registry.nodes[node_id].last_seen = time.monotonic()
        interest, consumers = self.tables.apply_advert(node_id, message)
        if interest or consumers:
            self.broadcast(self.tables.next_update(interest=interest, consumers=consumers))

    def handle_sync(self, routing_id: bytes, message: mesh.Sync) -> None:
        if self.registry.node_for(routing_id) is None:
            self.send(routing_id, mesh.Reregister())
            return
        self.send(routing_id, self.tables.snapshot(self.registry.entries()))

    def handle_bye(self, routing_id: bytes, message: mesh.Bye) -> None:
        node_id = self.registry.node_for(routing_id)
        if node_id is not None:
            self.drop(node_id, "said goodbye", logging.INFO, died=False)   # asked for: nothing to worry about

    def handle_exited(self, routing_id: bytes, notice: mesh.Exited, address: str = "") -> None:
        """A supervisor saw a node process of its machine exit: drop that node now (docs/operations.md)."""
        sender = self.registry.node_for(routing_id)
        if sender is not None:   # a node speaks for itself, never of an exit
            self.refused += 1
            self._bad_log.warning("dropped an EXIT from node %d: only a supervisor sends it", sender)
            return
        node_id = self.registry.exited(notice, address)
        if node_id is None:   # stale (the coordinator was away), or the pid is a newer process's
            self._exit_log.info("exit of pid %d on %s (from %s) ignored: no live node is that process",
                                notice.pid, notice.host[:64], address or "?")
            return
        how = f"killed by signal {-notice.code}" if notice.code < 0 else f"exit status {notice.code}"
        self.drop(node_id, f"its process exited ({how}), its supervisor says")

    # --- liveness ----------------------------------------------------------

    def sweep(self) -> None:
        for node_id in self.registry.expired(time.monotonic(), self.node_timeout):
            self.drop(node_id, f"no heartbeat for {self.node_timeout:g} s")

    def drop(self, node_id: int, why: str, level: int = logging.WARNING, died: bool = True) -> None:
        """Removes a node mesh-wide; one that `died` (not one that said goodbye after closing its clients)
        has the lifecycle close messages of its clients pushed by a live node (`hand_off`)."""
        info = self.registry.remove(node_id, now_ms())
        if info is None:
            return
        watched = self.tables.drop_node(node_id)
        self.broadcast(self.tables.next_update(nodes=self.registry.entries(), dead=[node_id]))
        log.log(level, "node %d (pid %d) removed: %s", node_id, info.pid, why)
        if died and watched:
            self.hand_off(node_id, watched)

    def hand_off(self, dead: int, watched: list) -> None:
        """Asks the live node with the lowest id to push the close messages of `dead`'s watched clients."""
        live = sorted(self.registry.nodes.values(), key=lambda i: i.node_id)
        if not live:
            log.warning("node %d died with %d clients whose close messages no live node can push", dead,
                        len(watched))
            return
        self.send(live[0].routing_id, mesh.Lost(dead, watched))
        log.info("node %d pushes the close messages of %d clients of node %d", live[0].node_id, len(watched), dead)

    # --- outbound ----------------------------------------------------------

    def send(self, routing_id: bytes, message) -> None:
        self._send([routing_id, *mesh.encode_control(message)])

    def broadcast(self, update: mesh.Update, skip: int = 0) -> None:
        frames = mesh.encode_control(update)
        for node_id, info in self.registry.nodes.items():
            if node_id != skip:
                self._send([info.routing_id, *frames])

    def _send(self, frames: list) -> None:
        try:
            self.stream.send(frames)
        except zmq.ZMQError as exc:
            log.warning("control message to %r dropped: %s", frames[0], exc)


def _peer_address(frame) -> str:
    """Where a message came from: the network address of its connection (ZeroMQ's Peer-Address), or ""."""
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError):   # not a network connection, or frames given as bytes
        return ""
