"""Thin Tornado adapter over node/api.py for the backend WebSocket `/ws/v1`: parse, execute, reply.

Requests may be pipelined: the ones that wait for the mesh keep running and
their replies carry `i` in whatever order they finish, at most
`node.api.max_in_flight` of them per connection. Malformed input gets an
error envelope and the connection keeps answering. The connection is also a
consumer for `queue.pop`; closing it is an implicit `queue.unpop`.
"""

import logging

import tornado.websocket

from cluster import protocol
from cluster.access import OPEN, Denied, refuse
from cluster.protocol import DRAIN_CLOSES, ApiError, CloseCode, ErrorCode
from node.api import Caller
from node.client_protocol import ClientProtocol
from node.clients import flush, write_to_backend

log = logging.getLogger("meshgate.access")

_PONG = protocol.encode_ws_frame(b"pong")


class ApiSocket(tornado.websocket.WebSocketHandler):
    _closed_by_server = None   # (code, reason) of our own close (ClientProtocol sets it)

    def initialize(self, api, node, max_body: int):
        self.api = api
        self.node = node
        self.max_body = max_body
        self.max_in_flight = node.config.node.api.max_in_flight
        self.stream = None
        self.consumer_id = 0
        self.caller = None
        self._running = 0   # requests executed and not answered yet

    def check_origin(self, origin: str) -> bool:
        return True   # checked in get(), by the same rules as HTTP (cluster/access.py)

    def get_websocket_protocol(self):
        """The client servers' strict reader, which also reads many pipelined requests per system call."""
        if self.request.headers.get("Sec-WebSocket-Version") != "13":
            return None
        params = tornado.websocket._WebSocketParams(max_message_size=self.max_message_size, compression_options=None)
        return ClientProtocol(self, False, params)

    def on_frame(self) -> bool:
        return True   # no rate limit on the backend API

    async def get(self, *args, **kwargs):
        if self.node.node_id:
            self.set_header("X-Meshgate-Node", str(self.node.node_id))   # on the 101 too: which node holds it
        try:
            self.user = await self.node.access.check(self.request)
        except Denied as denied:
            refuse(self, denied, protocol.error_body(ErrorCode.NOT_AUTHORIZED, denied.message))
            return
        headers = self.request.headers
        if (headers.get("Upgrade", "").lower() != "websocket"
                or "upgrade" not in headers.get("Connection", "").lower()):
            self.send_error(400)
            return
        await super().get(*args, **kwargs)

    def send_error(self, status_code: int = 500, **kwargs) -> None:
        """A request to /ws/v1 that is not a WebSocket upgrade still gets an envelope."""
        if self._headers_written:
            return super().send_error(status_code, **kwargs)
        self.clear()
        self.set_status(status_code if status_code < 500 else 503)
        self.set_header("Content-Type", "application/json")
        self.finish(protocol.error_body(ErrorCode.INVALID_PARAMS if status_code < 500 else ErrorCode.MESH_UNAVAILABLE,
                                        "/ws/v1: a WebSocket upgrade (GET with Upgrade: websocket) is required"))

    def open(self):
        self.stream = self.ws_connection.stream
        self.stream.max_write_buffer_size = self.node.config.node.api.write_buffer_limit
        self.consumer_id = self.node.queues.consumers.new_id()
        self.caller = Caller("p.", True, consumer=self, roles=self.user.roles, user=self.user.name,
                             peer=self.request.remote_ip)
        self.node.api_sockets.add(self)
        self.recheck(self.node.access.users)   # the users may have been reloaded while the upgrade went on

    def describe(self) -> str:
        return f"API connection {self.consumer_id} from {self.request.remote_ip}"

    def reply(self, code, envelope: bytes) -> None:
        """Writes an executor's outcome (or any envelope) to this connection; nothing once it closed."""
        write_to_backend(self, protocol.encode_ws_frame(envelope), self.node.counters)

    def reply_error(self, code: ErrorCode, message: str, req_id, method: str = None) -> None:
        self.api.refused(method, self.caller, code)
        self.reply(code, protocol.error_body(code, message, req_id, ws=True).encode("utf-8"))

    def on_message(self, message):
        if message == "ping":
            write_to_backend(self, _PONG, self.node.counters)
            return
        if len(message) > self.max_body or (
                len(message) * 4 > self.max_body and isinstance(message, str) and not message.isascii()
                and len(message.encode("utf-8")) > self.max_body):
            self.reply_error(ErrorCode.PAYLOAD_TOO_LARGE, f"request: larger than {self.max_body} bytes", None)
            return
        try:
            method, params, req_id = protocol.parse_ws_request(message)
        except Exception as exc:
            self.reply(*self.api.unreadable(None, self.caller, exc, exc.req_id if isinstance(exc, ApiError) else None))
            return
        if self._running >= self.max_in_flight:
            self.reply_error(ErrorCode.MESH_UNAVAILABLE, f"{method}: {self._running} requests of this "
                             "connection are still in flight; retry later", req_id, method)
            return
        self._running += 1
        self.api.execute(method, params, self.caller, req_id, self._answered)

    def _answered(self, code, envelope: bytes) -> None:
        """An executed request's reply (exactly one each): one fewer in flight."""
        self._running -= 1
        self.reply(code, envelope)

    def close(self, code: int = None, reason: str = None) -> None:
        # No more events for it: those not written yet go to another consumer or wait (docs/protocol.md, queue.pop).
        self.node.queues.stop_consuming(self.consumer_id)
        flush(self)   # replies before the close frame
        super().close(code, reason)

    def on_close(self):
        self.node.queues.stop_consuming(self.consumer_id)
        self.node.api_sockets.discard(self)
        self.stream = None

    def shutdown(self, restart: bool = False) -> None:
        """The node drains (node/drain.py): no more queue events; closed (1001 when the node stops, 1012 when
        it is replaced) once every request read so far is answered. Called again until it is closed."""
        self.node.queues.stop_consuming(self.consumer_id)
        if not self._running:
            self.close(*(DRAIN_CLOSES[restart]))

    def reads_after_close(self) -> bool:
        return False   # a request that comes after the close frame is not run: it gets no answer

    def recheck(self, users) -> None:
        """After a reload (SIGHUP): keep this connection with its user's new roles, or close it 1008."""
        if users.open:   # no users any more: the API is open (and listens on loopback only)
            self.user = OPEN
        else:
            user = users.still_valid(self.user)
            if user is None:
                log.info("closing %s: its user %r is gone", self.describe(), self.user.name)
                self.close(int(CloseCode.POLICY_VIOLATION), "user removed")
                return
            self.user = user
        self.caller = self.caller._replace(roles=self.user.roles)
