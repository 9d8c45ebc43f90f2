"""THE executor: every backend API call, whatever carried it, runs here (docs/protocol.md).

`Api.execute` looks the method up in one table keyed by the protocol's method
list (`METHODS`), parses its parameters (cluster/protocol.py), checks the
caller's roles (here and nowhere else), runs it, and turns every outcome into
one envelope: an `ApiError` keeps its code; anything else is logged with its
traceback and answered 501, and the caller's connection stays open. The
transports (node/api_http.py, node/api_ws.py) only decode a request, call
`execute` and write the envelope they are handed.

The conn.call functions for local clients live here too (`CONN_FUNCTIONS`);
node/forward.py decides whether a call runs here or on the client's owner.
"""

import asyncio
import inspect
import logging
import time
from functools import partial
from typing import Any, Callable, NamedTuple, Union

from cluster import protocol
from cluster.access import ALL_ROLES, READ, WRITE
from cluster.protocol import ApiError, ErrorCode
from node.acks import SettingsDiffer
from node.forward import Deferred
from node.metrics import FORWARDED, LOCAL, Requests
from node.queues import AlreadyConsuming, TooManyTopics

log = logging.getLogger("meshgate.access")
access_log = logging.getLogger("meshgate.access.requests")


# What a method's run returns when it answered at once: no awaitable check for these (inspect.isawaitable
# of a plain value walks the Awaitable ABC, about a microsecond on every request).
_PLAIN = (bool, int, str, dict, list, tuple)


class Caller(NamedTuple):
    """Who makes a call, and through what.

    `prefix` is how fields are named in error messages ("p." over `/ws/v1`, ""
    for an HTTP body), `ws` whether envelopes carry `i`, `consumer` the
    `/ws/v1` connection that receives queue events (None over HTTP), `roles`
    what the caller may do (docs/protocol.md, Access control: roles), `user`
    and `peer` who and where it is (for the access log).
    """
    prefix: str
    ws: bool
    consumer: Any = None
    roles: frozenset = ALL_ROLES
    user: str = ""
    peer: str = ""


HTTP_CALLER = Caller("", False)


class Method(NamedTuple):
    parse: Callable                 # (params, prefix) -> parsed parameters; raises ApiError(101)
    role: Union[str, Callable]      # READ, WRITE, or parsed -> one of them
    run: Callable                   # (api, parsed, caller) -> result `r`, or an awaitable of it


class ConnFunction(NamedTuple):
    role: str
    run: Callable                   # (node, conn, args) -> None, a result, or an awaitable


class Api:
    """The executor of one node process.

    Args:
        node: the process's Node (its `forward`, `queues`, `hub`, `subscribe`
            and `unsubscribe` are used at call time).
    """

    def __init__(self, node):
        self.node = node
        self.requests = Requests(protocol.METHODS)
        self.access_log = node.config.node.api.access_log
        self._tasks = set()   # the calls that run as tasks (awaitables that are not a Deferred)

    def execute(self, method: str, params, caller: Caller, req_id, reply) -> None:
        """Runs one call; `reply(code, envelope)` gets its outcome exactly once.

        `code` is None on success, else the ErrorCode; `envelope` is the
        encoded body. The reply comes now, or when the call completes (the
        transport counts what it has running by the replies still to come).
        Each answer is counted and timed (node/metrics.py `Requests`).
        """
        started = time.monotonic()
        try:
            spec = METHODS.get(method)
            if spec is None:
                raise ApiError(ErrorCode.INVALID_PARAMS, f"m: unknown method {method!r}")
            parsed = spec.parse(params, caller.prefix)
            role = spec.role(parsed) if callable(spec.role) else spec.role
            if role not in caller.roles:
                raise ApiError(ErrorCode.NOT_AUTHORIZED, f"{method}: this user lacks the {role} role")
            result = spec.run(self, parsed, caller)
            if type(result) is Deferred:   # waits for a peer: settled when its reply is read, no Future, no task
                result.when_done(partial(self._settle, method, caller, req_id, reply, started))
                return
            if result is not None and type(result) not in _PLAIN and inspect.isawaitable(result):
                route = LOCAL if method == "conn.call" else FORWARDED   # a local conn.call; else waits for peers
                task = asyncio.ensure_future(self._finish(method, result, caller, req_id, reply, started, route))
                self._tasks.add(task)   # the loop keeps only a weak reference to a task
                task.add_done_callback(self._tasks.discard)
                return
            envelope = protocol.ok_body(result, req_id, caller.ws)
        except Exception as exc:
            self._answer(method, caller, started, LOCAL, reply, *self._failed(method, exc, caller, req_id))
            return
        self._answer(method, caller, started, LOCAL, reply, None, envelope)

    async def _finish(self, method: str, awaitable, caller: Caller, req_id, reply, started, route) -> None:
        try:
            envelope = protocol.ok_body(await awaitable, req_id, caller.ws)
        except asyncio.CancelledError:   # the loop is going away: the call is still answered once
            cancelled = ApiError(ErrorCode.MESH_UNAVAILABLE, f"{method}: cancelled")
            self._answer(method, caller, started, route, reply, *self._failed(method, cancelled, caller, req_id))
            raise
        except Exception as exc:
            self._answer(method, caller, started, route, reply, *self._failed(method, exc, caller, req_id))
            return
        self._answer(method, caller, started, route, reply, None, envelope)

    def _settle(self, method: str, caller: Caller, req_id, reply, started, deferred: Deferred) -> None:
        try:
            envelope = protocol.ok_body(deferred.finish(deferred), req_id, caller.ws)
        except Exception as exc:
            self._answer(method, caller, started, FORWARDED, reply, *self._failed(method, exc, caller, req_id))
            return
        self._answer(method, caller, started, FORWARDED, reply, None, envelope)

    def _answer(self, method: str, caller: Caller, started: float, route: str, reply, code, envelope) -> None:
        seconds = self.requests.done(method, caller.ws, code, route, started)
        if self.access_log:
            _log_access(method, caller, code, seconds)
        reply(code, envelope)

    def refused(self, method: str, caller: Caller, code) -> None:
        """Counts (and logs, with the access log on) a request its transport answered with an error
        before it reached `execute`: a body that is not JSON, too large, no credentials."""
        self.requests.refused(method, caller.ws, code)
        if self.access_log:
            _log_access(method or "-", caller, code, None)

    def unreadable(self, method, caller: Caller, exc: Exception, req_id=None) -> tuple:
        """`(code, envelope)` for a request its transport could not read (`exc` from a parser of
        cluster/protocol.py), counted as refused: an ApiError keeps its code; anything else is a bug,
        logged and answered 501, and the connection goes on."""
        code, envelope = self._failed(method or "request", exc, caller, req_id)
        self.refused(method, caller, code)
        return code, envelope

    @staticmethod
    def _failed(method: str, exc: Exception, caller: Caller, req_id) -> tuple:
        if isinstance(exc, ApiError):
            code, message = exc.code, exc.message
        else:
            log.error("%s failed", method, exc_info=exc)
            code, message = ErrorCode.MESH_UNAVAILABLE, "internal error"
        return code, protocol.error_body(code, message, req_id, caller.ws).encode("utf-8")

    # --- methods (docs/protocol.md, each under its name) ------------------------------

    def mesh_send(self, params: protocol.SendParams, caller: Caller):
        payload = params.payload
        waiting = self.node.forward.send(params.client_id, protocol.encode_ws_frame(payload.data, payload.binary))
        return _SENT if waiting is None else waiting   # a Deferred of the same result

    def mesh_publish(self, params: protocol.PublishParams, caller: Caller):
        payload = params.payload
        counts = self.node.forward.publish(params.channels, protocol.encode_ws_frame(payload.data, payload.binary))
        if type(counts) is tuple:
            return _counts(counts)
        if type(counts) is Deferred:
            return counts.then(_counts)
        return _counted(counts)

    def conn_call(self, params: protocol.CallParams, caller: Caller):
        return self.node.forward.call(params.client_id, params.function, params.args)

    def channel_presence(self, params: protocol.PresenceParams, caller: Caller):
        return self.node.presence.query(params.channel, params.context, params.limit)

    def channel_count(self, channel: str, caller: Caller):
        return self.node.presence.count(channel)

    def queue_pop(self, params: protocol.PopParams, caller: Caller) -> dict:
        consumer = _consumer(caller, "queue.pop")
        try:
            self.node.queues.consume(consumer.consumer_id, consumer, params.topics, params.ack)
        except SettingsDiffer as exc:
            raise ApiError(ErrorCode.INVALID_PARAMS, f"{caller.prefix}{exc.field}: {exc.message}") from None
        except AlreadyConsuming:
            raise ApiError(ErrorCode.REPEATED_CONSUMPTION,
                           f"{caller.prefix}t: this connection already consumes one of these topics") from None
        except TooManyTopics:
            raise ApiError(ErrorCode.CONSUME_FAILED, f"{caller.prefix}t: a connection may consume at most "
                           f"{self.node.queues.consumers.max_topics_per_consumer} topics") from None
        return _SENT

    def queue_unpop(self, topics, caller: Caller) -> dict:
        consumer = _consumer(caller, "queue.unpop")
        self.node.queues.stop_consuming(consumer.consumer_id, topics)
        return _SENT

    def queue_ack(self, delivery_ids: list, caller: Caller) -> dict:
        consumer = _consumer(caller, "queue.ack")
        return {"s": True, "n": self.node.queues.ack(consumer.consumer_id, delivery_ids)}

    # --- conn.call on a local client ------------------------------------------------

    async def call_local(self, client_id: int, function: str, args: list) -> dict:
        """Runs a conn.call function on a client of this node; returns the result `r`.

        Raises:
            ApiError(301): the client is not connected here, or the function failed.
        """
        conn = self.node.hub.conns.get(client_id)
        if conn is None:
            raise ApiError(ErrorCode.CALL_FAILED, f"client {client_id} is not connected")
        result = CONN_FUNCTIONS[function].run(self.node, conn, args)
        if inspect.isawaitable(result):
            result = await result
        return result if isinstance(result, dict) else _SENT


def _log_access(method: str, caller: Caller, code, seconds) -> None:
    """One line of the access log (node.api.access_log): what, who, from where, the result, how long."""
    took = "" if seconds is None else f" {seconds * 1000:.2f} ms"
    access_log.info("%s %s user=%s from=%s result=%s%s", "ws" if caller.ws else "http", method,
                    caller.user or "-", caller.peer or "-", "ok" if code is None else int(code), took)


# What mesh.send and mesh.publish answer: the local path answers at once, without a task.
_SENT = protocol.SENT


def _counts(counts: tuple) -> dict:
    return {"s": counts[0], "f": counts[1]}


async def _counted(awaitable) -> dict:
    return _counts(await awaitable)


def _consumer(caller: Caller, method: str):
    if caller.consumer is None:
        raise ApiError(ErrorCode.INVALID_PARAMS, f"{method}: only on a /ws/v1 connection")
    return caller.consumer


def _get_context(node, conn, args) -> dict:
    if not protocol.json_carries(conn.context):
        raise ApiError(ErrorCode.CALL_FAILED, f"client {conn.client_id}: its context holds a value that is not JSON")
    return {"s": True, "d": conn.context}


# docs/protocol.md, conn.call: one row per function of its table.
CONN_FUNCTIONS = {
    "set_context_value": ConnFunction(WRITE, lambda node, conn, args: conn.set_context_value(args[0], args[1])),
    "set_context": ConnFunction(WRITE, lambda node, conn, args: conn.set_context(args[0])),
    "subscribe": ConnFunction(WRITE, lambda node, conn, args: node.subscribe(conn, args)),
    "unsubscribe": ConnFunction(WRITE, lambda node, conn, args: node.unsubscribe(conn, args)),
    "close": ConnFunction(WRITE, lambda node, conn, args: conn.close(*args)),
    "get_context": ConnFunction(READ, _get_context),
}

# docs/protocol.md, one row per method; roles from its Access control section.
METHODS = {
    "queue.pop": Method(protocol.parse_queue_pop, READ, Api.queue_pop),
    "queue.unpop": Method(protocol.parse_queue_unpop, READ, Api.queue_unpop),
    "conn.call": Method(protocol.parse_conn_call, lambda call: CONN_FUNCTIONS[call.function].role, Api.conn_call),
    "mesh.send": Method(protocol.parse_send, WRITE, Api.mesh_send),
    "mesh.publish": Method(protocol.parse_publish, WRITE, Api.mesh_publish),
    "channel.presence": Method(protocol.parse_presence, READ, Api.channel_presence),
    "channel.count": Method(protocol.parse_count, READ, Api.channel_count),
    "queue.ack": Method(protocol.parse_queue_ack, READ, Api.queue_ack),
}
assert tuple(METHODS) == protocol.METHODS and tuple(CONN_FUNCTIONS) == protocol.CALL_FUNCTIONS
