"""The node's link to the coordinator: registration, heartbeats, adverts, table updates.

One DEALER with a fixed routing id. Registration is retried until the
coordinator welcomes this node; after a coordinator restart (it answers
REREG) the node registers again with its id and its full state. Owned by the
node's IOLoop.
"""

import logging
import os
import socket
import time

import zmq
from tornado.ioloop import PeriodicCallback

from cluster import mesh
from cluster.zloop import ZSocket

log = logging.getLogger("meshgate.node")

_REGISTER_RETRY_S = 0.25       # first retry of an unanswered registration; doubles up to the next
_REGISTER_RETRY_MAX_S = 2.0
_SYNC_RETRY_S = 1.0            # one snapshot request at a time


class ControlLink:
    def __init__(self, node, context: zmq.Context):
        self.node = node
        self.config = node.config
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.ROUTING_ID, f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}".encode())
        sock.connect(f"tcp://{self.config.node.coordinator}")
        self.socket = ZSocket(sock, self.on_message)
        self.registered = False
        self._registering_since = None
        self._retry = PeriodicCallback(self._register_if_needed, _REGISTER_RETRY_S * 1000)
        self._heartbeat = PeriodicCallback(self.send_heartbeat, self._heartbeat_ms())
        self.fatal = None   # set to a message when this process must exit
        self.leaving = False
        self._retry_s = _REGISTER_RETRY_S
        self._sync_sent = 0.0

    def _heartbeat_ms(self) -> float:
        return max(20, min(1000, self.config.coordinator.node_timeout * 1000 / 4))

    def start(self) -> None:
        self.register()
        self._retry.start()
        self._heartbeat.start()

    def close(self) -> None:
        self._retry.stop()
        self._heartbeat.stop()
        self.socket.close()

    def send(self, kind: bytes, body: dict) -> None:
        """Sends a control message; dropped (and logged at debug) while the coordinator is unreachable."""
        try:
            self.socket.send(mesh.control(kind, body))
        except zmq.Again:
            log.debug("coordinator link full: dropped %s", kind.decode())

    def leave(self) -> None:
        """Says goodbye: the coordinator drops this node now, and nothing brings it back."""
        self.leaving = True
        self.registered = False
        self._retry.stop()
        self._heartbeat.stop()
        self.send(mesh.BYE, {"node_id": self.node.node_id})

    def register(self) -> None:
        if self.leaving:
            return
        node = self.node
        self.registered = False
        self._registering_since = time.monotonic()
        self.send(mesh.REGISTER, {
            "node_id": node.node_id, "host": socket.gethostname(), "pid": os.getpid(),
            "api_server": node.api_server, "mesh_point": node.mesh_point, "started_at": node.started_at,
            "state": node.full_state() if node.node_id else {},
        })

    def _register_if_needed(self) -> None:
        if not self.registered and time.monotonic() - self._registering_since >= self._retry_s:
            self._retry_s = min(self._retry_s * 2, _REGISTER_RETRY_MAX_S)   # a busy coordinator is not flooded
            self.register()

    def send_heartbeat(self) -> None:
        if self.registered:
            self.send(mesh.HEARTBEAT, {"node_id": self.node.node_id, "stats": self.node.stats()})
            self.node.expire_unconfirmed()

    def on_message(self, frames: list) -> None:
        try:
            kind, body = mesh.read_control(frames)
        except mesh.FrameError as exc:
            log.warning("bad message from the coordinator: %s", exc)
            return
        node = self.node
        if kind == mesh.UPDATE:
            if not self.registered:
                return
            changed = node.routing.apply_update(body)
            if changed is None:
                now = time.monotonic()
                if now - self._sync_sent >= _SYNC_RETRY_S:
                    self._sync_sent = now
                    self.send(mesh.SYNC, {"node_id": node.node_id})
            else:
                node.on_routing_changed(*changed)
        elif kind == mesh.SNAPSHOT:
            self._sync_sent = 0.0
            if self.registered:
                node.on_routing_changed(*node.routing.load_snapshot(body))
        elif kind == mesh.WELCOME:
            if node.node_id and body["node_id"] != node.node_id:
                self.fatal = f"coordinator gave node id {body['node_id']}, this process holds {node.node_id}"
                return
            first = not node.node_id
            self.registered = True
            self._retry_s = _REGISTER_RETRY_S
            node.on_welcome(body["node_id"], body.get("not_before_ms", 0), body["snapshot"])
            self.send_heartbeat()
            log.info("%s node %d (mesh point %s)", "registered as" if first else "re-registered as",
                     node.node_id, node.mesh_point)
        elif kind == mesh.REREGISTER:
            if self.registered or time.monotonic() - self._registering_since >= self._retry_s:
                log.warning("coordinator does not know this node; registering again")
                self.register()
        elif kind == mesh.REFUSED:
            if body.get("retry"):
                log.info("registration deferred: %s", body.get("reason"))
            else:
                self.fatal = f"registration refused: {body.get('reason')}"
                log.error(self.fatal)
