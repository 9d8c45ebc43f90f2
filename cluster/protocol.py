"""The backend API wire contract (docs/protocol.md): envelopes, errors, parameters.

PURE: this module takes decoded JSON values or raw text and returns values or
raises `ApiError`. No sockets, no Tornado, no configuration. The terse wire keys
(`E`, `r`, `i`, `c`, `d`, `t`, ...) live here and nowhere else.
"""

import binascii
import enum
import re
import struct
from typing import Any, NamedTuple, Optional

import msgspec
import ujson

from cluster import speedups

__all__ = [
    "ApiError", "ErrorCode", "CloseCode", "Payload", "SendParams", "PublishParams",
    "CallParams", "WsRequest", "http_status", "parse_client_id", "parse_name",
    "parse_names", "parse_payload", "parse_send", "parse_publish", "parse_queue_pop",
    "parse_queue_unpop", "parse_queue_ack", "parse_conn_call", "parse_ws_request", "parse_http_body",
    "json_text", "json_loads", "SENT", "ok_body", "error_body", "queue_event", "acked_event", "client_frame", "encode_ws_frame",
    "PopParams", "AckOptions",
    "METHODS", "CALL_FUNCTIONS",
]

MAX_CLIENT_ID = 2 ** 64 - 1
MAX_NAME_BYTES = 255


class ErrorCode(enum.IntEnum):
    """docs/protocol.md, Error codes. Exchanged with backends: values never change."""

    INVALID_PARAMS = 101
    NOT_AUTHORIZED = 102
    PAYLOAD_TOO_LARGE = 103
    CONSUME_FAILED = 201
    REPEATED_CONSUMPTION = 202
    CANCEL_CONSUME_FAILED = 203
    CALL_FAILED = 301
    SEND_FAILED = 401
    MESH_UNAVAILABLE = 501


class CloseCode(enum.IntEnum):
    """WebSocket close codes meshgate sends (RFC 6455, section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007           # a text message that is not UTF-8
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012        # docs/protocol.md, Close codes: a rolling restart; reconnect at once
    TOKEN_EXPIRED = 4001          # docs/protocol.md, Client WebSocket server: JWT


# The closes of a node's drain, indexed by "is it a restart" (docs/protocol.md, Close codes).
DRAIN_CLOSES = ((int(CloseCode.GOING_AWAY), "server shutting down"),
                (int(CloseCode.SERVICE_RESTART), "service restart"))


# docs/protocol.md, HTTP status codes.
_HTTP_STATUS = {
    ErrorCode.INVALID_PARAMS: 400,
    ErrorCode.NOT_AUTHORIZED: 403,
    ErrorCode.PAYLOAD_TOO_LARGE: 400,
    ErrorCode.MESH_UNAVAILABLE: 503,
}


def http_status(code: ErrorCode) -> int:
    """Returns the HTTP status that carries an error envelope with `code`."""
    return _HTTP_STATUS.get(code, 200)


class ApiError(Exception):
    """A request failed with a protocol error code and a message naming the field.

    Args:
        code: the `ErrorCode`.
        message: a short English sentence, never a traceback.
        req_id: the request's `i` when it is already known (WebSocket only).
    """

    def __init__(self, code: ErrorCode, message: str, req_id: Any = None):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.req_id = req_id


def _invalid(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_PARAMS, message)


# --- identifiers ------------------------------------------------------------

def parse_client_id(value: Any, field: str = "p.c") -> int:
    """Parses a client_id given as a decimal string or a JSON integer.

    Raises:
        ApiError(101): negative, non-numeric, float, bool, empty or > 2^64-1.
    """
    if isinstance(value, bool):
        raise _invalid(f"{field}: client_id must be a decimal string or integer")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        if len(value) > 20:
            raise _invalid(f"{field}: client_id out of range")
        number = int(value)
    else:
        raise _invalid(f"{field}: client_id must be a decimal string or integer")
    if number < 0 or number > MAX_CLIENT_ID:
        raise _invalid(f"{field}: client_id out of range")
    return number


_BAD_NAME_CHAR = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
_NOT_UTF8 = 1 << 30


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8; a lone surrogate counts as too long (1 << 30)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return _NOT_UTF8


def name_problem(value: Any, kind: str = "channel"):
    """What is wrong with a channel or topic name (non-empty, <= 255 bytes, no whitespace or control
    characters), or None when nothing is. Shared by the API and the readers of cluster/mesh.py."""
    if type(value) is str and value.isascii() and 0 < len(value) <= MAX_NAME_BYTES \
            and not _BAD_NAME_CHAR.search(value):
        return None   # the common case, without encoding anything
    if not isinstance(value, str):
        return f"{kind} name must be a string"
    if not value:
        return f"{kind} name must not be empty"
    size = utf8_size(value)
    if size == _NOT_UTF8:
        return f"{kind} name is not valid Unicode text"
    if size > MAX_NAME_BYTES:
        return f"{kind} name is longer than {MAX_NAME_BYTES} bytes"
    if _BAD_NAME_CHAR.search(value):
        return f"{kind} name must not contain whitespace or control characters"
    return None


def parse_name(value: Any, field: str, kind: str = "channel") -> str:
    """Checks a channel or topic name (see `name_problem`).

    Raises:
        ApiError(101) naming `field`.
    """
    problem = name_problem(value, kind)
    if problem is not None:
        raise _invalid(f"{field}: {problem}")
    return value


def parse_names(value: Any, field: str, kind: str = "channel", allow_single: bool = True) -> list:
    """Parses a non-empty list of names (or one name when `allow_single`); duplicates folded, order kept."""
    if isinstance(value, str) and allow_single:
        return [parse_name(value, field, kind)]
    if not isinstance(value, list):
        raise _invalid(f"{field}: must be a {kind} name or a list of {kind} names")
    if not value:
        raise _invalid(f"{field}: {kind} list must not be empty")
    names = [parse_name(item, f"{field}[{index}]", kind) for index, item in enumerate(value)]
    return list(dict.fromkeys(names))


# --- data -------------------------------------------------------------------

_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}\Z")
_ABSENT = object()    # a field the request does not have (`dict.get` in one step, not `in` then `[]`)
_new = tuple.__new__  # a NamedTuple made on every request, without its Python-level constructor


def json_text(value: Any) -> str:
    """`value` as this project writes JSON: UTF-8 text unescaped, `/` as it is, no NaN or Infinity
    (OverflowError), nothing that is not JSON (TypeError).

    The options go by position (ensure_ascii, encode_html_chars, escape_forward_slashes, sort_keys,
    indent, allow_nan: ujson's order since 5.4, the oldest setup.py takes): ujson reads keyword
    arguments at about a microsecond a call, as much as it takes to write a small envelope.
    """
    return ujson.dumps(value, False, False, False, False, 0, False)


_dumps = json_text

_strict_loads = msgspec.json.Decoder().decode


def json_loads(text) -> Any:
    """`ujson.loads(text)` (text, or UTF-8 bytes), in about half its time for what strict JSON allows.

    msgspec reads it first: RFC 8259's JSON, integers of any size kept exact
    as ujson keeps them, the last of repeated keys. What msgspec refuses (a
    lone surrogate escape, NaN, a raw control character, nesting past Python's
    recursion limit, anything not JSON) is ujson's to read or refuse as before.

    Raises:
        ValueError, TypeError, OverflowError: ujson's, for what neither reads.
    """
    if len(text) > _UJSON_DEPTH and _nesting_bound(text) > _UJSON_DEPTH:
        return ujson.loads(text)   # deeper than ujson goes, maybe: ujson refuses it (msgspec's limit is Python's)
    try:
        return _strict_loads(text)
    except (ValueError, RecursionError):
        return ujson.loads(text)


_UJSON_DEPTH = 1024   # the deepest nesting ujson reads


def _nesting_bound(text) -> int:
    """At least how deep `text` could nest: its opening brackets, counted (inside strings too)."""
    if isinstance(text, str):
        return text.count("[") + text.count("{")
    return text.count(b"[") + text.count(b"{")


def json_carries(value: Any) -> bool:
    """Whether a reply can carry `value` as UTF-8 JSON (an entry may put anything in a context)."""
    try:
        _dumps(value).encode("utf-8")
    except (TypeError, OverflowError, ValueError):   # UnicodeEncodeError included
        return False
    return True


class Payload(NamedTuple):
    """Data for a client: the bytes of one WebSocket message and its type."""

    data: bytes
    binary: bool


def parse_payload(params: dict, prefix: str = "p.") -> Payload:
    """Reads `d` and `t` (docs/protocol.md, Data and message types).

    Raises:
        ApiError(101): `d` missing or of the wrong type, `t` unknown, bad base64.
    """
    data = params.get("d", _ABSENT)
    if data is _ABSENT:
        raise _invalid(f"{prefix}d: data is required")
    msg_type = params.get("t", "text")
    if msg_type == "text":
        try:
            if isinstance(data, str):
                return _new(Payload, (data.encode("utf-8"), False))
            if isinstance(data, (dict, list)):
                return Payload(_dumps(data).encode("utf-8"), False)
        except UnicodeEncodeError:
            raise _invalid(f"{prefix}d: data is not valid Unicode text") from None
        except OverflowError:   # NaN or Infinity, which JSON has no way to write
            raise _invalid(f"{prefix}d: data holds a number JSON cannot carry (NaN or Infinity)") from None
        raise _invalid(f"{prefix}d: data must be a string, object or array for type text")
    if msg_type == "binary":
        if not isinstance(data, str):
            raise _invalid(f"{prefix}d: data must be a base64 string for type binary")
        if len(data) % 4 or not _BASE64.match(data):
            raise _invalid(f"{prefix}d: data is not valid base64 (standard alphabet, padding required)")
        try:
            return Payload(binascii.a2b_base64(data.encode("ascii"), strict_mode=True), True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise _invalid(f"{prefix}d: data is not valid base64 (standard alphabet, padding required)") from None
    raise _invalid(f"{prefix}t: type must be \"text\" or \"binary\"")


def _require_object(params: Any, prefix: str) -> dict:
    if not isinstance(params, dict):
        raise _invalid(f"{_whole(prefix)}: must be a JSON object")
    return params


class SendParams(NamedTuple):
    client_id: int
    payload: Payload


class PublishParams(NamedTuple):
    channels: list
    payload: Payload


def parse_send(params: Any, prefix: str = "p.") -> SendParams:
    """Parameters of mesh.send: `prefix` is "p." for `/ws/v1` and "" for an HTTP body."""
    params = _require_object(params, prefix)
    client_id = params.get("c", _ABSENT)
    if client_id is _ABSENT:
        raise _invalid(f"{prefix}c: client_id is required")
    if type(client_id) is str and client_id.isdigit() and client_id.isascii() and len(client_id) < 20:
        client_id = int(client_id)   # below 10^19, within range: the commonest id, read without more ado
    else:
        client_id = parse_client_id(client_id, f"{prefix}c")
    return _new(SendParams, (client_id, parse_payload(params, prefix)))


def parse_publish(params: Any, prefix: str = "p.") -> PublishParams:
    """Parameters of mesh.publish; `c` is one channel or a non-empty list of them."""
    params = _require_object(params, prefix)
    if "c" not in params:
        raise _invalid(f"{prefix}c: channel is required")
    channels = parse_names(params["c"], f"{prefix}c", "channel")
    return _new(PublishParams, (channels, parse_payload(params, prefix)))


def _whole(prefix: str) -> str:
    """The name of the parameters object itself in messages: `p`, or `body` over HTTP."""
    return prefix.rstrip(".") or "body"


# docs/protocol.md, Queue acknowledgements: the bounds of `window` and `ack_timeout`, their defaults, and
# the most delivery ids one queue.ack may carry (a whole window at most).
DEFAULT_WINDOW = 100
MAX_WINDOW = 10000
DEFAULT_ACK_TIMEOUT = 30
MAX_ACK_TIMEOUT = 3600
MAX_ACK_IDS = MAX_WINDOW


class AckOptions(NamedTuple):
    """What an at-least-once queue.pop asked for; None: not given (the default, or what the connection has)."""
    window: Optional[int] = None
    ack_timeout: Optional[float] = None


class PopParams(NamedTuple):
    topics: list
    ack: Optional[AckOptions] = None   # None: at most once


def parse_queue_pop(params: Any, prefix: str = "p.") -> PopParams:
    """Parameters of queue.pop: `{"t": [..]}` or `{"t": ".."}` (with `ack`, `window`, `ack_timeout`),
    or the connmix list form `[..]`."""
    if isinstance(params, list):
        return PopParams(parse_names(params, _whole(prefix), "topic"))
    params = _require_object(params, prefix)
    if "t" not in params:
        raise _invalid(f"{prefix}t: topic list is required")
    topics = parse_names(params["t"], f"{prefix}t", "topic")
    ack = params.get("ack", False)
    if type(ack) is not bool:
        raise _invalid(f"{prefix}ack: must be true or false")
    window = params.get("window")
    if "window" in params and (type(window) is not int or not 1 <= window <= MAX_WINDOW):
        raise _invalid(f"{prefix}window: must be an integer from 1 to {MAX_WINDOW}")
    timeout = params.get("ack_timeout")
    if "ack_timeout" in params and (type(timeout) not in (int, float) or not 1 <= timeout <= MAX_ACK_TIMEOUT):
        raise _invalid(f"{prefix}ack_timeout: must be a number of seconds from 1 to {MAX_ACK_TIMEOUT}")
    # Without ack they are checked all the same, and change nothing.
    return PopParams(topics, AckOptions(window, None if timeout is None else float(timeout)) if ack else None)


def parse_queue_ack(params: Any, prefix: str = "p.") -> list:
    """The delivery ids of queue.ack: `{"k": ["<id>", ...]}`, at most MAX_ACK_IDS of them."""
    params = _require_object(params, prefix)
    if "k" not in params:
        raise _invalid(f"{prefix}k: delivery id list is required")
    ids = params["k"]
    if type(ids) is not list:
        raise _invalid(f"{prefix}k: must be a list of delivery ids")
    if len(ids) > MAX_ACK_IDS:
        raise _invalid(f"{prefix}k: at most {MAX_ACK_IDS} delivery ids per queue.ack")
    for index, delivery_id in enumerate(ids):
        if type(delivery_id) is not str:
            raise _invalid(f"{prefix}k[{index}]: a delivery id is a string")
    return ids


def parse_queue_unpop(params: Any, prefix: str = "p."):
    """Topics of queue.unpop, or None for all of this connection's topics."""
    if params is None:
        return None
    if isinstance(params, list):
        return parse_names(params, _whole(prefix), "topic") if params else None
    params = _require_object(params, prefix)
    if "t" not in params or params["t"] is None:
        return None
    return parse_names(params["t"], f"{prefix}t", "topic")


# conn.call functions (docs/protocol.md, conn.call). Exchanged between nodes: append only.
CALL_FUNCTIONS = ("set_context_value", "set_context", "subscribe", "unsubscribe", "close", "get_context")
_MAX_REASON_BYTES = 123


class CallParams(NamedTuple):
    client_id: int
    function: str
    args: list




def valid_close_code(code: Any) -> bool:
    """A close code a close frame may carry: 1000-1003, 1007-1011 or 3000-4999 (RFC 6455, section 7.4)."""
    return (isinstance(code, int) and not isinstance(code, bool)
            and (code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1011 or 3000 <= code <= 4999))


def _writable(args: list, field: str) -> list:
    """A context value goes back out as JSON (get_context, other nodes): NaN and Infinity cannot."""
    try:
        _dumps(args).encode("utf-8")
    except OverflowError:
        raise _invalid(f"{field}: holds NaN or Infinity, which JSON cannot carry") from None
    except UnicodeEncodeError:
        raise _invalid(f"{field}: holds a lone UTF-16 surrogate") from None
    return args


def parse_call_args(function: str, args: list, prefix: str = "p.") -> list:
    """Validates `a` for one conn.call function and returns it normalised."""
    field = f"{prefix}a"
    if function == "set_context_value":
        if len(args) != 2:
            raise _invalid(f"{field}: set_context_value takes [key, value]")
        if not isinstance(args[0], str) or not args[0]:
            raise _invalid(f"{field}[0]: key must be a non-empty string")
        return _writable(args, f"{field}[1]")
    if function == "set_context":
        if len(args) != 1 or not isinstance(args[0], dict):
            raise _invalid(f"{field}: set_context takes [object]")
        return _writable(args, f"{field}[0]")
    if function in ("subscribe", "unsubscribe"):
        if not args:
            raise _invalid(f"{field}: {function} takes at least one channel")
        return parse_names(args, field, "channel", allow_single=False)
    if function == "close":
        if len(args) > 2:
            raise _invalid(f"{field}: close takes [], [code] or [code, reason]")
        if args and not valid_close_code(args[0]):
            raise _invalid(f"{field}[0]: close code must be 1000-1003, 1007-1011 or 3000-4999")
        if len(args) == 2 and (not isinstance(args[1], str) or utf8_size(args[1]) > _MAX_REASON_BYTES):
            raise _invalid(f"{field}[1]: close reason must be a text string of at most {_MAX_REASON_BYTES} bytes")
        return args
    if function == "get_context":
        if args:
            raise _invalid(f"{field}: get_context takes []")
        return args
    raise _invalid(f"{prefix}f: unknown function {function!r}")


def parse_conn_call(params: Any, prefix: str = "p.") -> CallParams:
    """Parameters of conn.call: `c`, `f` (one of CALL_FUNCTIONS) and `a` (a list)."""
    params = _require_object(params, prefix)
    if "c" not in params:
        raise _invalid(f"{prefix}c: client_id is required")
    client_id = parse_client_id(params["c"], f"{prefix}c")
    function = params.get("f")
    if not isinstance(function, str):
        raise _invalid(f"{prefix}f: function name is required")
    if function not in CALL_FUNCTIONS:
        raise _invalid(f"{prefix}f: unknown function {function!r}")
    args = params.get("a", [])
    if not isinstance(args, list):
        raise _invalid(f"{prefix}a: arguments must be a list")
    return CallParams(client_id, function, parse_call_args(function, args, prefix))


# docs/protocol.md, Presence: entries listed by default, and at most.
PRESENCE_LIMIT = 10000
MAX_PRESENCE_LIMIT = 100000


class PresenceParams(NamedTuple):
    channel: str
    context: bool     # each entry also carries the client's context
    limit: int        # entries listed at most (the count is always whole)


def parse_presence(params: Any, prefix: str = "p.") -> PresenceParams:
    """Parameters of channel.presence: `c` one channel, `context` (false), `limit` (PRESENCE_LIMIT)."""
    params = _require_object(params, prefix)
    channel = parse_count(params, prefix)
    context = params.get("context", False)
    if type(context) is not bool:
        raise _invalid(f"{prefix}context: must be true or false")
    limit = params.get("limit", PRESENCE_LIMIT)
    if type(limit) is not int or not 0 <= limit <= MAX_PRESENCE_LIMIT:
        raise _invalid(f"{prefix}limit: must be an integer from 0 to {MAX_PRESENCE_LIMIT}")
    return PresenceParams(channel, context, limit)


def parse_count(params: Any, prefix: str = "p.") -> str:
    """The one channel of channel.count (and channel.presence)."""
    params = _require_object(params, prefix)
    if "c" not in params:
        raise _invalid(f"{prefix}c: channel is required")
    return parse_name(params["c"], f"{prefix}c")


# --- requests ---------------------------------------------------------------

METHODS = ("queue.pop", "queue.unpop", "conn.call", "mesh.send", "mesh.publish", "channel.presence",
           "channel.count", "queue.ack")
_METHOD_NAMES = frozenset(METHODS)


class WsRequest(NamedTuple):
    method: str
    params: Any
    req_id: Any


def _decode(text, field: str) -> tuple:
    """`(text, value)` of JSON given as UTF-8 bytes or text."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = text.decode("utf-8")   # strict: surrogates written as UTF-8 bytes are not UTF-8
        except UnicodeDecodeError:
            raise _invalid(f"{field}: malformed JSON (not UTF-8 text)") from None
    try:
        return text, json_loads(text)
    except (ValueError, TypeError, OverflowError):
        raise _invalid(f"{field}: malformed JSON") from None


def _surrogate_free(text: str, value: Any) -> bool:
    """False when the JSON escaped a lone UTF-16 surrogate (\\ud800), which no UTF-8 text can carry."""
    if "\\ud" not in text and "\\uD" not in text:
        return True
    try:   # NaN and Infinity are another matter (refused where they would be written)
        ujson.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
    except OverflowError:   # nested deeper than the encoder goes: no surrogate found, the rest is refused later
        return True


def _loads(text, field: str = "request") -> Any:
    text, value = _decode(text, field)
    if not _surrogate_free(text, value):
        raise _invalid(f"{field}: lone UTF-16 surrogate escape")
    return value


def parse_ws_request(text) -> WsRequest:
    """Decodes one `/ws/v1` request `{"m": .., "p": .., "i": ..}` (`id` is an alias of `i`).

    Raises:
        ApiError(101) with `req_id` set when the id could be read.
    """
    if type(text) is str:   # what the frame reader hands over (text it checked as UTF-8)
        try:
            message = json_loads(text)
        except (ValueError, TypeError, OverflowError):
            raise _invalid("request: malformed JSON") from None
    else:
        text, message = _decode(text, "request")
    if type(message) is not dict:
        raise _invalid("request must be a JSON object")
    req_id = message.get("i", _ABSENT)
    if req_id is _ABSENT:
        req_id = message.get("id")
    if req_id is not None and type(req_id) is not int and type(req_id) is not str:   # bool is not int here
        raise _invalid("i: id must be an integer or a string")
    if not _surrogate_free(text, message):   # answered with its id, unless the id is what cannot be written
        echo = None if isinstance(req_id, str) and utf8_size(req_id) == _NOT_UTF8 else req_id
        raise ApiError(ErrorCode.INVALID_PARAMS, "request: lone UTF-16 surrogate escape", echo)
    method = message.get("m")
    if type(method) is not str:
        raise ApiError(ErrorCode.INVALID_PARAMS, "m: method name is required", req_id)
    if method not in _METHOD_NAMES:
        raise ApiError(ErrorCode.INVALID_PARAMS, f"m: unknown method {method!r}", req_id)
    params = message.get("p", _ABSENT)
    return _new(WsRequest, (method, {} if params is _ABSENT else params, req_id))


def parse_http_body(body: bytes) -> dict:
    """Decodes an HTTP request body, which must be a JSON object."""
    if not body:
        raise _invalid("body: a JSON object is required")
    value = _loads(body, "body")
    if not isinstance(value, dict):
        raise _invalid("body: must be a JSON object")
    return value


# --- responses and events ---------------------------------------------------

SENT = {"s": True}   # the result of most calls that succeed (mesh.send's always): written once, below
_SENT_JSON = b'{"s":true}'


def ok_body(result: Any, req_id: Any = None, ws: bool = False) -> bytes:
    """Success envelope `{"E": null, "r": result}` (plus `i` over WebSocket), as UTF-8 JSON.

    The shell is written as bytes around the encoded result: one encoding per
    answer, none for `SENT` (one for an id that is not an integer).
    """
    result = _SENT_JSON if result is SENT else _dumps(result).encode("utf-8")
    if not ws:
        return b'{"E":null,"r":%s}' % result
    if type(req_id) is int:
        return b'{"E":null,"r":%s,"i":%d}' % (result, req_id)
    return b'{"E":null,"r":%s,"i":%s}' % (result, _dumps(req_id).encode("utf-8"))


def error_body(code: ErrorCode, message: str, req_id: Any = None, ws: bool = False) -> str:
    """Error envelope `{"E": {"c": code, "m": message}}` (plus `i` over WebSocket)."""
    envelope = {"E": {"c": int(code), "m": message}}
    if ws:
        envelope["i"] = req_id
    return _dumps(envelope)


def client_frame(message) -> dict:
    """The frame handed to the entry for one complete client message (docs/protocol.md, Client WebSocket server)."""
    if isinstance(message, bytes):
        return {"type": "binary", "data": binascii.b2a_base64(message, newline=False).decode("ascii"), "finish": True}
    return {"type": "text", "data": message, "finish": True}


def queue_event(node_id: int, client_id: int, topic: str, data: Any) -> bytes:
    """The `queue.pop` event a consumer receives, encoded once (docs/protocol.md, queue.pop)."""
    return _dumps({"e": "queue.pop", "p": {"n": node_id, "c": str(client_id), "t": topic, "d": data},
                   "i": None}).encode("utf-8")


_EVENT_HEAD = b'{"e":"queue.pop","p":{'   # how queue_event begins: `k` and `a` go in right after


def acked_event(event: bytes, delivery_id: str, attempt: int) -> bytes:
    """A queue event (as `queue_event` wrote it) for an at-least-once consumer: `p` carries `k`, the
    delivery id, and `a`, the attempt (docs/protocol.md, Queue acknowledgements). `delivery_id` is
    written as it is: it must need no JSON escaping."""
    if event.startswith(_EVENT_HEAD):
        return b'%s"k":"%s","a":%d,%s' % (_EVENT_HEAD, delivery_id.encode("ascii"), attempt, event[len(_EVENT_HEAD):])
    value = ujson.loads(event)   # not ours byte for byte (another writer): the same fields, written again
    value["p"] = {"k": delivery_id, "a": attempt, **value["p"]}
    return _dumps(value).encode("utf-8")


_OPCODE_TEXT = 0x81
_OPCODE_BINARY = 0x82


def encode_ws_frame(data: bytes, binary: bool = False) -> bytes:
    """One unmasked, unfragmented server-to-client WebSocket frame (RFC 6455, 5.2).

    Built once per message per node and written as-is to every recipient.
    """
    first = _OPCODE_BINARY if binary else _OPCODE_TEXT
    length = len(data)
    if length < 126:
        header = bytes((first, length))
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", first, 126, length)
    else:
        header = struct.pack("!BBQ", first, 127, length)
    return header + data


# The C versions (cluster/_speedups.c) when they are built; each hands what is not the common case to
# the Python function above, kept under its own name for the tests that compare the two.
parse_ws_request_python, parse_send_python, encode_ws_frame_python = parse_ws_request, parse_send, encode_ws_frame
parse_publish_python, parse_http_body_python = parse_publish, parse_http_body
if speedups.native is not None:
    speedups.native.setup(_strict_loads, _METHOD_NAMES, WsRequest, SendParams, Payload,
                          parse_ws_request_python, parse_send_python)
    speedups.native.setup_publish(PublishParams, parse_publish_python, parse_http_body_python)
    speedups.native.set_python("encode_ws_frame", encode_ws_frame_python)
    parse_ws_request, parse_send = speedups.native.parse_ws_request, speedups.native.parse_send
    parse_publish, parse_http_body = speedups.native.parse_publish, speedups.native.parse_http_body
    encode_ws_frame = speedups.native.encode_ws_frame
