"""Thin Tornado adapters over node/api.py: HTTP `/v1/mesh/send` and `/v1/mesh/publish`.

Errors become envelopes here and nowhere else on the HTTP edge (PROTOCOL.md,
HTTP status codes): 400 for 101/103, 404/405 with 101, 503 for 501.
"""

import logging

import tornado.web

from cluster import protocol
from cluster.protocol import ApiError, ErrorCode

log = logging.getLogger("meshgate.access")


class _EnvelopeHandler(tornado.web.RequestHandler):
    def initialize(self, api, max_body: int):
        self.api = api
        self.max_body = max_body
        self.set_default_headers()

    def set_default_headers(self) -> None:
        api = getattr(self, "api", None)   # tornado calls this before initialize() too
        if api is not None and api.node.node_id:
            node_id = api.node.node_id
            self.set_header("X-Meshgate-Node", str(node_id))   # which node answered (operations aid)

    def send_envelope(self, status: int, body: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(body)

    def send_error_envelope(self, code: ErrorCode, message: str, status: int = None) -> None:
        self.send_envelope(status or protocol.http_status(code), protocol.error_body(code, message))

    def write_error(self, status_code: int, **kwargs) -> None:
        if status_code == 405:
            message = f"{self.request.method} is not allowed on {self.request.path}; use POST"
        elif status_code == 404:
            message = f"{self.request.path}: no such endpoint"
        elif status_code < 500:
            message = self._reason
        else:
            message = "internal error"
            self.set_status(protocol.http_status(ErrorCode.MESH_UNAVAILABLE))
        self.set_header("Content-Type", "application/json")
        self.finish(protocol.error_body(ErrorCode.INVALID_PARAMS if status_code < 500 else ErrorCode.MESH_UNAVAILABLE,
                                        message))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, tornado.web.HTTPError):
            return
        log.error("HTTP %s %s failed", self.request.method, self.request.path, exc_info=(typ, value, tb))


@tornado.web.stream_request_body
class MeshHandler(_EnvelopeHandler):
    """POST /v1/mesh/send and /v1/mesh/publish."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def initialize(self, api, max_body: int, action: str):
        super().initialize(api, max_body)
        self.action = action
        self._chunks = []
        self._size = 0
        self._too_large = False
        self._wrong_type = None

    def prepare(self):
        if self.request.method != "POST":
            raise tornado.web.HTTPError(405)
        self.request.connection.set_max_body_size(2 ** 40)
        # JSON or nothing: a browser can send form and text/plain bodies to any site
        # without asking first, so accepting them would let any web page drive the API.
        content_type = self.request.headers.get("Content-Type")
        if content_type is not None and content_type.split(";")[0].strip().lower() != "application/json":
            self._wrong_type = content_type
        length = self.request.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_body:
            self._too_large = True

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self.max_body:
            self._too_large = True
            self._chunks = []
        elif not self._too_large and self._wrong_type is None:
            self._chunks.append(chunk)

    async def post(self):
        if self._wrong_type is not None:
            self.send_error_envelope(ErrorCode.INVALID_PARAMS,
                                     f"Content-Type: must be application/json (or absent), not {self._wrong_type!r}")
            return
        if self._too_large:
            self.send_error_envelope(ErrorCode.PAYLOAD_TOO_LARGE, f"body: larger than {self.max_body} bytes")
            return
        try:
            params = protocol.parse_http_body(b"".join(self._chunks))
            if self.action == "send":
                result = await self.api.mesh_send(params, prefix="")
            else:
                result = await self.api.mesh_publish(params, prefix="")
        except ApiError as exc:
            self.send_error_envelope(exc.code, exc.message)
            return
        self.send_envelope(200, protocol.ok_body(result))

    def _unsupported(self, *args):
        raise tornado.web.HTTPError(405)

    get = head = delete = patch = put = options = _unsupported


class NotFoundHandler(_EnvelopeHandler):
    def prepare(self):
        raise tornado.web.HTTPError(404)
