"""A node process's graceful drain: stop accepting, close connections, hand on queue events, say goodbye.

Two kinds (docs/operations.md): a stop (SIGTERM) closes the client and API
connections with 1001; a restart (the supervisor's order in a rolling restart)
with 1012, so that they reconnect at once to the processes that still accept.
Then, under one deadline (`node.drain_timeout`): the connections finish closing
(what a client sent before it read the close frame is still handled, and one
that completes its handshake meanwhile is closed too), HTTP requests under way
are answered (`Connection: close`; a connection whose first request has not
come is not waited for), queue events waiting here go to consumers
anywhere in the mesh (on a restart also to this node's own consumers once they
reconnect elsewhere), every event handed to a peer is answered, and every
event held here for an at-least-once consumer is acknowledged (or, released,
delivered again and acknowledged). Then the
adverts are flushed, the coordinator is told goodbye, the mesh point answers
what peers still send for GOODBYE_S, and the node closes. Events still waiting
are lost, and logged. Owned by the node's IOLoop.
"""

import asyncio
import logging
import time

log = logging.getLogger("meshgate.node")

GOODBYE_S = 0.2   # after the goodbye: peers that sent before they heard it are answered
_POLL_S = 0.05


async def drain(node, servers: list, restart: bool, deadline_s: float) -> None:
    """Drains `node` (its HTTP servers `servers`); returns when it is closed, at most `deadline_s` + GOODBYE_S later."""
    end = time.monotonic() + deadline_s
    for server in servers:
        server.stop()
        server.end_keep_alive()
    log.info("draining for a %s: closing %d client and %d API connections with %d", "restart" if restart else "stop",
             len(node.hub.conns), len(node.api_sockets), 1012 if restart else 1001)
    # On a restart, this node's consumers reconnect to another process: what waits here for their topics goes there.
    awaited = set().union(*node.queues.consumers.topics.values()) if restart else set()
    while True:
        _close_open(node, restart)
        if _drained(node, servers, awaited) or time.monotonic() >= end:
            break
        await asyncio.sleep(_POLL_S)
    node.adverts.flush()
    if node.node_id:
        node.link.leave()
        await asyncio.sleep(GOODBYE_S)
    left = node.queues.buffers.depth()
    if left:
        log.warning("%d queue events had no consumer to go to before the drain deadline; lost", left)
    held = len(node.queues.acks.held)
    if held:
        log.warning("%d queue events were not acknowledged by their at-least-once consumers before the drain "
                    "deadline; lost", held)
    node.close()
    log.info("node %d stopped", node.node_id)


def _close_open(node, restart: bool) -> None:
    """Closes every client and API connection not closing yet (those opened since the last look included)."""
    for conn in list(node.hub.conns.values()) + list(node.api_sockets):
        if conn._closed_by_server is None:
            try:
                conn.shutdown(restart)
            except Exception:
                log.exception("closing %s failed", conn.describe())


def _drained(node, servers: list, awaited: set) -> bool:
    """Nothing left to wait for: connections closed, queue events handed on and answered."""
    if node.hub.conns or node.api_sockets or any(server.busy() for server in servers):
        return False
    queues = node.queues
    if queues.in_flight or len(queues.acks.held):   # events at-least-once consumers have not acknowledged yet
        return False
    for topic in queues.buffers.topics():
        if node.routing.has_consumers(topic):
            queues.drain(topic)
            return False
        if topic in awaited:
            return False
    return True
