"""Thin Tornado adapter over node/api.py: the backend WebSocket `/ws/v1`.

Requests may be pipelined: the ones that need the mesh run as tasks and their
replies carry `i` in whatever order they finish. Malformed input gets an
error envelope and the connection keeps answering. The connection is also a
consumer for `queue.pop`; closing it is an implicit `queue.unpop`.
"""

import asyncio
import logging

import tornado.websocket

from cluster import protocol
from cluster.protocol import ApiError, CloseCode, ErrorCode
from node.clients import write_frame

log = logging.getLogger("meshgate.access")

_PONG = protocol.encode_ws_frame(b"pong")


class ApiSocket(tornado.websocket.WebSocketHandler):
    def initialize(self, api, node, max_body: int):
        self.api = api
        self.node = node
        self.max_body = max_body
        self.stream = None
        self.consumer_id = 0
        self._tasks = set()

    # check_origin: Tornado's default. Backends send no Origin (or their own host);
    # a web page of another site cannot open /ws/v1 from a browser.

    async def get(self, *args, **kwargs):
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
        self.consumer_id = self.node.consumers.new_id()
        self.node.api_sockets.add(self)

    def describe(self) -> str:
        return f"API connection {self.consumer_id} from {self.request.remote_ip}"

    def reply(self, body: str) -> None:
        write_frame(self, protocol.encode_ws_frame(body.encode("utf-8")), self.node.counters)

    def on_message(self, message):
        if message == "ping":
            write_frame(self, _PONG, self.node.counters)
            return
        if len(message) > self.max_body or (
                len(message) * 4 > self.max_body and isinstance(message, str) and not message.isascii()
                and len(message.encode("utf-8")) > self.max_body):
            self.reply(protocol.error_body(ErrorCode.PAYLOAD_TOO_LARGE,
                                           f"request: larger than {self.max_body} bytes", None, ws=True))
            return
        try:
            method, params, req_id = protocol.parse_ws_request(message)
        except ApiError as exc:
            self.reply(protocol.error_body(exc.code, exc.message, exc.req_id, ws=True))
            return
        try:
            if method == "queue.pop":
                result = self.api.queue_pop(self, params)
            elif method == "queue.unpop":
                result = self.api.queue_unpop(self, params)
            elif len(self._tasks) >= self.node.config.node.api.max_in_flight:
                raise ApiError(ErrorCode.MESH_UNAVAILABLE,
                               f"{method}: {len(self._tasks)} requests of this connection are still in flight; retry later")
            else:
                task = asyncio.ensure_future(self._run(method, params, req_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
        except ApiError as exc:
            self.reply(protocol.error_body(exc.code, exc.message, req_id, ws=True))
            return
        self.reply(protocol.ok_body(result, req_id, ws=True))

    async def _run(self, method: str, params, req_id) -> None:
        try:
            if method == "mesh.send":
                result = await self.api.mesh_send(params)
            elif method == "mesh.publish":
                result = await self.api.mesh_publish(params)
            else:
                result = await self.api.conn_call(params)
            body = protocol.ok_body(result, req_id, ws=True)
        except ApiError as exc:
            body = protocol.error_body(exc.code, exc.message, req_id, ws=True)
        except Exception:
            log.exception("%s failed on %s", method, self.describe())
            body = protocol.error_body(ErrorCode.MESH_UNAVAILABLE, "internal error", req_id, ws=True)
        if self.stream is not None and not self.stream.closed():
            self.reply(body)

    def on_close(self):
        self.node.stop_consuming(self.consumer_id)
        self.node.api_sockets.discard(self)
        self.stream = None

    def shutdown(self) -> None:
        self.close(int(CloseCode.GOING_AWAY), "server shutting down")
