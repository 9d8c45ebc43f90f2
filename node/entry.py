"""Entry hooks: what a client server does with its connections' messages.

Only the default entry exists so far (PROTOCOL.md, Client WebSocket server):
each complete client message is pushed as `{"frame": frame}` to the server's
topic. A full topic buffer drops the message and counts it (queues.py).
"""

import logging

from node.queues import QueueFull

log = logging.getLogger("meshgate.entry")


class DefaultEntry:
    name = "default"

    def __init__(self, node, topic: str):
        self.node = node
        self.topic = topic

    def on_open(self, conn) -> None:
        pass

    def on_message(self, conn, frame: dict) -> None:
        try:
            self.node.queue_push(self.topic, conn.client_id, {"frame": frame})
        except QueueFull as exc:
            log.debug("client %d: message dropped: %s", conn.client_id, exc)

    def on_close(self, conn, code, reason) -> None:
        pass


def load(node, server_config):
    """The entry of one configured server."""
    if server_config.entry:
        raise ValueError("custom entries are not available in this version; set entry: null")
    return DefaultEntry(node, server_config.topic)
