"""One node process's data plane, wired together; its figures for heartbeats.

`Node` owns the parts and connects them; each part does one job:
the local hub (clients.py), the cached routing tables (routing.py), the mesh
point (mesh_point.py), what this node advertises (adverts.py), sends,
publishes and calls local or remote (forward.py), queue delivery
(queue_dispatch.py), the API executor (api.py) and the link to the
coordinator (coordinator_link.py). Owned by the node's IOLoop.
"""

import asyncio
import logging
import os
import socket
import time

import psutil

from cluster import logs, mesh
from node import lifecycle
from cluster.access import Access
from cluster.ids import IdGenerator
from cluster.zloop import ZapHandler
from node.adverts import Adverts
from node.api import Api
from node.clients import Counters, Hub
from node.coordinator_link import CoordinatorLink, Identity
from node.forward import Forwarder
from node.mesh_point import MeshPoint
from node.metrics import node_metrics
from node.presence import Presence
from node.queue_dispatch import QueueDispatch
from node.routing import Routing

log = logging.getLogger("meshgate.node")


class Node:
    """Args:
        config: the cluster Config.
        worker: this process's index among the host's node processes (0-based).
        context: the process's zmq.Context (this object binds its ZAP handler).
        key: the ClusterKey (cluster/cluster_key.py).
        mesh_index: with a fixed node.mesh.port N, the mesh point binds N + this (cluster/handover.py);
            None: N + worker.
    """

    def __init__(self, config, worker: int, context, key, mesh_index: int = None):
        self.config = config
        self.worker = worker
        self.node_id = 0
        self.ids = None                # IdGenerator, once the coordinator gave the node id
        self.ready = asyncio.Event()   # set then
        self.started_at = time.time()
        self.api_sockets = set()       # open /ws/v1 connections (node/api_ws.py)
        self.access = Access(config)   # who may call the API (cluster/access.py); swapped on SIGHUP
        self.counters = Counters()
        self.hub = Hub(self.counters)
        self.routing = Routing()
        settings = config.node
        self.zap = ZapHandler(context, key)   # before anything serves
        port = settings.mesh.port + (worker if mesh_index is None else mesh_index) if settings.mesh.port else 0
        max_bytes = mesh.max_mesh_bytes(settings.api.max_body, max(s.max_message_size for s in settings.servers))
        self.mesh_point = MeshPoint(context, f"tcp://{settings.mesh.bind}:{port}", settings.forward_timeout,
                                    settings.mesh.max_pending_bytes, key, max_bytes, settings.mesh.local_links)
        host = f"[{settings.advertise}]" if ":" in settings.advertise else settings.advertise   # an IPv6 address
        self.mesh_address = f"tcp://{host}:{self.mesh_point.address.rpartition(':')[2]}"
        self.mesh_point.listen_local(self.mesh_address)
        self.api_server = f"{host}:{settings.api.port}"
        identity = Identity(socket.gethostname(), os.getpid(), self.api_server, self.mesh_address, self.started_at)
        self.link = CoordinatorLink(context, config, self.routing, identity, self._full_state, self.stats,
                                    self.on_changes, key, self.exposition)
        self.adverts = Adverts(self.routing, self.mesh_point, settings.forward_timeout, self.link.send)
        self.link.on_lost = lambda lost: lifecycle.lost_closes(self, lost.clients)
        self.queues = QueueDispatch(settings.queue, self.routing, self.mesh_point, self.adverts, self.counters)
        self.api = Api(self)
        self.forward = Forwarder(self.routing, self.hub, self.mesh_point, self.api.call_local, self.adverts,
                                 self.queues)
        self.presence = Presence(lambda: self.node_id, self.routing, self.hub, self.mesh_point)
        self.forward.serve(mesh.Presence, self.presence.handle)
        self.forward.serve(mesh.QueueDelivery, self.queues.acks.handle_delivery)
        self.forward.serve(mesh.QueueAcks, self.queues.acks.handle_acks)
        self.mesh_point.handle_request = self.forward.handle
        self.mesh_point.links.on_up = self.on_link_up
        self._process = psutil.Process()
        self._process.cpu_percent(None)
        self._last_stats = (time.monotonic(), 0, 0)
        self.connections_by_server = {}   # server path -> open client connections
        self.metrics = node_metrics(self)

    def close(self) -> None:
        self.link.close()
        self.mesh_point.close()
        self.zap.close()

    # --- what the coordinator says ---------------------------------------------------

    def on_changes(self, changes) -> None:
        """Acts on `routing.Changes`: links to new peers, drops gone ones, drains topics."""
        if not self.node_id and self.link.joined:
            self.node_id = self.link.node_id
            self.ids = IdGenerator(self.node_id, self.link.not_before_ms)
            logs.rename(f"node{self.node_id}-w{self.worker}")   # every line from now on names the node id
            self.ready.set()
        for node_id in changes.removed:
            self.mesh_point.disconnect(node_id)
        connected = set(self.mesh_point.connected())
        for node_id in self.routing.peer_ids():
            if node_id in changes.added or node_id not in connected:
                address = self.routing.nodes[node_id].mesh_point
                try:
                    self.mesh_point.connect(node_id, address, self.node_id)
                except Exception as exc:   # one bad peer must not stop this node from serving
                    log.error("cannot link to node %d at %r: %s", node_id, address, exc)
        self.queues.drain_all(changes.topics)

    def on_link_up(self, node_id: int) -> None:
        """A peer's mesh link is back after a drop (node/peer_links.py): tell it what it missed, and hand it
        the queue events that waited for it."""
        # Peers learn interest and consumers only: no client list, no watched clients to gather.
        self.adverts.tell_peer(node_id, self.adverts.full_state(self.hub.subs, self.queues.consumers.topics, (), ()))
        self.queues.drain_all(self.queues.buffers.topics())

    def _full_state(self) -> mesh.NodeState:
        watched = [[client_id, conn.server.lifecycle_topic] for client_id, conn in self.hub.conns.items()
                   if conn.lifecycle == lifecycle.OPEN_PUSHED]
        return self.adverts.full_state(self.hub.subs, self.queues.consumers.topics, self.hub.conns, watched)

    # --- client connections (node/client_ws.py and conn.call) -------------------------

    def client_opened(self, conn) -> None:
        self.hub.add(conn)
        self.adverts.client_opened(conn.client_id)
        by_server, path = self.connections_by_server, conn.server.path
        by_server[path] = by_server.get(path, 0) + 1

    def client_closed(self, conn) -> None:
        if self.hub.conns.get(conn.client_id) is conn:
            self.connections_by_server[conn.server.path] -= 1
            self.adverts.interest_changed(self.hub.remove(conn))
            self.adverts.client_closed(conn.client_id)

    def subscribe(self, conn, channels: list) -> asyncio.Future:
        """Subscribes a local connection at once; the future completes when every peer knows.

        docs/protocol.md, conn.call: a publish issued anywhere after the
        future completes reaches the connection.
        """
        waits = []
        if self.hub.conns.get(conn.client_id) is conn:   # not closed meanwhile
            waits = self.adverts.interest_changed(self.hub.subscribe(conn, channels))
        if waits:
            return asyncio.gather(*waits)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def unsubscribe(self, conn, channels: list) -> None:
        self.adverts.interest_changed(self.hub.unsubscribe(conn, channels))

    # --- figures -----------------------------------------------------------------------

    def exposition(self) -> str:
        """This node's metrics in Prometheus' text format (node/metrics.py), sent to the coordinator."""
        return self.metrics.text().decode("utf-8")

    def handshakes_refused(self) -> int:
        """Mesh handshakes refused: CURVE handshakes with another key, and local links that broke their rules."""
        return self.zap.refused + self.mesh_point.local_refused()

    def stats(self) -> dict:
        """This node's figures, sent with every heartbeat (coordinator/http.py, NODE_FIGURES)."""
        now = time.monotonic()
        counters = self.counters
        last_time, last_in, last_out = self._last_stats
        elapsed = max(now - last_time, 1e-3)
        self._last_stats = (now, counters.in_total, counters.out_total)
        queues = self.queues
        return {
            "clients": len(self.hub.conns), "channels": len(self.hub.subs), "consumers": queues.consumers.count(),
            "queue_depth": queues.buffers.depth(), "queue_dropped": queues.buffers.dropped + queues.lost,
            "in_total": counters.in_total, "out_total": counters.out_total,
            "in_rate": round((counters.in_total - last_in) / elapsed, 1),
            "out_rate": round((counters.out_total - last_out) / elapsed, 1),
            "slow_closed": counters.slow_closed, "forward_timeouts": self.mesh_point.timeouts,
            "hook_errors": counters.hook_errors, "handshakes_refused": counters.handshakes_refused,
            "limit_closed": counters.limit_closed, "cpu": self._process.cpu_percent(None),
            "rss": self._process.memory_info().rss, "id_ms": self.ids.last_ms if self.ids else 0,
            "mesh_refused": self.mesh_point.refused + self.link.refused,
            "mesh_handshakes_refused": self.handshakes_refused(),
        }
