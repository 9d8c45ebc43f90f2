"""Thin Tornado adapter over node/api.py for HTTP `/v1/...`: check the caller, parse, execute, reply.

Errors become envelopes here and nowhere else on the HTTP edge
(docs/protocol.md, HTTP status codes): 400 for 101/103, 401/403 for 102,
404/405 with 101, 503 for 501. Every request is checked by the node's
`cluster.access.Access` first, unknown paths included.

Most requests are a POST of a small JSON body by a caller already known.
`ApiRouter` gives those a lean path (`_Call`: Tornado's HTTP/1.1 connection,
no RequestHandler, no coroutine of its own); anything else, or anything the
lean path is not sure of, goes through the Tornado application and its
handlers below, which answer every case.
"""

import asyncio
import logging
import time
from email.utils import formatdate
from typing import Optional

import tornado.routing
import tornado.web
from tornado import httputil

from cluster import protocol
from cluster.access import Denied, refuse
from cluster.protocol import ErrorCode
from node.api import Caller

log = logging.getLogger("meshgate.access")

# docs/protocol.md, HTTP API: path -> method of the executor
ROUTES = {"/v1/mesh/send": "mesh.send", "/v1/mesh/publish": "mesh.publish",
          "/v1/channel/presence": "channel.presence", "/v1/channel/count": "channel.count"}


def json_type(content_type) -> bool:
    """JSON or nothing: a browser can send form and text/plain bodies to any site without asking
    first, so accepting them would let any web page drive the API."""
    return content_type is None or content_type.split(";")[0].strip().lower() == "application/json"


def content_length(value) -> Optional[int]:
    """A Content-Length header's number of bytes, or None when it is absent or not only digits (isdecimal:
    not the superscripts that isdigit takes and int refuses) or too long for int to read: Tornado's to
    refuse. More than 18 digits is beyond any max_body anyway."""
    if value is None or len(value) > 18 or not value.isdecimal():
        return None
    return int(value)


class ApiRouter(tornado.routing.Router):
    """The API port's router: the lean path for what it is sure of, the application for the rest.

    Args:
        app: the Tornado application of the API port (node/app.py api_app).
        api: the node's executor.
        max_body: node.api.max_body.
    """

    def __init__(self, app: tornado.web.Application, api, max_body: int):
        self.app, self.api, self.max_body = app, api, max_body

    def find_handler(self, request, **kwargs):
        method = ROUTES.get(request.path)
        if method is not None and request.method == "POST":
            headers = request.headers
            length = content_length(headers.get("Content-Length"))
            if (length is not None and length <= self.max_body and "Transfer-Encoding" not in headers
                    and json_type(headers.get("Content-Type"))):
                user = self.api.node.access.check_now(request)
                if user is not None:
                    request.connection.set_max_body_size(self.max_body)
                    caller = Caller("", False, roles=user.roles, user=user.name, peer=request.remote_ip)
                    return _Call(self.api, method, caller, request.connection)
        return self.app.find_handler(request, **kwargs)


class DateHeader:
    """The Date header, formatted once a second."""
    second, text = 0, ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.text = second, formatdate(second, usegmt=True)
        return cls.text


class _Call(httputil.HTTPMessageDelegate):
    """One POST to one of ROUTES by a known caller with a JSON body within max_body."""

    def __init__(self, api, method: str, caller: Caller, connection):
        self.api, self.method, self.caller, self.connection = api, method, caller, connection
        self.chunks = []
        self.gone = False

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def finish(self) -> None:
        try:
            params = protocol.parse_http_body(b"".join(self.chunks))
        except Exception as exc:
            self.reply(*self.api.unreadable(self.method, self.caller, exc))
            return
        self.api.execute(self.method, params, self.caller, None, self.reply)

    def on_connection_close(self) -> None:
        self.gone = True

    def reply(self, code, envelope: bytes) -> None:
        if self.gone:
            return
        status = 200 if code is None else protocol.http_status(code)
        headers = httputil.HTTPHeaders({"Content-Type": "application/json", "Content-Length": str(len(envelope)),
                                        "Date": DateHeader.now()})
        if self.api.node.node_id:
            headers["X-Meshgate-Node"] = str(self.api.node.node_id)
        self.connection.write_headers(
            httputil.ResponseStartLine("HTTP/1.1", status, httputil.responses.get(status, "Unknown")),
            headers, envelope)
        self.connection.finish()


class _EnvelopeHandler(tornado.web.RequestHandler):
    def initialize(self, api, max_body: int):
        self.api = api
        self.max_body = max_body
        self.set_default_headers()

    def set_default_headers(self) -> None:
        api = getattr(self, "api", None)   # tornado calls this before initialize() too
        if api is not None and api.node.node_id:
            self.set_header("X-Meshgate-Node", str(api.node.node_id))   # which node answered (operations aid)

    async def prepare(self):
        try:
            self.user = await self.api.node.access.check(self.request)
        except Denied as denied:
            self.api.refused(getattr(self, "method", None), self._caller(), ErrorCode.NOT_AUTHORIZED)
            refuse(self, denied, protocol.error_body(ErrorCode.NOT_AUTHORIZED, denied.message))

    def _caller(self) -> Caller:
        user = getattr(self, "user", None)
        return Caller("", False, roles=user.roles if user else frozenset(), user=user.name if user else "",
                      peer=self.request.remote_ip)

    def reply(self, code, envelope: bytes) -> None:
        """Writes an executor's outcome: `code` None for success, else an ErrorCode."""
        self.set_status(200 if code is None else protocol.http_status(code))
        self.set_header("Content-Type", "application/json")
        self.finish(envelope)

    def reply_error(self, code: ErrorCode, message: str) -> None:
        self.api.refused(getattr(self, "method", None), self._caller(), code)
        self.reply(code, protocol.error_body(code, message).encode("utf-8"))

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
        code = ErrorCode.INVALID_PARAMS if status_code < 500 else ErrorCode.MESH_UNAVAILABLE
        self.set_header("Content-Type", "application/json")
        self.finish(protocol.error_body(code, message))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, tornado.web.HTTPError):
            return
        log.error("HTTP %s %s failed", self.request.method, self.request.path, exc_info=(typ, value, tb))


@tornado.web.stream_request_body
class CallHandler(_EnvelopeHandler):
    """POST to one of ROUTES: the body is the method's parameters."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def initialize(self, api, max_body: int, method: str):
        super().initialize(api, max_body)
        self.method = method
        self._chunks = []
        self._size = 0
        self._too_large = False
        self._wrong_type = None

    async def prepare(self):
        await super().prepare()
        if self._finished:
            return
        if self.request.method != "POST":
            raise tornado.web.HTTPError(405)
        self.request.connection.set_max_body_size(2 ** 40)
        content_type = self.request.headers.get("Content-Type")
        if not json_type(content_type):
            self._wrong_type = content_type
        length = content_length(self.request.headers.get("Content-Length"))
        if length is not None and length > self.max_body:
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
            self.reply_error(ErrorCode.INVALID_PARAMS,
                             f"Content-Type: must be application/json (or absent), not {self._wrong_type!r}")
            return
        if self._too_large:
            self.reply_error(ErrorCode.PAYLOAD_TOO_LARGE, f"body: larger than {self.max_body} bytes")
            return
        try:
            params = protocol.parse_http_body(b"".join(self._chunks))
        except Exception as exc:
            self.reply(*self.api.unreadable(self.method, self._caller(), exc))
            return
        answered = asyncio.get_running_loop().create_future()

        def reply(code, envelope: bytes) -> None:
            try:
                self.reply(code, envelope)
            finally:   # (a reply to a connection that went away may raise: the handler still ends)
                answered.set_result(None)
        self.api.execute(self.method, params, self._caller(), None, reply)
        await answered   # the executor replies (an error included) now or later: Tornado must not finish first

    def _unsupported(self, *args):
        raise tornado.web.HTTPError(405)

    get = head = delete = patch = put = options = _unsupported


class NotFoundHandler(_EnvelopeHandler):
    async def prepare(self):
        await super().prepare()
        if not self._finished:
            raise tornado.web.HTTPError(404)
