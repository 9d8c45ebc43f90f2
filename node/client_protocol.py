"""The client servers' WebSocket protocol: Tornado's, reading client frames strictly.

docs/protocol.md, Client WebSocket server, Limits. Tornado drops a connection
that breaks RFC 6455 without saying why, does not insist that client frames
are masked, and lets a fragmented message wait forever. `ClientProtocol`
replaces its frame reader with one that reads whatever the socket has, checks
every frame and closes with the code the RFC names:

- 1002: reserved bits set (no extension is ever negotiated), an unknown
  opcode, a fragmented or longer than 125 bytes control frame, an unmasked
  frame, a continuation with no message to continue, a new message before
  the previous one ended, a close frame of one byte or with a code no
  endpoint may send;
- 1007: a text message, or a close reason, that is not UTF-8;
- 1009: a message over `max_message_size`, counted as its fragments arrive.

It also remembers when a fragmented message began (`fragment_started`), so
the handler can close one that is not complete within `read_timeout`.

Between reads a connection waits on the stream's read Future alone, with a
callback (`_read_more`): Tornado's loop would keep a Task and a stack of
suspended coroutines per connection (the handshake's own among them, with
the request's headers), most of the memory an idle connection costs. What a
read brings (up to _CHUNK bytes) is parsed in one pass, every whole frame
in it handled in order (`_parse`): one read for many pipelined frames where
Tornado's reader awaits each frame's header, length, mask and payload in
turn. A frame's header is checked once, as soon as it is whole, before its
payload is waited for. One connection's frames hold the loop at most about
_TURN_S; one request may fan out to thousands of connections, so a byte
count would not be a fair measure.
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

from cluster import speedups
from cluster.protocol import CloseCode, valid_close_code
from node.client_limits import report_broken

_FIN, _RSV, _OPCODE, _MASKED = 0x80, 0x70, 0x0F, 0x80
_CONTINUATION, _TEXT, _BINARY, _CLOSE = 0x0, 0x1, 0x2, 0x8
_WHOLE_TEXT, _WHOLE_BINARY = _FIN | _TEXT, _FIN | _BINARY
_KNOWN = frozenset((0x0, 0x1, 0x2, 0x8, 0x9, 0xA))
_CONTROL_MAX = 125
_SHORT, _LONG = struct.Struct("!H"), struct.Struct("!Q")
_CHUNK = 65536               # bytes read from the socket at a time
_TURN_S = 0.002              # one connection's frames hold the loop at most about this long


def text_frame(data: bytearray, pos: int, max_size: int):
    """The frame at `data[pos:]` if it is a whole masked text frame (FIN, no reserved bits) of fewer
    than 65,536 bytes and at most `max_size`: `(the offset after it, its text)`, the text None when
    it is not UTF-8. None for anything else: not whole yet, another kind of frame, too large.
    (cluster/_speedups.c has the same function in C.)"""
    size = len(data) - pos
    if size < 6 or data[pos] != _WHOLE_TEXT:
        return None
    second = data[pos + 1]
    if _MASKED <= second < _MASKED | 126:
        length, start = second & 0x7F, pos + 2
    elif second == _MASKED | 126 and size >= 8:
        length, start = _SHORT.unpack_from(data, pos + 2)[0], pos + 4
    else:
        return None
    end = start + 4 + length
    if end - pos > size or length > max_size:
        return None
    payload = _websocket_mask(bytes(data[start:start + 4]), bytes(data[start + 4:end])) if length else b""
    try:
        return end, payload.decode("utf-8")
    except UnicodeDecodeError:
        return end, None


_text_frame = text_frame
if speedups.native is not None:
    speedups.native.set_python("text_frame", text_frame)
    _text_frame = speedups.native.text_frame


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


def _given(value):
    return value


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
    _header = None            # the checked header of a frame whose payload has not all arrived
    _unread = None            # bytes read and not handled yet (part of a frame); None when there are none

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
        self._read_more()

    def _read_more(self) -> None:
        """Waits for the client's next bytes without a coroutine (`_arrived` gets them).

        A read already done (bytes were buffered) still reaches `_arrived` through the loop, so
        other work runs between two reads of a fast sender.
        """
        if self.client_terminated:
            return self._ended(None)
        try:
            future = self.stream.read_bytes(_CHUNK, partial=True)
        except Exception as exc:
            return self._ended(exc)
        future.add_done_callback(self._arrived)

    def _arrived(self, future) -> None:
        try:
            chunk = future.result()
        except (Exception, asyncio.CancelledError) as exc:   # StreamClosedError, mostly
            return self._ended(exc)
        self._wire_bytes_in += len(chunk)
        if self._unread is None:
            self._unread = bytearray(chunk)
        else:
            self._unread += chunk
        self._parse()

    def _parse(self, *_) -> None:
        """Handles every whole frame of what was read, in order; then reads on (or waits for a callback)."""
        data = self._unread
        pos = frames = 0
        began = time.monotonic()
        try:
            while not self.client_terminated:
                step = self._whole_text(data, pos)
                if step is None:
                    step = self._next_frame(data, pos)
                    if step is None:   # the rest is not a whole frame yet
                        break
                pos, waiting = step
                frames += 1
                if waiting is not None:   # a callback's awaitable: the next frame waits for it
                    del data[:pos]
                    asyncio.ensure_future(waiting).add_done_callback(self._parse)
                    return
                if not frames % 4 and time.monotonic() - began > _TURN_S:
                    del data[:pos]
                    asyncio.get_running_loop().call_soon(self._parse)   # let other work run first
                    return
        except Exception as exc:
            return self._ended(exc)
        del data[:pos]
        if not data:
            self._unread = None   # an idle connection keeps no buffer
        self._read_more()

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

    def _next_frame(self, data: bytearray, pos: int):
        """Handles the frame at `data[pos:]` if it is whole: `(next pos, awaitable or None)`; else None."""
        header = self._header
        if header is None:
            header = self._read_header(data, pos)
            if header is None:
                return None
            self._header = header
        opcode, final, start, length, keep = header
        start += pos   # the header keeps offsets from the frame's first byte: bytes before it are dropped
        end = start + 4 + length
        if len(data) < end:
            return None
        self._header = None
        if not keep:
            return end, None
        payload = _websocket_mask(bytes(data[start:start + 4]), bytes(data[start + 4:end])) if length else b""
        buffer = self._fragmented_message_buffer
        if opcode == _CONTINUATION:
            buffer.extend(payload)
            if not final:
                return end, None
            opcode, payload = self._fragmented_message_opcode, bytes(buffer)
            self._fragmented_message_buffer = None
            self.fragment_started = 0.0
        elif not final:   # the first frame of a fragmented message
            self._fragmented_message_opcode = opcode
            self._fragmented_message_buffer = bytearray(payload)
            self.fragment_started = time.monotonic()
            return end, None
        return end, self._handle_message(opcode, payload)

    def _whole_text(self, data: bytearray, pos: int):
        """Handles the commonest frame in one call: `(next pos, awaitable or None)`; None for any other.

        That is a whole masked text frame of fewer than 65,536 bytes, within
        max_message_size, while no fragmented message is open and the
        connection is not closing: every rule `_read_header` checks holds
        for it, and it is handled as `_next_frame` and `_handle_message`
        would (the rate limit first, then UTF-8, then on_message).
        """
        if self._header is not None or self.server_terminated or self._fragmented_message_buffer is not None:
            return None
        frame = _text_frame(data, pos, self.params.max_message_size)
        if frame is None:
            return None
        end, text = frame
        if not self.handler.on_frame():
            self._rate_limited()
            return end, None   # read, and dropped
        if text is None:
            return end, self.fail(CloseCode.INVALID_DATA, "text message not UTF-8")
        return end, self._deliver(text)

    def _rate_limited(self) -> None:
        report_broken(self.handler, CloseCode.POLICY_VIOLATION, "rate limit")
        self.close(int(CloseCode.POLICY_VIOLATION), "rate limit")

    def _read_header(self, data: bytearray, pos: int):
        """Checks a frame's header once it is whole: `(opcode, final, mask offset, length, keep)`, or None.

        `keep` is False for a frame read only to be dropped (after our close, or
        over the rate limit). A frame that breaks the rules fails the
        connection here, before its payload is waited for.
        """
        if len(data) - pos < 2:
            return None
        first, second = data[pos], data[pos + 1]
        length, start = second & 0x7F, pos + 2
        if length == 126:
            if len(data) - pos < 4:
                return None
            length, start = _SHORT.unpack_from(data, pos + 2)[0], pos + 4
        elif length == 127:
            if len(data) - pos < 10:
                return None
            length, start = _LONG.unpack_from(data, pos + 2)[0], pos + 10
        buffer = self._fragmented_message_buffer
        if (first == _WHOLE_TEXT or first == _WHOLE_BINARY) and second & _MASKED and buffer is None:
            problem = None   # the commonest frame: a whole masked message, none under way (as frame_problem says)
        else:
            problem = frame_problem(first, second, buffer is not None)
        if problem is not None:
            self.fail(CloseCode.PROTOCOL_ERROR, problem)
            return None
        opcode, keep = first & _OPCODE, True
        if self.server_terminated and opcode != _CLOSE and not self.handler.reads_after_close():
            keep = False   # closing: read on (no reset) until the client's close frame
        elif not self.handler.on_frame():   # every frame counts: pings and fragments cost as messages do
            self._rate_limited()
            keep = False
        elif opcode < _CLOSE and length + (len(buffer) if buffer is not None else 0) > self.params.max_message_size:
            self.fail(CloseCode.MESSAGE_TOO_BIG, "message too big")
            return None
        if not keep and length > self.params.max_message_size:
            self._abort()
            return None
        return opcode, first & _FIN, start - pos, length, keep

    def _handle_message(self, opcode: int, data: bytes):
        if self.client_terminated:
            return None
        if opcode == _TEXT:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                return self.fail(CloseCode.INVALID_DATA, "text message not UTF-8")
            return self._deliver(text)
        if opcode == _CLOSE:
            problem = close_frame_problem(data)
            if problem is not None:
                return self.fail(*problem)
        return super()._handle_message(opcode, data)

    def _deliver(self, text: str):
        """on_message(text), as Tornado's _run_callback runs it, without its frame: our handlers'
        on_message returns nothing (an awaitable it did return would be waited for)."""
        try:
            result = self.handler.on_message(text)
        except (Exception, asyncio.CancelledError):
            self.handler.log_exception(*sys.exc_info())
            self._abort()
            return None
        return None if result is None else self._run_callback(_given, result)
