"""What a client server lets in and how fast: handshake admission, the rate limit, and their log.

docs/protocol.md, Client WebSocket server, Limits. `ServerGate` is one
configured server as this node process admits connections to it: at most
`max_connections` open (HTTP 503 past it), request headers within the
server's `max_header_size` (HTTP 431; the port-wide bound is Tornado's), and
a valid token when it has `auth.jwt` (HTTP 401, node/client_auth.py), all
before the entry's `on_handshake`. `take_token` is the per-connection token
bucket of `rate_limit`. What is refused or closed is logged and counted
(`handshakes_refused`, `limit_closed`). Owned by the node's IOLoop.
"""

import logging

import tornado.web
from tornado.log import access_log

from cluster.logs import Throttled
from node.client_auth import TokenChecker, TokenRefused

log = logging.getLogger("meshgate.node")


def report_broken(conn, code: int, what: str) -> None:
    """Logs and counts a connection closed for breaking a limit or the protocol."""
    conn.node.counters.limit_closed += 1
    log.info("closing %s: %s (%d)", conn.describe(), what, code)


def header_bytes(request) -> int:
    """Bytes of a request line and its headers as they came (`Name: value` lines and the blank line)."""
    size = len(request.method) + len(request.uri) + len(request.version) + 4
    return size + sum(len(name) + len(value) + 4 for name, value in request.headers.get_all()) + 2


class ServerGate:
    """Admission to one client server on this node process.

    Args:
        node: the process's Node (counters).
        server: its ServerConfig.
        config: the cluster Config (files are relative to it).
        port_header_size: the largest `max_header_size` of the servers on its port (what Tornado enforces).

    Raises:
        TokenKeyError: its `auth.jwt` key cannot be read or does not fit its algorithms.
    """

    def __init__(self, node, server, config, port_header_size: int):
        self.node = node
        self.server = server
        self.max_connections = server.max_connections
        self.open = 0   # connections holding a slot, from an admitted handshake to their close
        self.header_limit = server.max_header_size if server.max_header_size < port_header_size else 0
        jwt = server.auth.jwt if server.auth else None
        self.tokens = TokenChecker(jwt, config.resolve) if jwt else None
        self._log = Throttled(log, burst=20)   # anyone can make refusals happen at any rate

    def admit(self, conn, request):
        """Checks a handshake before the entry sees it; returns the token's claims (None without auth.jwt).

        Raises:
            tornado.web.HTTPError: 431, 503 or 401, logged and counted.
        """
        if self.header_limit and header_bytes(request) > self.header_limit:
            self._refuse(conn, 431, f"request headers over {self.header_limit} bytes")
        if self.max_connections and self.open >= self.max_connections:
            self._refuse(conn, 503, f"{self.open} connections open (max_connections)")
        claims = None
        if self.tokens is not None:
            try:
                claims = self.tokens.check(request)
            except TokenRefused as refused:
                self.node.counters.client_auth_refused += 1
                self._refuse(conn, 401, str(refused))
        if self.max_connections:
            self.open += 1
            conn.holds_slot = True
        return claims

    def release(self, conn) -> None:
        """Gives back the slot of a connection that closed or was refused (idempotent)."""
        if conn.holds_slot:
            conn.holds_slot = False
            self.open -= 1

    def _refuse(self, conn, status: int, why: str) -> None:
        self.node.counters.handshakes_refused += 1
        self._log.info("refused a client from %s on %s: %s (%d)", conn.remote_addr, self.server.path, why, status)
        raise tornado.web.HTTPError(status)


def take_token(conn, limit, now: float) -> bool:
    """Takes one message's token from the connection's bucket (`rate_limit`); False when it is empty.

    The bucket holds at most `burst` tokens and gains `rate` a second; it
    starts full. Only a connection of a rate-limited server gets the two
    attributes.
    """
    tokens = conn.bucket_tokens
    if tokens is None:
        tokens = limit.burst
    else:
        tokens = min(limit.burst, tokens + (now - conn.bucket_time) * limit.rate)
    conn.bucket_time = now
    if tokens < 1:
        conn.bucket_tokens = tokens
        return False
    conn.bucket_tokens = tokens - 1
    return True


def log_request(handler) -> None:
    """tornado.access for the client ports, naming the path without the query (it may carry a token)."""
    status = handler.get_status()
    method = access_log.info if status < 400 else access_log.warning
    request = handler.request
    method("%d %s %s (%s) %.2fms", status, request.method, request.path, request.remote_ip,
           1000.0 * request.request_time())
