"""What an entry sees of meshgate: `mesh`, `queue` and the exceptions (docs/entries.md).

An entry is a Python file (a path relative to the configuration file) or a
dotted module path with any of `on_handshake(conn, request)`, `on_open(conn)`,
`on_message(conn, frame)` and `on_close(conn, code, reason)`, each plain or
async; node/hooks.py loads it and calls them. Entries reach the mesh through
`mesh` and `queue` (also set as globals of an entry module, so it needs no
import) and may import the exceptions from here. Owned by the node's IOLoop.
"""

import asyncio
import contextvars
import logging

from cluster import protocol
from cluster.entry_spec import EntryError
from cluster.protocol import ApiError
from node.forward import Deferred
from node.queues import QueueFull

log = logging.getLogger("meshgate.entry")

__all__ = ["mesh", "queue", "Refuse", "ContextTimeout", "ConnectionGone", "QueueFull", "EntryError",
           "HandshakeRequest"]


class Refuse(Exception):
    """Raise in `on_handshake` to refuse a connection (HTTP 403) without logging an error."""


class ContextTimeout(asyncio.TimeoutError):
    """`conn.wait_context_value` gave up: the key was not set in time."""


class ConnectionGone(Exception):
    """The connection closed while a hook was waiting on it."""


# The connection whose hook is running (what `queue.push` attributes a message to).
current_conn = contextvars.ContextVar("meshgate_current_conn", default=None)


def encode_data(data, msg_type: str) -> tuple:
    """Turns what an entry passes into (bytes, binary) for one WebSocket message."""
    if msg_type not in ("text", "binary"):
        raise ValueError(f"type must be 'text' or 'binary', not {msg_type!r}")
    binary = msg_type == "binary"
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), binary
    if isinstance(data, str):
        return data.encode("utf-8"), binary
    if isinstance(data, (dict, list)):
        return protocol.parse_payload({"d": data}).data, binary
    raise TypeError(f"data must be str, bytes, dict or list, not {type(data).__name__}")


class Mesh:
    """`mesh` in entries: reach any connection of the mesh. Bound to the node at start."""

    def __init__(self):
        self._node = None

    def send(self, client_id, data, type: str = "text") -> asyncio.Future:
        """Sends to one client anywhere; the future (await it or not) gives True when it was written."""
        payload, binary = encode_data(data, type)
        node = self._node

        try:   # now, not in a task: what an entry sends keeps its order with what it publishes
            waiting = node.forward.send(int(client_id), protocol.encode_ws_frame(payload, binary))
        except ApiError:
            waiting = False

        async def deliver():
            if waiting is False:
                return False
            if waiting is not None:   # a Deferred: the owner's answer
                await waiting.future()
                try:
                    waiting.finish(waiting)
                except ApiError:
                    return False
            return True
        return _background(deliver())

    def publish(self, channel, data, type: str = "text") -> asyncio.Future:
        """Publishes to a channel (or a list of channels); the future gives `(s, f)`."""
        channels = [channel] if isinstance(channel, str) else list(channel)
        for name in channels:
            check_name(name, "channel")
        payload, binary = encode_data(data, type)
        counts = self._node.forward.publish(channels, protocol.encode_ws_frame(payload, binary))
        if isinstance(counts, tuple):   # no peer to wait for
            done = asyncio.get_running_loop().create_future()
            done.set_result(counts)
            return done
        return _background(_counted(counts) if isinstance(counts, Deferred) else counts)

    async def presence(self, channel: str, context: bool = False, limit: int = protocol.PRESENCE_LIMIT) -> dict:
        """Who is subscribed to `channel` mesh-wide: channel.presence's `r` (docs/protocol.md, Presence):
        `count`, `clients` (at most `limit` of `{"c", "n"}`, with `"x"` the context when `context`), and
        `missing` (nodes that did not answer in time) when there are any.

        Raises:
            ValueError: a bad channel name, `context` not a bool, or `limit` out of 0..100000.
        """
        try:
            params = protocol.parse_presence({"c": channel, "context": context, "limit": limit}, "")
        except ApiError as exc:
            raise ValueError(exc.message) from None
        result = self._node.presence.query(params.channel, params.context, params.limit)
        return result if isinstance(result, dict) else await result

    async def count(self, channel: str) -> dict:
        """How many clients are subscribed to `channel` mesh-wide: `{"s": True, "count": N}` (and `missing`)."""
        check_name(channel, "channel")
        result = self._node.presence.count(channel)
        return result if isinstance(result, dict) else await result


class Queue:
    """`queue` in entries: hand a message to the backends that consume a topic."""

    def __init__(self):
        self._node = None

    def push(self, topic: str, data, client_id=None) -> None:
        """Pushes `data` (any JSON value) to `topic`, as sent by the connection whose hook is running.

        Raises:
            QueueFull: no consumer can take it now and the topic's buffer is full.
            ValueError: bad topic name, or no connection to attribute it to (pass client_id).
        """
        check_name(topic, "topic")
        if client_id is None:
            conn = current_conn.get()
            if conn is None:
                raise ValueError("queue.push outside a hook needs client_id")
            client_id = conn.client_id
        self._node.queues.push(topic, int(client_id), data)


mesh = Mesh()
queue = Queue()


def bind(node) -> None:
    """Points `mesh` and `queue` at this process's node."""
    mesh._node = node
    queue._node = node


def check_name(name, kind: str) -> str:
    """A channel or topic name from an entry; ValueError (the protocol's message) when it breaks the rules."""
    try:
        return protocol.parse_name(name, kind, kind)
    except ApiError as exc:
        raise ValueError(exc.message) from None


async def _counted(deferred) -> tuple:
    await deferred.future()
    return deferred.finish(deferred)


def _background(awaitable) -> asyncio.Future:
    """Starts work an entry may or may not await; an error nobody awaits is logged, not lost."""
    future = asyncio.ensure_future(awaitable)
    future.add_done_callback(_log_unawaited)
    return future


def _log_unawaited(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("background mesh call failed: %s", future.exception())


class HandshakeRequest:
    """What `on_handshake` sees of the upgrade request."""

    __slots__ = ("path", "query", "args", "headers", "remote_addr")

    def __init__(self, request):
        self.path = request.path
        self.query = request.query
        self.args = {key: values[-1].decode("utf-8", "replace") for key, values in request.query_arguments.items()}
        self.headers = request.headers
        self.remote_addr = request.remote_ip
