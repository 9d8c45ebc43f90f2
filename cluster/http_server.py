"""The HTTP servers of meshgate's processes, with a bounded number of connections per process.

Whoever reaches a port can open connections, and each costs a file
descriptor. `raise_file_limit` lifts the process's soft RLIMIT_NOFILE to its
hard limit at start and sets the budget: the limit less a reserve for the
process's own sockets and files. A `BoundedHTTPServer` closes a new
connection at once (before TLS or HTTP) while the process holds the budget,
so accept() never fails with EMFILE (which would spin the event loop) and an
attacker holding connections cannot take the descriptors the process needs.
WebSocket connections, which leave the HTTP server when they upgrade, are
counted through `BUDGET.extra`. When a node drains, `end_keep_alive` ends
every kept-alive connection once it has answered the request it is on. Owned
by the process's IOLoop.
"""

import resource

from tornado.httpserver import HTTPServer

_RESERVE_MIN = 128


class Budget:
    """Connections this process may hold, all listeners together."""

    def __init__(self):
        self.limit = None          # set by raise_file_limit; None = not bounded
        self.refused = 0           # connections closed at once for want of budget
        self.extra = lambda: 0     # connections the servers no longer see (upgraded WebSockets)
        self._servers = []

    def held(self) -> int:
        return sum(server.held() for server in self._servers) + self.extra()


BUDGET = Budget()


def raise_file_limit() -> int:
    """Lifts the soft limit on open files to the hard one (where allowed); sets and returns the budget."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    BUDGET.limit = max(16, target - max(_RESERVE_MIN, target // 20))
    return BUDGET.limit


class BoundedHTTPServer(HTTPServer):
    """An HTTPServer that takes no connection beyond the process's budget (see the module docstring)."""

    def initialize(self, *args, **kwargs):
        super().initialize(*args, **kwargs)
        BUDGET._servers.append(self)
        self._requests = {}    # server connection -> (its request's HTTP1Connection, whether it answered one before)
        self._ending = False   # end_keep_alive was called

    def start_request(self, server_conn, request_conn):
        answered = server_conn in self._requests
        if answered and self._ending:   # it answered a request already: no more on it
            server_conn.stream.close()
        self._requests[server_conn] = (request_conn, answered)
        return super().start_request(server_conn, request_conn)

    def on_close(self, server_conn) -> None:
        self._requests.pop(server_conn, None)
        super().on_close(server_conn)

    def end_keep_alive(self) -> None:
        """After stop(): a connection answering a request says `Connection: close` and closes after it; one
        idle between two requests closes now; a new one (its first request not read yet) after its answer."""
        self._ending = True
        for server_conn, (request, answered) in list(self._requests.items()):
            if request._request_start_line is not None:   # reading or answering a request (Tornado's own state)
                if request._request_headers.get("Upgrade", "").lower() != "websocket":   # an upgrade leaves anyway
                    request._disconnect_on_finish = True
            elif answered:
                server_conn.stream.close()

    def busy(self) -> int:
        """Connections reading or answering a request (a new one whose request has not come is not counted)."""
        return sum(1 for request, _ in self._requests.values() if request._request_start_line is not None)

    def held(self) -> int:
        """Connections this server holds."""
        return len(self._connections)

    def over_budget(self, connection) -> bool:
        """Closes a new connection at once, and says so, when the process holds its budget."""
        if BUDGET.limit is not None and BUDGET.held() >= BUDGET.limit:
            BUDGET.refused += 1
            connection.close()
            return True
        return False

    def _handle_connection(self, connection, address) -> None:
        if not self.over_budget(connection):
            super()._handle_connection(connection, address)

    def stop(self) -> None:
        super().stop()
        if self in BUDGET._servers:
            BUDGET._servers.remove(self)
