"""The registry ROUTER: registrations, heartbeats and adverts in; table updates out.

Feeds coordinator/registry.py and coordinator/tables.py and pushes versioned
updates to every node. Owned by the coordinator's IOLoop. Never on a message's
path: it only sees control traffic.
"""

import logging
import time

import zmq
from tornado.ioloop import PeriodicCallback

from cluster import mesh
from cluster.ids import now_ms
from cluster.zloop import ZSocket
from coordinator.registry import Registry, RegistryError
from coordinator.tables import Tables

log = logging.getLogger("meshgate.coordinator")


class Control:
    def __init__(self, config, context: zmq.Context, fresh: bool = False):
        self.config = config
        self.node_timeout = config.coordinator.node_timeout
        # After a restart, nodes of the previous run reclaim their ids within one
        # heartbeat or two; fresh nodes wait that long (not on a cluster's first start).
        grace = 0.0 if fresh else self.node_timeout / 2
        self.registry = Registry(grace_until=time.monotonic() + grace)
        self.tables = Tables()
        self.started_at = time.time()
        socket = context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        socket.setsockopt(zmq.SNDHWM, 100000)
        listen = config.coordinator.registry
        socket.bind(f"tcp://{listen.bind}:{listen.port}")
        self.stream = ZSocket(socket, self.on_message)
        self._sweeper = PeriodicCallback(self.sweep, max(50, self.node_timeout * 250))
        self._sweeper.start()
        self._handlers = {
            mesh.REGISTER: self.handle_register, mesh.HEARTBEAT: self.handle_heartbeat,
            mesh.ADVERT: self.handle_advert, mesh.SYNC: self.handle_sync, mesh.BYE: self.handle_bye,
        }

    def close(self) -> None:
        self._sweeper.stop()
        self.stream.close()

    # --- inbound ---------------------------------------------------------

    def on_message(self, frames: list) -> None:
        routing_id = bytes(frames[0])
        try:
            kind, body = mesh.read_control(frames[1:])
            handler = self._handlers.get(kind)
            if handler is None:
                raise mesh.FrameError(f"{kind!r} is not a node-to-coordinator message")
            handler(routing_id, body)
        except mesh.FrameError as exc:
            log.warning("bad control message from %r: %s", routing_id, exc)
        except Exception:
            log.exception("control message from %r failed", routing_id)

    def handle_register(self, routing_id: bytes, body: dict) -> None:
        try:
            node_id, not_before = self.registry.register(routing_id, body, time.monotonic(), now_ms())
        except RegistryError as exc:
            self.send(routing_id, mesh.REFUSED, {"reason": str(exc), "retry": exc.retry})
            if not exc.retry:
                log.error("refused node pid %s on %s: %s", body.get("pid"), body.get("host"), exc)
            return
        interest, consumers = self.tables.replace_node_state(node_id, body.get("state") or {})
        update = self.tables.next_update(nodes=self.registry.public_list(), interest=interest, consumers=consumers)
        welcome = {"node_id": node_id, "not_before_ms": not_before,
                   "snapshot": self.tables.snapshot(self.registry.public_list())}
        self.send(routing_id, mesh.WELCOME, welcome)
        self.broadcast(update, skip=node_id)
        log.info("node %d registered: pid %s, api %s, mesh point %s",
                 node_id, body.get("pid"), body.get("api_server"), body.get("mesh_point"))

    def handle_heartbeat(self, routing_id: bytes, body: dict) -> None:
        node_id = body.get("node_id")
        if not isinstance(node_id, int) or not self.registry.heartbeat(
                routing_id, node_id, body.get("stats") or {}, time.monotonic()):
            self.send(routing_id, mesh.REREGISTER, {})

    def handle_advert(self, routing_id: bytes, body: dict) -> None:
        node_id = self.registry.node_for(routing_id)
        if node_id is None:
            self.send(routing_id, mesh.REREGISTER, {})
            return
        self.registry.nodes[node_id].last_seen = time.monotonic()
        interest, consumers = self.tables.apply_advert(node_id, body)
        if interest or consumers:
            self.broadcast(self.tables.next_update(interest=interest, consumers=consumers))

    def handle_sync(self, routing_id: bytes, body: dict) -> None:
        if self.registry.node_for(routing_id) is None:
            self.send(routing_id, mesh.REREGISTER, {})
            return
        self.send(routing_id, mesh.SNAPSHOT, self.tables.snapshot(self.registry.public_list()))

    def handle_bye(self, routing_id: bytes, body: dict) -> None:
        node_id = self.registry.node_for(routing_id)
        if node_id is not None:
            self.drop(node_id, "said goodbye")

    # --- liveness ----------------------------------------------------------

    def sweep(self) -> None:
        for node_id in self.registry.expired(time.monotonic(), self.node_timeout):
            self.drop(node_id, f"no heartbeat for {self.node_timeout:g} s")

    def drop(self, node_id: int, why: str) -> None:
        info = self.registry.remove(node_id, now_ms())
        if info is None:
            return
        self.tables.drop_node(node_id)
        self.broadcast(self.tables.next_update(nodes=self.registry.public_list(), dead=[node_id]))
        log.warning("node %d (pid %d) removed: %s", node_id, info.pid, why)

    # --- outbound ----------------------------------------------------------

    def send(self, routing_id: bytes, kind: bytes, body: dict) -> None:
        self._send([routing_id, *mesh.control(kind, body)])

    def broadcast(self, update: dict, skip: int = 0) -> None:
        frames = mesh.control(mesh.UPDATE, update)
        for node_id, info in self.registry.nodes.items():
            if node_id != skip:
                self._send([info.routing_id, *frames])

    def _send(self, frames: list) -> None:
        try:
            self.stream.send(frames)
        except zmq.ZMQError as exc:
            log.warning("control message to %r dropped: %s", frames[0], exc)
