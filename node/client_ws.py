"""Client WebSocket handler (port 6790): turns connection events into hub and entry calls."""

import logging
import time

import tornado.websocket

from cluster import protocol
from cluster.protocol import CloseCode
from node.clients import write_frame

log = logging.getLogger("meshgate.node")


class ClientHandler(tornado.websocket.WebSocketHandler):
    """One client connection. Its mutable state is owned by the node's IOLoop."""

    def initialize(self, node, server, entry):
        self.node = node
        self.server = server
        self.entry = entry
        self.client_id = 0
        self.stream = None
        self.channels = set()
        self.context = {}
        self.last_seen = 0.0
        self.remote_addr = ""

    @property
    def max_message_size(self) -> int:
        return self.server.max_message_size   # per server, even when servers share a port

    def check_origin(self, origin: str) -> bool:
        allowed = self.server.allowed_origins
        return not allowed or origin in allowed

    def get_compression_options(self):
        return None   # frames are encoded once and shared: no per-connection deflate

    def open(self, *args):
        node = self.node
        self.client_id = node.ids.make()
        self.remote_addr = self.request.remote_ip
        self._release_request()
        self.stream = self.ws_connection.stream
        self.stream.max_write_buffer_size = self.server.write_buffer_limit
        self.last_seen = time.monotonic()
        node.client_opened(self)
        self.entry.on_open(self)

    def on_message(self, message):
        self.last_seen = time.monotonic()
        self.node.counters.in_total += 1
        self.entry.on_message(self, protocol.client_frame(message))

    def on_ping(self, data):
        self.last_seen = time.monotonic()

    def on_close(self):
        self.stream = None
        if self.client_id:
            self.node.client_closed(self)
            self.entry.on_close(self, self.close_code, self.close_reason)

    def _release_request(self) -> None:
        """Drops what only the handshake needed: an idle connection should cost little memory."""
        self.request = None
        self.ui = None
        self._headers = None
        self.path_args = self.path_kwargs = None

    def log_exception(self, typ, value, tb) -> None:
        log.error("%s: %s", self.describe(), value, exc_info=(typ, value, tb))

    # --- the connection API (conn.call and entries) ---------------------------

    def describe(self) -> str:
        return f"client {self.client_id} from {self.remote_addr}"

    def set_context_value(self, key: str, value) -> None:
        if value is None:
            self.context.pop(key, None)
        else:
            self.context[key] = value

    def set_context(self, context: dict) -> None:
        self.context = dict(context)

    def send(self, data, msg_type: str = "text") -> bool:
        if isinstance(data, str):
            data = data.encode("utf-8")
        return write_frame(self, protocol.encode_ws_frame(data, msg_type == "binary"), self.node.counters)

    def expire_if_idle(self, now: float) -> None:
        if now - self.last_seen > self.server.read_timeout:
            self.close(int(CloseCode.GOING_AWAY), "read timeout")

    def shutdown(self) -> None:
        self.close(int(CloseCode.GOING_AWAY), "server shutting down")
