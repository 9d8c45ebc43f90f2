"""The node's link to the coordinator: registration, heartbeats, adverts out; table updates in.

One DEALER with a fixed routing id. Registration is retried (with backoff)
until the coordinator welcomes this node; after a coordinator restart (it
answers REREG) the node registers again with its id and its full state.
What the coordinator says is applied to the node's `Routing` and handed on
as `routing.Changes` through the one `on_changes` callback: the link never
reaches into the rest of the node. Owned by the node's IOLoop.
"""

import logging
import os
import socket
import time
from typing import NamedTuple

import zmq
from tornado.ioloop import PeriodicCallback

from cluster import mesh
from cluster.logs import Throttled
from cluster.zloop import ZSocket, new_socket

log = logging.getLogger("meshgate.node")

_REGISTER_RETRY_S = 0.25       # first retry of an unanswered registration; doubles up to the next
_REGISTER_RETRY_MAX_S = 2.0
_SYNC_RETRY_S = 1.0            # one snapshot request at a time
_HWM = 10000
METRICS_S = 1.0                # how often the node's metrics go to the coordinator (its /metrics shows them)


class Identity(NamedTuple):
    """What this node tells the coordinator about itself when it registers."""
    host: str
    pid: int
    api_server: str
    mesh_point: str
    started_at: float


class CoordinatorLink:
    """The node's side of the registry.

    Args:
        context: the process's zmq.Context.
        config: the cluster Config.
        routing: the node's Routing; the link applies the coordinator's updates to it.
        identity: an Identity.
        state: returns the node's full `mesh.NodeState` (for a re-registration).
        stats: returns the node's figures (for heartbeats).
        on_changes: called with the `routing.Changes` of every update, snapshot and expiry.
        key: the ClusterKey.
        metrics: returns the node's metrics in Prometheus' text format (sent every METRICS_S).

    After the first WELCOME, `node_id` and `not_before_ms` are set and
    `joined` is True; `fatal` is a message when this process must exit.
    """

    def __init__(self, context: zmq.Context, config, routing, identity: Identity, state, stats, on_changes, key,
                 metrics):
        self.config = config
        self.routing = routing
        self.identity = identity
        self._state, self._stats, self._on_changes = state, stats, on_changes   # the node's side, all it sees
        self._metrics = metrics
        self.node_id = 0
        self.not_before_ms = 0
        self.lease = None      # what proves node_id is this process's (mesh.Welcome)
        self.refused = 0       # messages dropped by the readers of cluster/mesh.py
        self._bad_log = Throttled(log)
        self.joined = False
        self.registered = False
        self.fatal = None
        self.leaving = False
        sock = new_socket(context, zmq.DEALER, _HWM, key, mesh.MAX_CONTROL_BYTES,
                          f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}".encode())
        sock.connect(f"tcp://{config.node.coordinator}")
        self.socket = ZSocket(sock, self.on_message)
        self._registering_since = None
        self._retry_s = _REGISTER_RETRY_S
        self._sync_sent = 0.0
        self._retry = PeriodicCallback(self._register_if_needed, _REGISTER_RETRY_S * 1000)
        self._heartbeat = PeriodicCallback(self.send_heartbeat, self._heartbeat_ms())
        self._metrics_timer = PeriodicCallback(self.send_metrics, METRICS_S * 1000)
        self._handlers = {
            mesh.Update: self.handle_update, mesh.Snapshot: self.handle_snapshot,
            mesh.Welcome: self.handle_welcome, mesh.Reregister: self.handle_reregister,
            mesh.Refused: self.handle_refused, mesh.Lost: self.handle_lost,
        }
        self.on_lost = None   # the node's: push the close messages of a dead node's clients (node/lifecycle.py)

    def _heartbeat_ms(self) -> float:
        return max(20, min(1000, self.config.coordinator.node_timeout * 1000 / 4))

    def start(self) -> None:
        self.register()
        self._retry.start()
        self._heartbeat.start()
        self._metrics_timer.start()

    def close(self) -> None:
        self._retry.stop()
        self._heartbeat.stop()
        self._metrics_timer.stop()
        self.socket.close()

    # --- outbound ----------------------------------------------------------------

    def send(self, message) -> None:
        """Sends a control message; dropped (and logged at debug) while the coordinator is unreachable."""
        try:
            self.socket.send(mesh.encode_control(message))
        except zmq.Again:
            log.debug("coordinator link full: dropped %s", mesh.control_kind(message))

    def leave(self) -> None:
        """Says goodbye: the coordinator drops this node now, and nothing brings it back."""
        self.leaving = True
        self.registered = False
        self._retry.stop()
        self._heartbeat.stop()
        self._metrics_timer.stop()
        self.send(mesh.Bye(self.node_id))

    def register(self) -> None:
        if self.leaving:
            return
        self.registered = False
        self._registering_since = time.monotonic()
        state = self._state() if self.node_id else mesh.NodeState()
        self.send(mesh.Register(self.node_id, *self.identity, state, self.lease))

    def _register_if_needed(self) -> None:
        if not self.registered and time.monotonic() - self._registering_since >= self._retry_s:
            self._retry_s = min(self._retry_s * 2, _REGISTER_RETRY_MAX_S)   # a busy coordinator is not flooded
            self.register()

    def send_heartbeat(self) -> None:
        if not self.registered:
            return
        self.send(mesh.Heartbeat(self.node_id, self._stats()))
        changes = self.routing.expire_unconfirmed(time.monotonic())
        if changes.removed:
            log.warning("nodes %s did not come back after the coordinator restarted; dropped",
                        ", ".join(map(str, sorted(changes.removed))))
            self._on_changes(changes)

    def send_metrics(self) -> None:
        if not self.registered:
            return
        text = self._metrics()
        size = len(text.encode("utf-8"))
        if size > mesh.MAX_METRICS_BYTES:
            self._bad_log.warning("metrics of this node are %d bytes, over %d; not sent", size, mesh.MAX_METRICS_BYTES)
            return
        self.send(mesh.Metrics(self.node_id, text))

    # --- inbound -----------------------------------------------------------------

    def on_message(self, frames: list) -> None:
        try:
            message = mesh.read_control(frames, mesh.FROM_COORDINATOR)
        except mesh.FrameError as exc:
            self.refused += 1
            self._bad_log.warning("dropped a bad message from the coordinator: %s", exc)
            return
        self._handlers[type(message)](message)

    def handle_update(self, update: mesh.Update) -> None:
        if not self.registered:
            return
        changes = self.routing.apply_update(update)
        if changes is not None:
            self._on_changes(changes)
            return
        now = time.monotonic()   # a version was skipped: ask for the whole tables, once a second at most
        if now - self._sync_sent >= _SYNC_RETRY_S:
            self._sync_sent = now
            self.send(mesh.Sync(self.node_id))

    def handle_snapshot(self, snapshot: mesh.Snapshot) -> None:
        self._sync_sent = 0.0
        if self.registered:
            self._on_changes(self.routing.load_snapshot(snapshot))

    def handle_welcome(self, welcome: mesh.Welcome) -> None:
        if self.node_id and welcome.node_id != self.node_id:
            self.fatal = f"coordinator gave node id {welcome.node_id}, this process holds {self.node_id}"
            return
        again = self.registered   # a registration retried before its answer came is answered twice
        self.registered = True
        self._retry_s = _REGISTER_RETRY_S
        self.lease = welcome.lease
        if not self.joined:
            self.node_id = self.routing.node_id = welcome.node_id
            self.not_before_ms = welcome.not_before_ms
            self.joined = True
            changes = self.routing.load_snapshot(welcome.snapshot)
            log.info("registered as node %d (mesh point %s)", self.node_id, self.identity.mesh_point)
        else:
            # The coordinator restarted: it lists only the nodes back so far. Keep the
            # others (the data plane goes on) until they had time to come back.
            keep_until = time.monotonic() + 2 * self.config.coordinator.node_timeout + 1
            changes = self.routing.merge_snapshot(welcome.snapshot, keep_until)
            if not again:
                log.info("re-registered as node %d (mesh point %s)", self.node_id, self.identity.mesh_point)
        self._on_changes(changes)
        self.send_heartbeat()
        self.send_metrics()

    def handle_reregister(self, message: mesh.Reregister) -> None:
        if self.registered or time.monotonic() - self._registering_since >= self._retry_s:
            log.warning("coordinator does not know this node; registering again")
            self.register()

    def handle_lost(self, lost: mesh.Lost) -> None:
        if self.registered and self.on_lost is not None:
            count = self.on_lost(lost)
            log.info("node %d died: pushed the close messages of its %d watched clients", lost.node_id, count)

    def handle_refused(self, refused: mesh.Refused) -> None:
        if refused.retry:
            log.info("registration deferred: %s", refused.reason)
        else:
            self.fatal = f"registration refused: {refused.reason}"
            log.error(self.fatal)
