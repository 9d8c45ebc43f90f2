"""Client WebSocket handler (port 6790): one client connection, and the `conn` its entry sees.

Turns connection events into hub and entry calls. The methods under "the
connection API" are what entries (docs/entries.md) and `conn.call` use.
"""

import asyncio
import functools
import logging
import time
import types

import tornado.web
import tornado.websocket

from cluster import protocol
from cluster.protocol import DRAIN_CLOSES, CloseCode
from node import lifecycle
from node.client_limits import report_broken, take_token
from node.client_protocol import ClientProtocol, slim_stream
from node.clients import NO_CHANNELS, flush, write_frame
from node.entry import ConnectionGone, ContextTimeout, check_name, encode_data
from node.hooks import AFTER

log = logging.getLogger("meshgate.node")


# A connection's token claims until it has some (most never do).
NO_CLAIMS = types.MappingProxyType({})
NO_KWARGS = types.MappingProxyType({})


@functools.lru_cache(maxsize=None)
def _params(ping_interval, ping_timeout, max_message_size: int) -> tornado.websocket._WebSocketParams:
    """One (read-only) settings object per server, not one per connection."""
    return tornado.websocket._WebSocketParams(ping_interval=ping_interval, ping_timeout=ping_timeout,
                                              max_message_size=max_message_size, compression_options=None)


class ClientHandler(tornado.websocket.WebSocketHandler):
    """One client connection. Its mutable state is owned by the node's IOLoop.

    Its own attributes are slots, all set in initialize(): Tornado's handler
    classes already give an instance 27 attributes, and CPython keeps an
    instance's attributes in a shared-key table (about 0.3 KiB) only up to
    29 names; past them the instance gets a dict of its own (1.6 KiB). A slot
    costs 8 bytes.
    """

    __slots__ = ("node", "server", "entry", "gate", "client_id", "stream", "channels", "_context",
                 "last_seen", "remote_addr", "path", "query", "headers", "hook_busy", "hook_pending",
                 "hook_pending_bytes", "_waiters", "_opened", "_closed_by_server", "claims", "expires_at",
                 "holds_slot", "bucket_tokens", "bucket_time", "_token_channels", "lifecycle")

    def initialize(self, node, server, entry, gate):
        self.node = node
        self.server = server
        self.entry = entry
        self.gate = gate
        self.client_id = 0
        self.stream = None           # the IOStream once open, None again once closing
        self.channels = NO_CHANNELS  # a set once it subscribes (node/clients.py)
        self._context = None         # the context dict, made on first use (see `context`)
        self.last_seen = 0.0
        self.remote_addr = ""
        self.path = self.query = ""  # the handshake's, kept when the entry is custom
        self.headers = None
        self.hook_busy = False       # an async hook of this connection is running (node/hooks.py)
        self.hook_pending = None     # events waiting for it
        self.hook_pending_bytes = 0  # client data in those events
        self._waiters = None         # context key -> futures of wait_context_value
        self._opened = False
        self._closed_by_server = None   # (code, reason) of whichever side closed first, if this side
        self.claims = NO_CLAIMS      # the token's claims (auth.jwt), kept when the entry is custom
        self.expires_at = 0.0        # time.monotonic() when the token expires (close 4001); 0 = never
        self.holds_slot = False      # counted in its server's max_connections (node/client_limits.py)
        self.bucket_tokens = None    # the rate_limit bucket, once the first message took from it
        self.bucket_time = 0.0
        self._token_channels = ()    # the token's `channels`, from the handshake until open() subscribes
        self.lifecycle = lifecycle.WAITING   # with the server's lifecycle_topic (node/lifecycle.py)

    def get_websocket_protocol(self):
        if self.request.headers.get("Sec-WebSocket-Version") != "13":
            return None
        return ClientProtocol(self, False, _params(self.ping_interval, self.ping_timeout, self.max_message_size))

    @property
    def max_message_size(self) -> int:
        return self.server.max_message_size   # per server, even when servers share a port

    def check_origin(self, origin: str) -> bool:
        allowed = self.server.allowed_origins
        return not allowed or origin in allowed

    def get_compression_options(self):
        return None   # frames are encoded once and shared: no per-connection deflate

    def prepare(self):
        """Admits the handshake (limits and token, node/client_limits.py), names it, asks the entry (403)."""
        request = self.request
        self.remote_addr = request.remote_ip
        claims = self.gate.admit(self, request)
        self.client_id = self.node.ids.make()
        if claims is not None:
            self._accept_token(claims)
        if self.entry.custom:
            self.path, self.query, self.headers = request.path, request.query, request.headers
        elif self.server.lifecycle_topic:
            self.path, self.query = request.path, request.query   # for the open message
        verdict = self.entry.handshake(self, request)
        if verdict is not None:
            return self._check_verdict(verdict)

    def _accept_token(self, claims: dict) -> None:
        """The context starts from the token; its `channels` wait for open(); its `exp` closes it."""
        tokens = self.gate.tokens
        self._context = tokens.context(claims)
        if self.entry.custom:
            self.claims = claims
        if claims.get("channels"):
            self._token_channels = claims["channels"]
        expires = tokens.expires(claims)
        if expires is not None:
            self.expires_at = time.monotonic() + (expires - time.time())

    async def _check_verdict(self, verdict) -> None:
        if not await verdict:
            raise tornado.web.HTTPError(403)

    def on_finish(self):
        if self.get_status() != 101:   # refused: its slot is free again
            self.gate.release(self)

    def open(self, *args):
        node = self.node
        self._release_request()
        self.stream = self.ws_connection.stream
        self.stream.max_write_buffer_size = self.server.write_buffer_limit
        slim_stream(self.stream)
        self.last_seen = time.monotonic()
        self._opened = True
        node.client_opened(self)
        if self._token_channels:
            return self._open_subscribed()
        self._run_on_open()

    async def _open_subscribed(self) -> None:
        """Subscribes the token's channels mesh-wide, then runs on_open; Tornado reads no frame before."""
        channels = self._token_channels
        self._token_channels = ()
        await self.node.subscribe(self, channels)
        if self.stream is not None:
            self._run_on_open()

    def _run_on_open(self) -> None:
        """on_open, then the lifecycle open message (once on_open finished)."""
        if self.entry.custom:
            self.entry.submit(self, "on_open")
            if self.server.lifecycle_topic:
                self.entry.submit(self, AFTER, lifecycle.push_open)
        elif self.server.lifecycle_topic:
            lifecycle.push_open(self)

    def on_frame(self) -> bool:
        """Each frame the client sends (pings, pongs and fragments included): it is alive, and under
        `rate_limit` it takes a token; False when the bucket is empty (node/client_protocol.py closes 1008)."""
        now = self.last_seen = time.monotonic()
        limit = self.server.rate_limit
        return limit is None or take_token(self, limit, now)

    def on_message(self, message):
        self.node.counters.in_total += 1
        self.entry.submit(self, "on_message", protocol.client_frame(message))

    def on_close(self):
        self.stream = None
        self.gate.release(self)
        if not self._opened:
            return
        self.node.client_closed(self)
        if self._waiters:
            for futures in self._waiters.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(ConnectionGone(f"client {self.client_id} closed"))
        # The code of whichever side closed first; 1006 when the connection just dropped.
        code, reason = self._closed_by_server or (self.close_code or 1006, self.close_reason or "")
        if self.server.lifecycle_topic:
            lifecycle.push_close(self, code, reason)
        if self.entry.custom:
            # Messages still waiting for a hook die with the connection; on_close still runs, last.
            if self.hook_pending:
                self.hook_pending = type(self.hook_pending)(
                    event for event in self.hook_pending if event[0] != "on_message")
                self.hook_pending_bytes = 0
            self.entry.submit(self, "on_close", code, reason)

    def _release_request(self) -> None:
        """Drops what only the handshake needed: an idle connection should cost little memory.

        Tornado's response buffer and transforms serve only write/flush/finish, which the
        upgrade disabled; open's arguments were used.
        """
        self.request = None
        self.ui = None
        self._headers = None
        self.path_args = self.path_kwargs = None
        self._write_buffer = self._transforms = self.open_args = ()
        self.open_kwargs = NO_KWARGS

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, tornado.web.HTTPError):
            return
        log.error("%s: %s", self.describe(), value, exc_info=(typ, value, tb))

    # --- the connection API (entries and conn.call) ---------------------------

    @property
    def node_id(self) -> int:
        return self.node.node_id

    @property
    def topic(self) -> str:
        """The server's configured topic (where the default behaviour pushes)."""
        return self.server.topic

    def describe(self) -> str:
        return f"client {self.client_id} from {self.remote_addr}"

    @property
    def context(self) -> dict:
        """The connection's context (entries read it; change it with the set_* calls)."""
        context = self._context
        if context is None:
            context = self._context = {}
        return context

    @context.setter
    def context(self, value: dict) -> None:
        self._context = value

    def context_value(self, key: str, default=None):
        return self._context.get(key, default) if self._context else default

    def set_context_value(self, key: str, value) -> None:
        """Sets one key (None removes it) and wakes whoever waits for it."""
        if value is None:
            if self._context:
                self._context.pop(key, None)
            return
        self.context[key] = value
        if self._waiters and key in self._waiters:
            for future in self._waiters.pop(key):
                if not future.done():
                    future.set_result(value)

    def set_context(self, context: dict) -> None:
        """Replaces the whole context and wakes whoever waits for one of its keys."""
        self.context = dict(context)
        if self._waiters:
            for key in [k for k in self._waiters if k in self.context]:
                for future in self._waiters.pop(key):
                    if not future.done():
                        future.set_result(self.context[key])

    async def wait_context_value(self, key: str, timeout: float):
        """Waits until a backend (conn.call set_context_value) or a hook sets `key`; returns its value.

        While a hook awaits this, the connection's next messages wait for it.

        Raises:
            ContextTimeout: not set within `timeout` seconds.
            ConnectionGone: the connection closed meanwhile.
        """
        if key in self.context:
            return self.context[key]
        if self.stream is None:
            raise ConnectionGone(f"client {self.client_id} closed")
        future = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = {}
        self._waiters.setdefault(key, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise ContextTimeout(f"context key {key!r} was not set within {timeout:g} s") from None
        finally:
            waiting = self._waiters.get(key) if self._waiters else None
            if waiting and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._waiters[key]

    def subscribe(self, *channels) -> asyncio.Future:
        """Subscribes now; the returned future completes when every node knows (await it or not)."""
        return self.node.subscribe(self, self._channel_list(channels))

    def unsubscribe(self, *channels) -> None:
        self.node.unsubscribe(self, self._channel_list(channels))

    @staticmethod
    def _channel_list(channels) -> list:
        return [check_name(name, "channel")
                for channel in channels for name in ([channel] if isinstance(channel, str) else channel)]

    def send(self, data, type: str = "text") -> bool:
        """Writes one message to this client; False when it could not be written."""
        payload, binary = encode_data(data, type)
        return write_frame(self, protocol.encode_ws_frame(payload, binary), self.node.counters)

    def close(self, code: int = int(CloseCode.NORMAL), reason: str = "") -> None:
        if self.ws_connection is not None:
            if self._closed_by_server is None:
                self._closed_by_server = (code, reason)
            flush(self)   # what it was sent before the close frame
            super().close(code, reason)

    def expire_if_idle(self, now: float) -> None:
        """The sweep (every 500 ms): read timeout, token expiry, a fragmented message not complete in time."""
        if self.stream is None:
            return   # closing already
        read_timeout = self.server.read_timeout
        if now - self.last_seen > read_timeout:
            self.close(int(CloseCode.GOING_AWAY), "read timeout")
        elif self.expires_at and now >= self.expires_at:
            self.close(int(CloseCode.TOKEN_EXPIRED), "token expired")
        else:
            started = self.ws_connection.fragment_started if self.ws_connection is not None else 0.0
            if started and now - started > read_timeout:
                report_broken(self, CloseCode.GOING_AWAY, "message not complete within read timeout")
                self.stream = None
                self.close(int(CloseCode.GOING_AWAY), "read timeout")

    def shutdown(self, restart: bool = False) -> None:
        """The node drains (node/drain.py): 1001 when it stops, 1012 when it is replaced."""
        self.close(*(DRAIN_CLOSES[restart]))

    def reads_after_close(self) -> bool:
        """What the client sent before it read a drain's close frame is still handled (docs/operations.md)."""
        return self._closed_by_server in DRAIN_CLOSES


__all__ = ["ClientHandler", "ContextTimeout", "ConnectionGone"]
