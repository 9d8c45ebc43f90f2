"""The node process: startup (register, then listen) and the signals that end it (node/drain.py drains).

Listening sockets use SO_REUSEPORT so every node process of a host serves the
same API and client ports; a process listens on them only after the coordinator
gave it a node id, so a connection never lands on a process that cannot name it.
Under a supervisor the sockets are bound by the supervisor and handed over
(cluster/handover.py), so that a replacement takes over a process's sockets
and the connections waiting in them. SIGTERM drains for a stop; the
supervisor's DRAIN_SIGNAL drains for a restart (docs/operations.md, Rolling
restart); SIGUSR2, meant for the supervisor, is ignored.
"""

import asyncio
import gc
import logging
import os
import signal
import time

import tornado.ioloop
import tornado.web
import zmq
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from cluster import event_loop, handover, live, logs, speedups, tls
from cluster.http_server import BUDGET, BoundedHTTPServer, raise_file_limit
from cluster.supervisor import SUPERVISED_ENV, watch_parent
from cluster.token_keys import TokenKeyError
from node import entry as entries, hooks
from node.api_fast import ApiServer
from node.api_http import ROUTES, ApiRouter, CallHandler, NotFoundHandler
from node.api_ws import ApiSocket
from node.client_limits import ServerGate, log_request
from node.client_ws import ClientHandler
from node.demo import DemoHandler
from node.drain import drain
from node.node import Node

log = logging.getLogger("meshgate.node")

# An API connection must send a request's headers within this, and is closed after this long idle.
_API_IDLE_S = 60.0
_API_BODY_S = 60.0       # a request body must arrive within this
# What Tornado reads of a body before a handler runs: the API handlers that take bodies stream them,
# and lift the bound only once the caller is known (node/api_http.py); nothing else takes one.
_API_EARLY_BODY = 4096


def _listen(app, handed, bind: str, port: int, server_class=BoundedHTTPServer, **server_options) -> HTTPServer:
    """An HTTP server on a port shared by every node process of the host (`ssl_options`: TLS, or None),
    on the sockets the supervisor handed over (`handed`) or, without them, on its own."""
    server = server_class(app, **server_options)
    server.add_sockets(handover.listening(handed, bind, port) or bind_sockets(port, address=bind, reuse_port=True))
    return server


def api_app(node) -> tornado.web.Application:
    max_body = node.config.node.api.max_body
    common = {"api": node.api, "max_body": max_body}
    routes = [(path, CallHandler, {**common, "method": method}) for path, method in ROUTES.items()]
    routes.append((r"/ws/v1", ApiSocket, {**common, "node": node}))
    return tornado.web.Application(routes, default_handler_class=NotFoundHandler, default_handler_args=common,
                                   websocket_max_message_size=max_body * 2 + 4096)


def client_app(node, servers: list) -> tornado.web.Application:
    """One application for the configured servers that share a port, one route per path.

    Raises:
        EntryError: an entry cannot be loaded.
        TokenKeyError: an `auth.jwt` key cannot be read or does not fit its algorithms.
    """
    routes = []
    header_size = max(server.max_header_size for server in servers)
    for server in servers:
        entry = hooks.load(node, server)
        gate = ServerGate(node, server, node.config, header_size)
        path = server.path.rstrip("/") or "/"
        pattern = "/" if path == "/" else path + "/?"
        routes.append((pattern, ClientHandler, {"node": node, "server": server, "entry": entry, "gate": gate}))
        if server.demo:
            routes.append((server.demo.rstrip("/") or "/", DemoHandler, {"ws_path": path}))
    return tornado.web.Application(routes, log_function=log_request)


def servers_by_port(servers) -> dict:
    """Configured client servers grouped by port (config validation keeps one bind per port)."""
    groups = {}
    for server in servers:
        groups.setdefault(server.port, []).append(server)
    return groups


async def _serve(config, worker: int, key) -> int:
    handed = handover.take()
    context = zmq.Context()
    node = Node(config, worker, context, key, handed.mesh_index)
    entries.bind(node)
    try:   # entries, token keys and certificates load before the node joins: a broken one never takes clients
        client_apps = {port: client_app(node, group) for port, group in servers_by_port(config.node.servers).items()}
        contexts = [(tls.server_context(settings, config, where), settings, where, port)
                    for where, settings, port in tls.listeners(config) if not where.startswith("coordinator.")]
    except (entries.EntryError, TokenKeyError, tls.TlsError) as exc:
        kind = {entries.EntryError: "entry ", TokenKeyError: "auth.jwt key "}.get(type(exc), "")
        log.error("cannot start: %s%s", kind, exc)
        node.close()
        context.destroy(linger=0)
        return 2
    ssl_by_port = {port: ssl_context for ssl_context, _, _, port in contexts}
    BUDGET.extra = lambda: len(node.hub.conns) + len(node.api_sockets)   # upgraded, no longer the servers' own
    node.link.start()
    stop, restart = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(handover.DRAIN_SIGNAL, lambda: (restart.set(), stop.set()))
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)   # the supervisor's (a rolling restart), sent to a group
    loop.add_signal_handler(signal.SIGHUP, _reload, node, [item[:3] for item in contexts])
    if os.environ.get(SUPERVISED_ENV):
        # The supervisor orders the stop: a terminal's Ctrl-C reaches it, not us,
        # and if it dies without stopping us we stop on our own.
        loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        watch_parent(stop.set)

    while not node.ready.is_set():
        if stop.is_set() or node.link.fatal:
            break
        try:
            await asyncio.wait_for(node.ready.wait(), 0.2)
        except asyncio.TimeoutError:
            pass
    servers = []
    if node.ready.is_set() and not stop.is_set() and not node.link.fatal:
        servers.append(_listen(ApiRouter(api_app(node), node.api, config.node.api.max_body), handed,
                               config.node.api.bind, config.node.api.port,
                               ssl_options=ssl_by_port.get(config.node.api.port), max_body_size=_API_EARLY_BODY,
                               idle_connection_timeout=_API_IDLE_S, body_timeout=_API_BODY_S,
                               server_class=ApiServer, api=node.api, max_body=config.node.api.max_body))
        for port, group in servers_by_port(config.node.servers).items():
            # docs/protocol.md, Client WebSocket server, Limits: per port, the strictest
            # handshake_timeout and the largest max_header_size (node/client_limits.py refuses
            # headers over a smaller one of a server with 431).
            handshake_s = min(server.handshake_timeout for server in group)
            servers.append(_listen(client_apps[port], handed, group[0].bind, port, ssl_options=ssl_by_port.get(port),
                                   max_buffer_size=max(server.max_message_size for server in group) + 65536,
                                   max_header_size=max(server.max_header_size for server in group),
                                   max_body_size=0,   # an upgrade (or the demo page's GET) has no body
                                   idle_connection_timeout=handshake_s, body_timeout=handshake_s))
        sweeper = tornado.ioloop.PeriodicCallback(lambda: _expire_idle(node), 500)
        sweeper.start()
        log.info("node %d ready: api %s:%d, clients %s, mesh point %s, %s, %s", node.node_id, config.node.api.bind,
                 config.node.api.port, ", ".join(f"{s.bind}:{s.port}{s.path}" for s in config.node.servers),
                 node.mesh_address, event_loop.name(), speedups.describe())
        # What exists now (modules, configuration, the node's parts) lives as long as the process: out of
        # the collector's sight, a full collection no longer walks it on every message-heavy second.
        gc.collect()
        gc.freeze()
        handover.report_ready(handed, node.node_id)
        while not stop.is_set() and not node.link.fatal:
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        sweeper.stop()
    if node.link.fatal:
        log.error("stopping: %s", node.link.fatal)
    await drain(node, servers, restart.is_set(), config.node.drain_timeout)
    context.destroy(linger=0)
    return 3 if node.link.fatal else 0


def _reload(node, contexts) -> None:
    """SIGHUP: users, certificates, log level and the API's allowed origins and hosts again; /ws/v1 connections
    of a removed user are closed 1008."""
    if live.reload(node.config, node.access, contexts) is not None:
        for socket in list(node.api_sockets):
            socket.recheck(node.access.users)


def _expire_idle(node) -> None:
    now = time.monotonic()
    for conn in list(node.hub.conns.values()):
        conn.expire_if_idle(now)


def run(config, worker: int, key) -> int:
    """Runs one node process until SIGTERM/SIGINT; returns its exit code (`key`: the ClusterKey)."""
    logs.setup(config.logging.level, config.logging.format, f"node-w{worker}")
    log.debug("this process may hold %d connections", raise_file_limit())
    try:
        return event_loop.run(_serve(config, worker, key), config.node.event_loop)
    except event_loop.LoopUnavailable as exc:
        log.error("cannot start: %s", exc)
        return 2
