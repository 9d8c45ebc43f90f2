"""Lifecycle events (docs/protocol.md, Lifecycle events): an open and a close queue message per connection.

A client server with `lifecycle_topic` pushes, through the ordinary queue
path (node/queue_dispatch.py: buffering, competing consumers, per-client
order), `{"open": {...}}` once the connection's `on_open` finished and
`{"close": {...}}` when it closed. The open message always comes first: a
connection that closes while its `on_open` still runs has its close message
pushed right after its open message. A topic that cannot take a message
drops it and counts it, as any queue push. Owned by the node's IOLoop.

The close messages of a node process that dies are pushed by another node
(`lost_closes`, from the coordinator's hand-off).
"""

import logging

from cluster.ids import node_id_of
from node.queues import QueueFull

log = logging.getLogger("meshgate.node")

# conn.lifecycle: where a connection of a lifecycle server stands.
WAITING, OPEN_PUSHED, CLOSED = 0, 1, 2


def _push(node, topic: str, client_id: int, data: dict, holder: int = 0) -> None:
    try:
        node.queues.push(topic, client_id, data, holder)
    except QueueFull as exc:
        log.info("client %d: lifecycle message dropped: %s", client_id, exc)


def push_open(conn) -> None:
    """The open message (after on_open); then the close message if the connection closed meanwhile."""
    topic = conn.server.lifecycle_topic
    _push(conn.node, topic, conn.client_id, {"open": {
        "path": conn.path, "remote_addr": conn.remote_addr, "query": conn.query, "context": conn.context}})
    pending = conn.lifecycle
    conn.lifecycle = OPEN_PUSHED
    if type(pending) is tuple:   # (code, reason) of a close that came first
        push_close(conn, *pending)
    else:
        conn.node.adverts.client_watched(conn.client_id, topic)   # if this node dies, another pushes its close


def push_close(conn, code: int, reason: str) -> None:
    """The close message now, or right after the open message when that is still to come."""
    if conn.lifecycle == WAITING:
        conn.lifecycle = (code, reason)
        return
    if conn.lifecycle != OPEN_PUSHED:
        return   # pushed already
    conn.lifecycle = CLOSED
    _push(conn.node, conn.server.lifecycle_topic, conn.client_id,
          {"close": {"code": code, "reason": reason, "lost": False}})


def lost_closes(node, clients) -> int:
    """Close messages for the clients of a node process that died: `clients` are `(client_id, topic)`."""
    for client_id, topic in clients:
        _push(node, topic, client_id, {"close": {"code": 1006, "reason": "node lost", "lost": True}},
              node_id_of(client_id))
    return len(clients)
