"""The client servers' WebSocket protocol: Tornado's, reading client frames strictly.

docs/protocol.md, Client WebSocket server, Limits. Tornado drops a connection
that breaks RFC 6455 without saying why, does not insist that client frames
are masked, and lets a fragmented message wait forever. `ClientProtocol`
replaces its frame reader (`_receive_frame`) with one that checks every
frame and closes with the code the RFC names:

- 1002: reserved bits set (no extension is ever negotiated), an unknown
  opcode, a fragmented or longer than 125 bytes control frame, an unmasked
  frame, a continuation with no message to continue, a new message before
  the previous one ended, a close frame of one byte or with a code no
  endpoint may send;
- 1007: a text message, or a close reason, that is not UTF-8;
- 1009: a message over `max_message_size`, counted as its fragments arrive.

It also remembers when a fragmented message began (`fragment_started`), so
the handler can close one that is not complete within `read_timeout`.

Between frames a connection waits on the stream's read Future alone, with a
callback (`_wait_frame`): Tornado's loop would keep a Task and a stack of
suspended coroutines per connection (the handshake's own among them, with
the request's headers), most of the memory an idle connection costs. A frame
that arrives is read by a short-lived coroutine (`_frames`), which reads on
while the client's bytes are already there.
Everything else (close handshake, pings and pongs, callbacks) is Tornado's.
Owned by the node's IOLoop.
"""

import asyncio
import collections
import struct
import sys
import time

import tornado.websocket
from tornado.iostream import StreamClosedError
from tornado.log import gen_log
from tornado.util import _websocket_mask

from cluster.protocol import CloseCode, valid_close_code
from node.client_limits import report_broken

_FIN, _RSV, _OPCODE, _MASKED = 0x80, 0x70, 0x0F, 0x80
_CONTINUATION, _TEXT, _BINARY, _CLOSE = 0x0, 0x1, 0x2, 0x8
_KNOWN = frozenset((0x0, 0x1, 0x2, 0x8, 0x9, 0xA))
_CONTROL_MAX = 125


def frame_problem(first: int, second: int, in_message: bool):
    """What is wrong with a client frame's two header bytes, or None (RFC 6455, section 5.2).

    Args:
        first, second: the frame's first two bytes.
        in_message: a fragmented message has begun and not ended.
    """
    opcode = first & _OPCODE
    if first & _RSV:
        return "reserved bits set"
    if opcode not in _KNOWN:
        return f"unknown opcode {opcode:#x}"
    if not second & _MASKED:
        return "unmasked client frame"
    if opcode & 0x8:
        if not first & _FIN:
            return "fragmented control frame"
        if second & 0x7F > _CONTROL_MAX:
            return "control frame over 125 bytes"
    elif opcode == _CONTINUATION and not in_message:
        return "continuation frame without a message"
    elif opcode != _CONTINUATION and in_message:
        return "new message before the fragmented one ended"
    return None


def close_frame_problem(payload: bytes):
    """`(code, what)` when a client's close frame breaks the RFC (section 5.5.1, 7.4), else None."""
    if len(payload) == 1:
        return CloseCode.PROTOCOL_ERROR, "close frame of one byte"
    if payload and not valid_close_code(struct.unpack("!H", payload[:2])[0]):
        return CloseCode.PROTOCOL_ERROR, f"close code {struct.unpack('!H', payload[:2])[0]} not allowed"
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return CloseCode.INVALID_DATA, "close reason not UTF-8"
    return None


# The frame readers running now: the loop holds Tasks only weakly.
_reading = set()


class OnDemandDeque:
    """The deque operations IOStream uses, with a deque only while something is queued.

    An empty `collections.deque` holds a 64-slot block: 760 bytes, twice per
    IOStream (its write futures and its write buffer's chunks), and an open
    connection's are empty nearly all the time (node/clients.py writes to the
    socket itself when nothing is queued). This costs 48 bytes when empty; the
    deque it makes for a backlog is dropped once the backlog drained.
    """

    __slots__ = ("_items",)

    def __init__(self, items: collections.deque = None):
        self._items = items or None

    def append(self, item) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)

    def popleft(self):
        if self._items is None:
            raise IndexError("pop from an empty deque")
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    def clear(self) -> None:
        self._items = None

    def __getitem__(self, index):
        if self._items is None:
            raise IndexError("deque index out of range")
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else 0

    def __iter__(self):
        return iter(self._items) if self._items is not None else iter(())


def slim_stream(stream) -> None:
    """Gives an upgraded connection's IOStream on-demand deques in place of its two (what they hold stays)."""
    if type(stream._write_futures) is collections.deque:
        stream._write_futures = OnDemandDeque(stream._write_futures)
    buffer = stream._write_buffer
    if type(buffer._buffers) is collections.deque:
        buffer._buffers = OnDemandDeque(buffer._buffers)


class ClientProtocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol with a strict frame reader, telling the handler the code of its own closes."""

    fragment_started = 0.0    # time.monotonic() of a fragmented message's first frame; 0 when none is open

    def close(self, code=None, reason=None):
        handler = self.handler
        # client_terminated: this is the answer to the client's close frame, not our own close.
        if (handler is not None and handler._closed_by_server is None and code is not None
                and not self.client_terminated):
            handler._closed_by_server = (code, reason or "")
        super().close(code, reason)

    def fail(self, code: int, what: str) -> None:
        """Closes with `code` at once and reads nothing more; the handler logs and counts it."""
        report_broken(self.handler, code, what)
        self.close(int(code), what)
        self._abort()

    async def _receive_frame_loop(self) -> None:
        """Tornado's loop reads until the connection ends; this one returns once the first read waits.

        The handshake's coroutines (RequestHandler._execute, get, accept_connection) end with it.
        """
        self._wait_frame()

    def _wait_frame(self) -> None:
        """Waits for the next frame's two header bytes without a coroutine (`_frame_arrived` gets them)."""
        if self.client_terminated:
            return self._ended(None)
        try:
            future = self.stream.read_bytes(2)
        except Exception as exc:
            return self._ended(exc)
        future.add_done_callback(self._frame_arrived)

    def _frame_arrived(self, future) -> None:
        try:
            header = future.result()
        except (Exception, asyncio.CancelledError) as exc:   # StreamClosedError, mostly
            return self._ended(exc)
        self._wire_bytes_in += 2
        task = asyncio.ensure_future(self._frames(header))
        _reading.add(task)
        task.add_done_callback(_reading.discard)

    async def _frames(self, header: bytes) -> None:
        """Reads frames, the first one's header read, until none is buffered; then `_wait_frame` again.

        As Tornado's loop does, it gives the loop a turn every _YIELD_THRESHOLD bytes.
        """
        try:
            work = 0
            while True:
                start = self._wire_bytes_in - 2
                await self._receive_frame(header)
                if self.client_terminated:
                    break
                work += tornado.websocket._FRAME_YIELD_COST + self._wire_bytes_in - start
                if work >= tornado.websocket._YIELD_THRESHOLD:
                    work = 0
                    await asyncio.sleep(0)
                    if self.client_terminated:
                        break
                future = self.stream.read_bytes(2)
                if not future.done():   # nothing buffered: wait without this coroutine
                    future.add_done_callback(self._frame_arrived)
                    return
                header = future.result()
                self._wire_bytes_in += 2
        except (Exception, asyncio.CancelledError) as exc:
            return self._ended(exc)
        self._ended(None)

    def _ended(self, error) -> None:
        """No more frames: what Tornado's loop and the handshake's coroutine did when reading stopped.

        A closed stream or a cancelled read is the connection's end; a ValueError is logged as a
        malformed request and anything else as the handler's exception; then the connection is
        torn down and the handler told, once.
        """
        if error is not None:
            if isinstance(error, ValueError):
                gen_log.debug("Malformed WebSocket request received", exc_info=error)
            elif not isinstance(error, (StreamClosedError, asyncio.CancelledError)):
                self.handler.log_exception(type(error), error, error.__traceback__)
            self._abort()
        try:
            self.handler.on_ws_connection_close(self.close_code, self.close_reason)
        except Exception:
            self.handler.log_exception(*sys.exc_info())

    async def _receive_frame(self, header: bytes) -> None:
        """One frame, its two header bytes read."""
        first, second = header
        buffer = self._fragmented_message_buffer
        problem = frame_problem(first, second, buffer is not None)
        if problem is not None:
            return self.fail(CloseCode.PROTOCOL_ERROR, problem)
        if self.server_terminated and first & _OPCODE != _CLOSE:
            return await self._discard(second)   # closing: read on (no reset) until the client's close frame
        if not self.handler.on_frame():   # every frame counts: pings and fragments cost as messages do
            report_broken(self.handler, CloseCode.POLICY_VIOLATION, "rate limit")
            self.close(int(CloseCode.POLICY_VIOLATION), "rate limit")
            return await self._discard(second)
        opcode, final, length = first & _OPCODE, first & _FIN, second & 0x7F
        if length == 126:
            length = struct.unpack("!H", await self._read_bytes(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await self._read_bytes(8))[0]
        if opcode < _CLOSE and length + (len(buffer) if buffer is not None else 0) > self.params.max_message_size:
            return self.fail(CloseCode.MESSAGE_TOO_BIG, "message too big")
        mask = await self._read_bytes(4)
        data = _websocket_mask(mask, await self._read_bytes(length)) if length else b""
        if opcode == _CONTINUATION:
            buffer.extend(data)
            if not final:
                return
            opcode, data = self._fragmented_message_opcode, bytes(buffer)
            self._fragmented_message_buffer = None
            self.fragment_started = 0.0
        elif not final:   # the first frame of a fragmented message
            self._fragmented_message_opcode = opcode
            self._fragmented_message_buffer = bytearray(data)
            self.fragment_started = time.monotonic()
            return
        handled = self._handle_message(opcode, data)
        if handled is not None:
            await handled

    async def _discard(self, second: int) -> None:
        """Reads the rest of a frame whose header was read, and drops it (up to max_message_size)."""
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", await self._read_bytes(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await self._read_bytes(8))[0]
        if length > self.params.max_message_size:
            return self._abort()
        await self._read_bytes(4 + length)

    def _handle_message(self, opcode: int, data: bytes):
        if self.client_terminated:
            return None
        if opcode == _TEXT:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                return self.fail(CloseCode.INVALID_DATA, "text message not UTF-8")
            return self._run_callback(self.handler.on_message, text)
        if opcode == _CLOSE:
            problem = close_frame_problem(data)
            if problem is not None:
                return self.fail(*problem)
        return super()._handle_message(opcode, data)
