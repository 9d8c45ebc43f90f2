"""The coordinator process: create the IOLoop and zmq.Context, wire the parts, serve."""

import asyncio
import logging
import os
import signal

import zmq
from tornado.httpserver import HTTPServer

from cluster import logs
from cluster.supervisor import SUPERVISED_ENV, watch_parent
from coordinator.control import Control
from coordinator.http import make_app

log = logging.getLogger("meshgate.coordinator")


async def _serve(config, key, fresh: bool) -> None:
    context = zmq.Context()
    control = Control(config, context, key, fresh=fresh)
    server = HTTPServer(make_app(control))
    api = config.coordinator.api
    server.listen(api.port, address=api.bind)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if os.environ.get(SUPERVISED_ENV):   # see node/app.py: the supervisor orders the stop
        loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        watch_parent(stop.set)
    log.info("coordinator ready: registry %s:%d, http %s:%d",
             config.coordinator.registry.bind, config.coordinator.registry.port, api.bind, api.port)
    await stop.wait()
    log.info("coordinator stopping")
    server.stop()
    control.close()
    context.destroy(linger=0)


def run(config, key, fresh: bool = False) -> None:
    """Runs the coordinator until SIGTERM or SIGINT.

    Args:
        key: the ClusterKey (cluster/cluster_key.py).
        fresh: no node of an earlier run can exist (a cluster's first start), so
            new nodes need not wait for old ones to reclaim their ids.
    """
    logs.setup(config.logging.level, config.logging.format, "coordinator")
    asyncio.run(_serve(config, key, fresh))
