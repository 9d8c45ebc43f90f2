"""The API port's HTTP/1.1 for what most backends send, read and answered on the socket itself.

Tornado's HTTP/1.1 connection costs a node about 0.25 ms of CPU per request
on this project's 2-core bench machine (futures per read, header objects, two
`setsockopt` calls and a dozen `getpid` calls per request), about half of a
node's CPU in a publish round with few subscribers. `ApiServer` takes each
plain-HTTP connection first: a `FastConnection` reads it with one reader on
the loop, and answers a request it is sure of itself:

    POST <one of ROUTES> HTTP/1.1, a Content-Length within node.api.max_body,
    no Transfer-Encoding, Expect or Upgrade, a JSON content type (or none),
    each header once, and a caller the node knows at once (`Access.check_now`).

Such a request runs through `Api.execute` exactly as on the lean Tornado
path (node/api_http.py `_Call`): the same envelopes, status codes and
headers (`Content-Type`, `Content-Length`, `Date`, `X-Meshgate-Node`, and
`Connection: close` when the client asked for it). The first request it is
not sure of (any other method or path, a WebSocket upgrade, HTTP/1.0, an
unknown caller, a body too large, a head it cannot read, ...) hands the
connection, with every byte read so far, to Tornado, which serves it from
then on as before. TLS connections go to Tornado at once.

One request at a time per connection (a pipelined one waits in the buffer
until the answer before it is written); the same time limits as Tornado's
(docs/protocol.md, HTTP API, Time): the head within 60 s of the connection or
the previous answer, the body within 60 s more, checked once a second by
the server's sweep. Owned by the node's IOLoop.
"""

import asyncio
import socket
import time

from tornado.iostream import IOStream
from tornado.ioloop import PeriodicCallback

from cluster import protocol, speedups
from cluster.http_server import BoundedHTTPServer
from node.api import Caller
from node.api_http import ROUTES, DateHeader, content_length, json_type

_HEAD_MAX = 65536          # Tornado's default max_header_size: a longer head is Tornado's to refuse
_READ = 65536
_TARGETS = {b"POST " + path.encode("ascii") + b" HTTP/1.1": method for path, method in ROUTES.items()}
_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
            503: b"Service Unavailable"}


class _Request:
    """What `Access.check_now` reads of a request (the shape of Tornado's): headers, remote_ip, protocol."""
    __slots__ = ("headers", "remote_ip")
    protocol = "http"

    def __init__(self, headers: dict, remote_ip: str):
        self.headers, self.remote_ip = headers, remote_ip


def _head(head: bytes):
    """`(method, headers, length, close)` of a request head (without its blank line) this module serves,
    else None: `length` its Content-Length, `close` whether the client asked for `Connection: close`.

    `headers` is a plain dict of the values by lower-cased name (Access reads them by lower-case names,
    as it reads Tornado's). cluster/_speedups.c has the same function in C (`parse_head`)."""
    lines = head.split(b"\r\n")
    method = _TARGETS.get(lines[0])
    if method is None:
        return None
    headers = {}
    for line in lines[1:]:
        if b"\n" in line or b"\r" in line:
            return None
        name, colon, value = line.partition(b":")
        if not colon or not name or b" " in name or b"\t" in name:
            return None   # a folded line, a space before the colon, no colon: Tornado decides
        key = name.decode("latin-1").lower()
        if key in headers:
            return None
        headers[key] = value.strip(b" \t").decode("latin-1")
    length = content_length(headers.get("content-length"))
    if (length is None or "transfer-encoding" in headers or "expect" in headers or "upgrade" in headers
            or not json_type(headers.get("content-type"))):
        return None
    connection = headers.get("connection", "keep-alive").lower()
    if connection not in ("keep-alive", "close"):
        return None
    return method, headers, length, connection == "close"


head_python = _head
if speedups.native is not None:
    speedups.native.setup_head(_TARGETS, head_python)
    _head = speedups.native.parse_head


class FastConnection:
    """One plain-HTTP connection of the API port until it is handed to Tornado (or closes)."""
    __slots__ = ("server", "sock", "address", "fd", "buffer", "pos", "deadline", "busy", "answered", "closing",
                 "out", "paused", "closed", "body_due", "reading", "user", "caller")

    def __init__(self, server: "ApiServer", sock: socket.socket, address):
        self.server, self.sock, self.address = server, sock, address
        self.fd = sock.fileno()
        self.buffer = bytearray()   # what was read and not answered yet, from `pos`
        self.pos = 0
        self.deadline = time.monotonic() + server.idle_s   # the next head, whole, by then
        self.busy = False        # a request is running or its answer is being written
        self.answered = False    # one answer went out already
        self.closing = False     # close once the running request is answered
        self.out = None          # what the kernel did not take of an answer
        self.paused = False      # not reading: a pipelining client has this much waiting already
        self.closed = False
        self.body_due = False    # the deadline is the body's (set once per request)
        self.reading = False     # in `_next`'s loop (an answer given at once does not start another)
        self.user = self.caller = None   # the last request's User, and its Caller
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # answers are whole: never wait for more
        server.loop.add_reader(self.fd, self._readable)

    # --- input ------------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            data = self.sock.recv(_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        if not data:
            self.abort()
            return
        buffer = self.buffer
        if self.pos and self.pos * 2 > len(buffer):
            del buffer[:self.pos]
            self.pos = 0
        buffer += data
        if not self.busy:
            self._next()
        elif len(buffer) - self.pos > _HEAD_MAX + self.server.max_body:   # a pipelining client waits for answers
            self.paused = True
            self.server.loop.remove_reader(self.fd)

    def _next(self) -> None:
        """Serves the requests in the buffer, one at a time, while each is answered at once."""
        self.reading = True
        try:
            while not self.busy and not self.closed and self.pos < len(self.buffer) and self._start():
                pass
        finally:
            self.reading = False

    def _start(self) -> bool:
        """Starts the request at `pos` if it is whole; False when it is not (or went to Tornado)."""
        data, pos = self.buffer, self.pos
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            if len(data) - pos > _HEAD_MAX or data.find(b"\n\n", pos) >= 0:
                self.hand_over()
            return False
        parsed = _head(bytes(data[pos:end]))
        if parsed is None:
            self.hand_over()
            return False
        method, headers, length, close = parsed
        if length > self.server.max_body:
            self.hand_over()
            return False
        api = self.server.api
        user = api.node.access.check_now(_Request(headers, self.address[0]))
        if user is None:
            self.hand_over()
            return False
        start = end + 4
        if len(data) < start + length:   # the body is on its way
            if not self.body_due:
                self.body_due = True
                self.deadline = time.monotonic() + self.server.body_s
            return False
        body = bytes(data[start:start + length])
        self.pos = start + length
        if self.pos == len(data):
            data.clear()
            self.pos = 0
        self.body_due = False
        if close:
            self.closing = True
        self.busy = True
        self.deadline = None   # the executor bounds what it waits for
        if self.user is not user:   # (a User is immutable: the same one, the same Caller)
            self.user, self.caller = user, Caller("", False, roles=user.roles, user=user.name, peer=self.address[0])
        caller = self.caller
        try:
            params = protocol.parse_http_body(body)
        except Exception as exc:
            self.reply(*api.unreadable(method, caller, exc))
            return True
        api.execute(method, params, caller, None, self.reply)
        return True

    # --- output -----------------------------------------------------------------------

    def reply(self, code, envelope: bytes) -> None:
        if self.closed:
            return
        status = 200 if code is None else protocol.http_status(code)
        node_id = self.server.api.node.node_id
        head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nDate: %s\r\n" % (
            status, _REASONS.get(status, b"Unknown"), len(envelope), DateHeader.now().encode("ascii"))
        if node_id:
            head += b"X-Meshgate-Node: %d\r\n" % node_id
        if self.closing:
            head += b"Connection: close\r\n"
        self._write(head + b"\r\n" + envelope)

    def _write(self, data) -> None:
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.abort()
            return
        if sent < len(data):
            self.out = memoryview(data)[sent:]
            self.server.loop.add_writer(self.fd, self._writable)
            return
        self._answered()

    def _writable(self) -> None:
        data, self.out = self.out, None
        self.server.loop.remove_writer(self.fd)
        self._write(data)

    def _answered(self) -> None:
        self.busy = False
        self.answered = True
        if self.closing:
            self.abort()
            return
        self.deadline = time.monotonic() + self.server.idle_s
        if self.paused:
            self.paused = False
            self.server.loop.add_reader(self.fd, self._readable)
        if not self.reading and self.pos < len(self.buffer):   # answered later than asked: go on from here
            self._next()

    # --- the end ------------------------------------------------------------------------

    def hand_over(self) -> None:
        """Tornado serves this connection from now on, starting with what was read of it."""
        self._detach()
        self.server.to_tornado(self.sock, self.address, bytes(self.buffer[self.pos:]))

    def abort(self) -> None:
        if not self.closed:
            self._detach()
            self.sock.close()

    def _detach(self) -> None:
        self.closed = True
        loop = self.server.loop
        if not self.paused:
            loop.remove_reader(self.fd)
        if self.out is not None:
            loop.remove_writer(self.fd)
        self.server.fast.discard(self)


class ApiServer(BoundedHTTPServer):
    """The API port's server: plain-HTTP connections start as FastConnections (see the module docstring).

    Args (besides HTTPServer's): api, the node's executor; max_body, node.api.max_body.
    """

    def initialize(self, *args, api, max_body: int, **kwargs):
        super().initialize(*args, **kwargs)
        self.api, self.max_body = api, max_body
        self.idle_s = kwargs.get("idle_connection_timeout") or 3600.0
        self.body_s = kwargs.get("body_timeout") or 3600.0
        self.loop = asyncio.get_running_loop()
        self.fast = set()
        self._sweep = PeriodicCallback(self._expire, 1000)
        self._sweep.start()

    def _handle_connection(self, connection, address) -> None:
        if self.ssl_options is not None:
            super()._handle_connection(connection, address)
            return
        if self.over_budget(connection):
            return
        self.fast.add(FastConnection(self, connection, address))

    def to_tornado(self, sock: socket.socket, address, buffered: bytes) -> None:
        stream = IOStream(sock, max_buffer_size=self.max_buffer_size, read_chunk_size=self.read_chunk_size)
        if buffered:   # Tornado reads its buffer before the socket
            stream._read_buffer += buffered
            stream._read_buffer_size += len(buffered)
        self.handle_stream(stream, address)

    def held(self) -> int:
        return super().held() + len(self.fast)

    def end_keep_alive(self) -> None:
        super().end_keep_alive()
        for conn in list(self.fast):   # as Tornado's: idle ones that answered close now, the rest after an answer
            if conn.answered and not conn.busy and conn.pos == len(conn.buffer):
                conn.abort()
            else:
                conn.closing = True

    def busy(self) -> int:
        return super().busy() + sum(1 for conn in self.fast if conn.busy)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [conn for conn in self.fast if conn.deadline is not None and conn.deadline < now]:
            conn.abort()
