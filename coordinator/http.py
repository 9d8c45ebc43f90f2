"""Coordinator HTTP (docs/protocol.md, Coordinator HTTP): /version, /v1/nodes, /v1/status, /metrics.

/metrics is coordinator/metrics.py's: every node's metrics and the coordinator's, in Prometheus' format.
"""

import time

import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST

from cluster import __version__, protocol
from cluster.access import READ, Denied, refuse
from cluster.protocol import ErrorCode
from coordinator.metrics import cluster_metrics

# Per-node figures a node reports in its heartbeat and /v1/status shows (append only).
NODE_FIGURES = (
    "clients", "channels", "consumers", "queue_depth", "in_rate", "out_rate", "in_total", "out_total",
    "queue_dropped", "slow_closed", "forward_timeouts", "hook_errors", "cpu", "rss",
    "mesh_refused", "mesh_handshakes_refused", "handshakes_refused", "limit_closed",
)


def status_document(control) -> dict:
    """Cluster totals and per-node figures (what `meshgate status` prints)."""
    now = time.time()
    nodes = []
    for info in sorted(control.registry.nodes.values(), key=lambda i: i.node_id):
        entry = info.public()
        entry["mesh_point"] = info.mesh_point
        entry["uptime"] = round(now - info.started_at, 1) if info.started_at else 0
        for name in NODE_FIGURES:
            entry[name] = info.stats.get(name, 0)
        nodes.append(entry)
    totals = {name: round(sum(node[name] for node in nodes), 2)
              for name in NODE_FIGURES if name not in ("cpu",)}
    totals["cpu"] = round(sum(node["cpu"] for node in nodes), 1)
    totals["nodes"] = len(nodes)
    return {
        "version": __version__, "coordinator": {"uptime": round(now - control.started_at, 1),
                                                "tables_version": control.tables.version,
                                                "control_refused": control.refused,
                                                "mesh_handshakes_refused": control.zap.refused,
                                                **control.tables.counts()},
        "totals": totals, "nodes": nodes,
    }


class _JsonHandler(tornado.web.RequestHandler):
    credentials = True   # docs/protocol.md, Access control: everything but GET /version needs a user with `read`

    def initialize(self, control, access):
        self.control = control
        self.access = access

    async def prepare(self):
        try:
            await self.access.check(self.request, READ, self.credentials)
        except Denied as denied:
            refuse(self, denied, protocol.error_body(ErrorCode.NOT_AUTHORIZED, denied.message))

    def send_json(self, value) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(protocol.json_text(value))

    def write_error(self, status_code: int, **kwargs) -> None:
        message = (f"{self.request.method} is not allowed on {self.request.path}; use GET" if status_code == 405
                   else f"{self.request.path}: no such endpoint" if status_code == 404 else "internal error")
        self.send_error_envelope(ErrorCode.INVALID_PARAMS if status_code < 500 else ErrorCode.MESH_UNAVAILABLE, message)

    def send_error_envelope(self, code: ErrorCode, message: str) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(protocol.error_body(code, message))


class VersionHandler(_JsonHandler):
    credentials = False

    def get(self):
        self.send_json({"apis": ["v1"], "version": __version__})


class NodesHandler(_JsonHandler):
    def get(self):
        self.send_json({"nodes": self.control.registry.public_list()})


class StatusHandler(_JsonHandler):
    def get(self):
        self.send_json(status_document(self.control))


class MetricsHandler(_JsonHandler):
    def initialize(self, control, access, metrics):
        super().initialize(control, access)
        self.metrics = metrics

    def get(self):
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.metrics.text())


class NotFoundHandler(_JsonHandler):
    async def prepare(self):
        await super().prepare()
        if not self._finished:
            self.set_status(404)
            self.send_error_envelope(ErrorCode.INVALID_PARAMS, f"{self.request.path}: no such endpoint")


def make_app(control, access) -> tornado.web.Application:
    """Args: the Control, and the process's cluster.access.Access (swapped on SIGHUP)."""
    args = {"control": control, "access": access}
    return tornado.web.Application([
        (r"/version", VersionHandler, args),
        (r"/v1/nodes", NodesHandler, args),
        (r"/v1/status", StatusHandler, args),
        (r"/metrics", MetricsHandler, {**args, "metrics": cluster_metrics(control)}),
    ], default_handler_class=NotFoundHandler, default_handler_args=args)
