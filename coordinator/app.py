"""The coordinator process: create the IOLoop and zmq.Context, wire the parts, serve."""

import asyncio
import logging
import os
import signal

import zmq

from cluster import live, logs, tls
from cluster.access import Access
from cluster.http_server import BoundedHTTPServer, raise_file_limit
from cluster.supervisor import SUPERVISED_ENV, watch_parent
from coordinator.control import Control
from coordinator.http import make_app

log = logging.getLogger("meshgate.coordinator")

_IDLE_S = 60.0


async def _serve(config, key, fresh: bool) -> int:
    context = zmq.Context()
    api = config.coordinator.api
    try:
        contexts = [(tls.server_context(api.tls, config, "coordinator.api.tls"), api.tls, "coordinator.api.tls")] \
            if api.tls else []
    except tls.TlsError as exc:
        log.error("cannot start: %s", exc)
        return 2
    control = Control(config, context, key, fresh=fresh)
    access = Access(config)
    # GETs only: a body of a few bytes at most (to answer a wrong method with its envelope), headers
    # within a minute, an idle keep-alive connection closed after one.
    server = BoundedHTTPServer(make_app(control, access), ssl_options=contexts[0][0] if contexts else None,
                               max_body_size=4096, idle_connection_timeout=_IDLE_S, body_timeout=_IDLE_S)
    server.listen(api.port, address=api.bind)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, live.reload, config, access, contexts)
    if os.environ.get(SUPERVISED_ENV):   # see node/app.py: the supervisor orders the stop
        loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)   # the supervisor's (a rolling restart), sent to a group
        watch_parent(stop.set)
    log.info("coordinator ready: registry %s:%d, http %s:%d",
             config.coordinator.registry.bind, config.coordinator.registry.port, api.bind, api.port)
    await stop.wait()
    log.info("coordinator stopping")
    server.stop()
    control.close()
    context.destroy(linger=0)
    return 0


def run(config, key, fresh: bool = False) -> int:
    """Runs the coordinator until SIGTERM or SIGINT; returns its exit code (2: it cannot start).

    Args:
        key: the ClusterKey (cluster/cluster_key.py).
        fresh: no node of an earlier run can exist (a cluster's first start), so
            new nodes need not wait for old ones to reclaim their ids.
    """
    logs.setup(config.logging.level, config.logging.format, "coordinator")
    raise_file_limit()
    return asyncio.run(_serve(config, key, fresh))
