"""Table-driven tests of cluster/protocol.py, the backend API wire contract (docs/protocol.md)."""

import base64
import json
import struct

import pytest
import ujson

from cluster import protocol
from cluster.protocol import (
    ApiError, CallParams, ErrorCode, Payload, PublishParams, SendParams, WsRequest,
)

MAX_ID = 2 ** 64 - 1


def assert_invalid(call, *args, field, **kwargs) -> ApiError:
    """Runs `call` and checks it raises ApiError 101 whose message starts with `field:`."""
    with pytest.raises(ApiError) as info:
        call(*args, **kwargs)
    error = info.value
    assert error.code is ErrorCode.INVALID_PARAMS
    assert error.message.startswith(f"{field}:"), error.message
    assert error.message == str(error)
    assert "Traceback" not in error.message
    return error


# --- error codes and HTTP status ---------------------------------------------------

@pytest.mark.parametrize("member, value", [
    ("INVALID_PARAMS", 101), ("NOT_AUTHORIZED", 102), ("PAYLOAD_TOO_LARGE", 103),
    ("CONSUME_FAILED", 201), ("REPEATED_CONSUMPTION", 202), ("CANCEL_CONSUME_FAILED", 203),
    ("CALL_FAILED", 301), ("SEND_FAILED", 401), ("MESH_UNAVAILABLE", 501),
])
def test_error_code_values(member, value):
    """Every error code has the number docs/protocol.md gives it."""
    assert ErrorCode[member] == value


@pytest.mark.parametrize("code, status", [
    (ErrorCode.INVALID_PARAMS, 400),
    (ErrorCode.PAYLOAD_TOO_LARGE, 400),
    (ErrorCode.MESH_UNAVAILABLE, 503),
    (ErrorCode.SEND_FAILED, 200),
    (ErrorCode.CALL_FAILED, 200),
])
def test_http_status(code, status):
    """Each error code maps to the HTTP status docs/protocol.md decides."""
    assert protocol.http_status(code) == status


def test_http_status_not_authorized():
    """Error 102 travels with HTTP 401 or 403."""
    assert protocol.http_status(ErrorCode.NOT_AUTHORIZED) in (401, 403)


def test_api_error_coerces_code():
    """ApiError turns a bare number into an ErrorCode and keeps message and request id."""
    error = ApiError(401, "p.c: client is not connected", req_id="x")
    assert error.code is ErrorCode.SEND_FAILED
    assert error.message == "p.c: client is not connected"
    assert error.req_id == "x"


def test_api_error_refuses_unknown_code():
    """ApiError refuses a number that is not a protocol error code."""
    with pytest.raises(ValueError):
        ApiError(999, "x")


# --- client ids -------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("0", 0),
    ("1", 1),
    ("1463786910324359168", 1463786910324359168),
    ("18446744073709551615", MAX_ID),
    ("00000000000000000042", 42),
    (0, 0),
    (1463786910324359168, 1463786910324359168),
    (MAX_ID, MAX_ID),
])
def test_parse_client_id_good(value, expected):
    """A client id given as a decimal string or a JSON integer is accepted."""
    assert protocol.parse_client_id(value) == expected


@pytest.mark.parametrize("value", [
    -1, "-1", -(2 ** 70),
    "", " ", " 1", "1 ", "+1", "1.0", "1e3", "0x10", "abc", "12a",
    "1_000", "\u0661\u0662\u0663", "\uff11\uff12\uff13",
    1.0, 1.5, float("nan"), float("inf"),
    True, False, None, [1], {"c": 1},
    "18446744073709551616", 2 ** 64, "99999999999999999999",
    "123456789012345678901", "9" * 25, 10 ** 30,
])
def test_parse_client_id_bad(value):
    """Negative, non-numeric, float, bool, empty or > 2^64-1 client ids are 101 naming p.c."""
    assert_invalid(protocol.parse_client_id, value, field="p.c")


@pytest.mark.parametrize("field", ["p.c", "c", "p.a"])
def test_parse_client_id_names_given_field(field):
    """The error message starts with the field the caller names."""
    assert_invalid(protocol.parse_client_id, "nope", field, field=field)


# --- channel and topic names ------------------------------------------------------

@pytest.mark.parametrize("name", [
    "a",
    "chat.room-1",
    "a:b/c_d@e",
    "x" * 255,
    "\u00e9" * 127,            # 254 bytes
    "\u20ac" * 85,             # 255 bytes
    "\U0001F600" * 63,         # 252 bytes
    "a" * 251 + "\U0001F600",  # 255 bytes
    "\u9891\u9053",
])
def test_parse_name_good(name):
    """Non-empty names of at most 255 bytes without whitespace or control characters are kept."""
    assert protocol.parse_name(name, "p.c") == name


@pytest.mark.parametrize("name", [
    "",
    " ", "a b", " a", "a ", "a\tb", "\t", "a\nb", "a\rb", "a\x0bb", "a\x0cb",
    "a\x00b", "\x01", "a\x1f", "a\x7f", "a\x85b", "a\x9fb",
    "a\u00a0b", "a\u2003b", "a\u3000b", "a\u2028b",
    "x" * 256,
    "x" * 1000,
    "\u00e9" * 128,            # 256 bytes in 128 characters
    "\u20ac" * 86,             # 258 bytes
    "a" * 254 + "\u00e9",      # 255 characters, 256 bytes
    "\U0001F600" * 64,         # 64 characters, 256 bytes
    "a" * 252 + "\U0001F600",  # 256 bytes
    5, 1.5, None, True, ["a"], {"a": 1}, b"a",
])
def test_parse_name_bad(name):
    """Empty, whitespace, control characters, more than 255 bytes or not a string are 101."""
    assert_invalid(protocol.parse_name, name, "p.c", field="p.c")


@pytest.mark.parametrize("name", ["\ud800", "a\udfffb", "a" * 70 + "\ud83d"], ids=["high", "low-inside", "long"])
def test_parse_name_lone_surrogate(name):
    """A name that is not valid Unicode (a lone surrogate from a JSON escape) is 101, not a crash."""
    assert_invalid(protocol.parse_name, name, "p.c", field="p.c")


@pytest.mark.parametrize("kind", ["channel", "topic"])
def test_parse_name_message_names_kind(kind):
    """The error message says which kind of name was wrong."""
    error = assert_invalid(protocol.parse_name, "", "p.t", kind, field="p.t")
    assert kind in error.message


@pytest.mark.parametrize("value, expected", [
    ("a", ["a"]),
    (["a"], ["a"]),
    (["a", "b", "a", "c", "b"], ["a", "b", "c"]),
    (["z", "y"], ["z", "y"]),
])
def test_parse_names_good(value, expected):
    """One name or a list of names; duplicates folded, order kept."""
    assert protocol.parse_names(value, "p.c") == expected


@pytest.mark.parametrize("value, field", [
    ([], "p.c"),
    (None, "p.c"),
    (5, "p.c"),
    ({"a": 1}, "p.c"),
    (["a", ""], "p.c[1]"),
    (["a", "b", "c d"], "p.c[2]"),
    ([7], "p.c[0]"),
    ([["a"]], "p.c[0]"),
])
def test_parse_names_bad(value, field):
    """An empty list, a non-list or a bad item is 101 naming the item's index."""
    assert_invalid(protocol.parse_names, value, "p.c", field=field)


def test_parse_names_single_refused_when_not_allowed():
    """A lone string is refused where a list is required."""
    assert_invalid(protocol.parse_names, "a", "p.a", allow_single=False, field="p.a")


# --- payload (d and t) ------------------------------------------------------------

@pytest.mark.parametrize("params, expected", [
    ({"d": "data"}, Payload(b"data", False)),
    ({"d": "data", "t": "text"}, Payload(b"data", False)),
    ({"d": ""}, Payload(b"", False)),
    ({"d": "h\u00e9llo \u9891\u9053 \U0001F600"}, Payload("h\u00e9llo \u9891\u9053 \U0001F600".encode("utf-8"), False)),
    ({"d": "YQ==", "t": "binary"}, Payload(b"a", True)),
    ({"d": "YWI=", "t": "binary"}, Payload(b"ab", True)),
    ({"d": "YWJj", "t": "binary"}, Payload(b"abc", True)),
    ({"d": "AP8+/w==", "t": "binary"}, Payload(b"\x00\xff\x3e\xff", True)),
    ({"d": "", "t": "binary"}, Payload(b"", True)),
])
def test_parse_payload_good(params, expected):
    """Text is sent as UTF-8; binary is strict standard base64 with padding."""
    assert protocol.parse_payload(params) == expected


@pytest.mark.parametrize("data", [
    {},
    [],
    {"a": 1, "b": [1, 2, {"c": None}], "s": "x y"},
    [1, "two", 3.5, True, None],
    {"url": "http://h/p", "u": "\u00e9\u9891"},
    {"nested": {"deep": {"deeper": []}}},
])
def test_parse_payload_text_json(data):
    """A text object or array is sent as its compact JSON text."""
    payload = protocol.parse_payload({"d": data, "t": "text"})
    assert payload.binary is False
    text = payload.data.decode("utf-8")
    assert json.loads(text) == data
    # "\/" is an allowed JSON escape of "/"; otherwise the text is the compact form.
    assert text.replace("\\/", "/") == json.dumps(data, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize("params, field", [
    ({}, "p.d"),
    ({"t": "text"}, "p.d"),
    ({"t": "binary"}, "p.d"),
    ({"d": 1}, "p.d"),
    ({"d": 1.5}, "p.d"),
    ({"d": 0}, "p.d"),
    ({"d": True}, "p.d"),
    ({"d": False}, "p.d"),
    ({"d": None}, "p.d"),
    ({"d": 1, "t": "text"}, "p.d"),
    ({"d": None, "t": "text"}, "p.d"),
    ({"d": "x", "t": None}, "p.t"),
    ({"d": "x", "t": ""}, "p.t"),
    ({"d": "x", "t": "TEXT"}, "p.t"),
    ({"d": "x", "t": "json"}, "p.t"),
    ({"d": "x", "t": 1}, "p.t"),
    ({"d": "x", "t": True}, "p.t"),
    ({"d": "x", "t": ["text"]}, "p.t"),
    ({"d": 5, "t": "binary"}, "p.d"),
    ({"d": None, "t": "binary"}, "p.d"),
    ({"d": ["YQ=="], "t": "binary"}, "p.d"),
    ({"d": {"a": "YQ=="}, "t": "binary"}, "p.d"),
    ({"d": "YQ", "t": "binary"}, "p.d"),
    ({"d": "YQ=", "t": "binary"}, "p.d"),
    ({"d": "YWI", "t": "binary"}, "p.d"),
    ({"d": "YQ===", "t": "binary"}, "p.d"),
    ({"d": "=YQ=", "t": "binary"}, "p.d"),
    ({"d": "YQ==YQ==", "t": "binary"}, "p.d"),
    ({"d": " YQ==", "t": "binary"}, "p.d"),
    ({"d": "Y Q==", "t": "binary"}, "p.d"),
    ({"d": "YQ==\n", "t": "binary"}, "p.d"),
    ({"d": "-_8=", "t": "binary"}, "p.d"),
    ({"d": "YQ*=", "t": "binary"}, "p.d"),
    ({"d": "\u00e9\u00e9\u00e9\u00e9", "t": "binary"}, "p.d"),
    ({"d": "hello", "t": "binary"}, "p.d"),
])
def test_parse_payload_bad(params, field):
    """Missing d, number/bool/null d, unknown or null t and bad base64 are 101 naming the field."""
    assert_invalid(protocol.parse_payload, params, field=field)


@pytest.mark.parametrize("params, field", [
    ({}, "d"),
    ({"d": 1}, "d"),
    ({"d": "x", "t": None}, "t"),
    ({"d": "YQ", "t": "binary"}, "d"),
])
def test_parse_payload_http_prefix(params, field):
    """With the HTTP prefix "" the message names the bare field."""
    assert_invalid(protocol.parse_payload, params, "", field=field)


@pytest.mark.parametrize("data", ["\ud800", "ok \udc00 ok", {"k": "\ud800"}, ["\udfff"]],
                         ids=["string", "string-inside", "object", "array"])
def test_parse_payload_lone_surrogate(data):
    """Text that cannot be encoded as UTF-8 (a lone surrogate) is 101, not a crash."""
    assert_invalid(protocol.parse_payload, {"d": data}, field="p.d")


def test_parse_payload_binary_round_trip():
    """Every byte value survives the base64 binary form."""
    raw = bytes(range(256)) * 3
    payload = protocol.parse_payload({"d": base64.b64encode(raw).decode("ascii"), "t": "binary"})
    assert payload == Payload(raw, True)


# --- mesh.send / mesh.publish -------------------------------------------------------

@pytest.mark.parametrize("params, expected", [
    ({"c": "1463786910324359168", "d": "data", "t": "text"}, SendParams(1463786910324359168, Payload(b"data", False))),
    ({"c": 1463786910324359168, "d": "data"}, SendParams(1463786910324359168, Payload(b"data", False))),
    ({"c": "18446744073709551615", "d": "YQ==", "t": "binary"}, SendParams(MAX_ID, Payload(b"a", True))),
    ({"c": "7", "d": {"k": 1}}, SendParams(7, Payload(b'{"k":1}', False))),
])
def test_parse_send_good(params, expected):
    """mesh.send takes c as a decimal string or integer and d/t."""
    assert protocol.parse_send(params) == expected
    assert protocol.parse_send(params, "") == expected


@pytest.mark.parametrize("params, field", [
    (None, "p"),
    ([], "p"),
    ("x", "p"),
    ({}, "p.c"),
    ({"d": "x"}, "p.c"),
    ({"c": None, "d": "x"}, "p.c"),
    ({"c": "-1", "d": "x"}, "p.c"),
    ({"c": 1.5, "d": "x"}, "p.c"),
    ({"c": True, "d": "x"}, "p.c"),
    ({"c": "", "d": "x"}, "p.c"),
    ({"c": "18446744073709551616", "d": "x"}, "p.c"),
    ({"c": "1"}, "p.d"),
    ({"c": "1", "d": 3}, "p.d"),
    ({"c": "1", "d": "x", "t": None}, "p.t"),
    ({"c": "1", "d": "x", "t": "blob"}, "p.t"),
    ({"c": "1", "d": "!!", "t": "binary"}, "p.d"),
])
def test_parse_send_bad(params, field):
    """Bad mesh.send parameters over WebSocket are 101 naming p.<field>."""
    assert_invalid(protocol.parse_send, params, field=field)


@pytest.mark.parametrize("params, field", [
    (None, "body"),
    ([], "body"),
    ({}, "c"),
    ({"c": "-1", "d": "x"}, "c"),
    ({"c": 1.0, "d": "x"}, "c"),
    ({"c": "1"}, "d"),
    ({"c": "1", "d": None}, "d"),
    ({"c": "1", "d": "x", "t": "bin"}, "t"),
])
def test_parse_send_bad_http(params, field):
    """Bad /v1/mesh/send bodies are 101 naming the bare field."""
    assert_invalid(protocol.parse_send, params, "", field=field)


@pytest.mark.parametrize("params, expected", [
    ({"c": "channel1", "d": "data"}, PublishParams(["channel1"], Payload(b"data", False))),
    ({"c": ["a", "b"], "d": "data", "t": "text"}, PublishParams(["a", "b"], Payload(b"data", False))),
    ({"c": ["a", "b", "a"], "d": "data"}, PublishParams(["a", "b"], Payload(b"data", False))),
    ({"c": "a", "d": "YQ==", "t": "binary"}, PublishParams(["a"], Payload(b"a", True))),
    ({"c": "a", "d": [1]}, PublishParams(["a"], Payload(b"[1]", False))),
])
def test_parse_publish_good(params, expected):
    """mesh.publish takes one channel or a non-empty list of channels."""
    assert protocol.parse_publish(params) == expected
    assert protocol.parse_publish(params, "") == expected


@pytest.mark.parametrize("params, field", [
    (None, "p"),
    ("a", "p"),
    ({}, "p.c"),
    ({"d": "x"}, "p.c"),
    ({"c": "", "d": "x"}, "p.c"),
    ({"c": "a b", "d": "x"}, "p.c"),
    ({"c": 5, "d": "x"}, "p.c"),
    ({"c": None, "d": "x"}, "p.c"),
    ({"c": [], "d": "x"}, "p.c"),
    ({"c": ["a", 5], "d": "x"}, "p.c[1]"),
    ({"c": ["a", "x" * 256], "d": "x"}, "p.c[1]"),
    ({"c": ["a\tb"], "d": "x"}, "p.c[0]"),
    ({"c": "a"}, "p.d"),
    ({"c": "a", "d": False}, "p.d"),
    ({"c": "a", "d": "x", "t": None}, "p.t"),
])
def test_parse_publish_bad(params, field):
    """Bad mesh.publish parameters are 101 naming the field (and list index)."""
    assert_invalid(protocol.parse_publish, params, field=field)


@pytest.mark.parametrize("params, field", [
    (None, "body"),
    ({}, "c"),
    ({"c": [], "d": "x"}, "c"),
    ({"c": ["ok", ""], "d": "x"}, "c[1]"),
    ({"c": "a"}, "d"),
])
def test_parse_publish_bad_http(params, field):
    """Bad /v1/mesh/publish bodies are 101 naming the bare field."""
    assert_invalid(protocol.parse_publish, params, "", field=field)


# --- queue.pop / queue.unpop ------------------------------------------------------

@pytest.mark.parametrize("params, expected", [
    ({"t": ["topic1"]}, ["topic1"]),
    ({"t": ["a", "b"]}, ["a", "b"]),
    ({"t": ["a", "b", "a"]}, ["a", "b"]),
    ({"t": "topic1"}, ["topic1"]),
    (["topic1"], ["topic1"]),
    (["a", "b", "b"], ["a", "b"]),
])
def test_parse_queue_pop_good(params, expected):
    """queue.pop accepts {"t": [..]}, {"t": ".."} and the list form; without `ack` it is at most once."""
    assert protocol.parse_queue_pop(params) == protocol.PopParams(expected, None)


@pytest.mark.parametrize("params, ack", [
    ({"t": "a", "ack": True}, protocol.AckOptions(None, None)),
    ({"t": "a", "ack": True, "window": 1, "ack_timeout": 1}, protocol.AckOptions(1, 1.0)),
    ({"t": "a", "ack": True, "window": 10000, "ack_timeout": 3600}, protocol.AckOptions(10000, 3600.0)),
    ({"t": "a", "ack": True, "ack_timeout": 2.5}, protocol.AckOptions(None, 2.5)),
    ({"t": "a", "ack": False, "window": 5, "ack_timeout": 5}, None),
    ({"t": "a", "window": 5}, None),
])
def test_parse_queue_pop_ack_options(params, ack):
    """`ack: true` asks for acknowledgements; `window` and `ack_timeout` are None when not given, and
    change nothing without `ack`."""
    assert protocol.parse_queue_pop(params) == protocol.PopParams(["a"], ack)


@pytest.mark.parametrize("extra, field", [
    ({"ack": 1}, "p.ack"),
    ({"ack": "true"}, "p.ack"),
    ({"ack": None}, "p.ack"),
    ({"ack": True, "window": 0}, "p.window"),
    ({"ack": True, "window": 10001}, "p.window"),
    ({"ack": True, "window": 1.0}, "p.window"),
    ({"ack": True, "window": True}, "p.window"),
    ({"ack": True, "window": "5"}, "p.window"),
    ({"ack": True, "window": None}, "p.window"),
    ({"window": -1}, "p.window"),
    ({"ack": True, "ack_timeout": 0}, "p.ack_timeout"),
    ({"ack": True, "ack_timeout": 0.5}, "p.ack_timeout"),
    ({"ack": True, "ack_timeout": 3601}, "p.ack_timeout"),
    ({"ack": True, "ack_timeout": float("nan")}, "p.ack_timeout"),
    ({"ack": True, "ack_timeout": float("inf")}, "p.ack_timeout"),
    ({"ack": True, "ack_timeout": False}, "p.ack_timeout"),
    ({"ack": True, "ack_timeout": "30"}, "p.ack_timeout"),
    ({"ack_timeout": None}, "p.ack_timeout"),
])
def test_parse_queue_pop_bad_ack_options(extra, field):
    """A bad `ack`, `window` or `ack_timeout` is 101 naming it, with or without acknowledgements."""
    assert_invalid(protocol.parse_queue_pop, {"t": ["a"], **extra}, field=field)


@pytest.mark.parametrize("params, expected", [
    ({"k": []}, []),
    ({"k": ["1"]}, ["1"]),
    ({"k": ["a", "b", "a"]}, ["a", "b", "a"]),
    ({"k": ["x"] * protocol.MAX_ACK_IDS}, ["x"] * protocol.MAX_ACK_IDS),
])
def test_parse_queue_ack_good(params, expected):
    """queue.ack takes a list of delivery ids (any strings; unknown ones count 0 later)."""
    assert protocol.parse_queue_ack(params) == expected


@pytest.mark.parametrize("params, field", [
    ({}, "p.k"),
    ({"k": None}, "p.k"),
    ({"k": "1"}, "p.k"),
    ({"k": {"1": True}}, "p.k"),
    ({"k": ["1", 2]}, "p.k[1]"),
    ({"k": [None]}, "p.k[0]"),
    ({"k": [["1"]]}, "p.k[0]"),
    ({"k": ["x"] * (protocol.MAX_ACK_IDS + 1)}, "p.k"),
    (["1"], "p"),
    (None, "p"),
])
def test_parse_queue_ack_bad(params, field):
    """Not a list, not strings, or more than MAX_ACK_IDS ids: 101 naming the field."""
    assert_invalid(protocol.parse_queue_ack, params, field=field)


@pytest.mark.parametrize("data", [{"frame": {"type": "text", "data": "x/é", "finish": True}}, "plain", [1, None]])
def test_acked_event_adds_k_and_a_first(data):
    """An at-least-once consumer's event is the same event with `k` and `a` first in `p`."""
    event = protocol.queue_event(3, 12345, "topic1", data)
    acked = protocol.acked_event(event, "1f", 2)
    assert json.loads(acked) == {"e": "queue.pop", "p": {"k": "1f", "a": 2, **json.loads(event)["p"]}, "i": None}
    assert list(json.loads(acked)["p"])[:2] == ["k", "a"]
    other = json.dumps(json.loads(event)).encode()   # the same event written by someone else (spaces)
    assert json.loads(protocol.acked_event(other, "1f", 2)) == json.loads(acked)


@pytest.mark.parametrize("params, field", [
    ({}, "p.t"),
    ({"t": None}, "p.t"),
    ({"t": []}, "p.t"),
    ({"t": ""}, "p.t"),
    ({"t": 5}, "p.t"),
    ({"t": {"a": 1}}, "p.t"),
    ({"t": ["a", ""]}, "p.t[1]"),
    ({"t": ["a b"]}, "p.t[0]"),
    ({"t": ["x" * 256]}, "p.t[0]"),
    ([], "p"),
    (["ok", 3], "p[1]"),
    ([" "], "p[0]"),
    (None, "p"),
    ("topic1", "p"),
    (5, "p"),
])
def test_parse_queue_pop_bad(params, field):
    """An empty topic list, a bad topic or a non-object is 101 naming the field."""
    assert_invalid(protocol.parse_queue_pop, params, field=field)


@pytest.mark.parametrize("params, expected", [
    (None, None),
    ({}, None),
    ({"t": None}, None),
    ([], None),
    ({"t": ["a"]}, ["a"]),
    ({"t": "a"}, ["a"]),
    ({"t": ["a", "b", "a"]}, ["a", "b"]),
    (["a", "b"], ["a", "b"]),
])
def test_parse_queue_unpop_good(params, expected):
    """queue.unpop without topics means all of them; with topics, just those."""
    assert protocol.parse_queue_unpop(params) == expected


@pytest.mark.parametrize("params, field", [
    ({"t": 5}, "p.t"),
    ({"t": ["a", ""]}, "p.t[1]"),
    ({"t": ["a\x00"]}, "p.t[0]"),
    (["a", None], "p[1]"),
    ("a", "p"),
    (5, "p"),
])
def test_parse_queue_unpop_bad(params, field):
    """Bad topics in queue.unpop are 101 naming the field."""
    assert_invalid(protocol.parse_queue_unpop, params, field=field)


# --- conn.call ----------------------------------------------------------------------

CID = "1463786910324359168"


@pytest.mark.parametrize("function, args, expected", [
    ("set_context_value", ["k", 1], ["k", 1]),
    ("set_context_value", ["k", None], ["k", None]),
    ("set_context_value", ["k", {"x": [1]}], ["k", {"x": [1]}]),
    ("set_context_value", ["user id", "v"], ["user id", "v"]),
    ("set_context", [{}], [{}]),
    ("set_context", [{"a": 1, "b": None}], [{"a": 1, "b": None}]),
    ("subscribe", ["ch1"], ["ch1"]),
    ("subscribe", ["ch1", "ch2", "ch1"], ["ch1", "ch2"]),
    ("unsubscribe", ["ch1"], ["ch1"]),
    ("unsubscribe", ["never-subscribed", "x"], ["never-subscribed", "x"]),
    ("close", [], []),
    ("close", [1000], [1000]),
    ("close", [1001], [1001]),
    ("close", [1003], [1003]),
    ("close", [1007], [1007]),
    ("close", [1011], [1011]),
    ("close", [3000], [3000]),
    ("close", [4999, "bye"], [4999, "bye"]),
    ("close", [1000, ""], [1000, ""]),
    ("close", [1000, "r" * 123], [1000, "r" * 123]),
    ("close", [1000, "\u00e9" * 61], [1000, "\u00e9" * 61]),
    ("get_context", [], []),
])
def test_parse_conn_call_good(function, args, expected):
    """Every conn.call function accepts its documented arguments."""
    for client_id in (CID, int(CID)):
        parsed = protocol.parse_conn_call({"c": client_id, "f": function, "a": args})
        assert parsed == CallParams(int(CID), function, expected)


@pytest.mark.parametrize("function", ["close", "get_context"])
def test_parse_conn_call_default_args(function):
    """A missing `a` is an empty argument list."""
    assert protocol.parse_conn_call({"c": CID, "f": function}) == CallParams(int(CID), function, [])


@pytest.mark.parametrize("params, field", [
    (None, "p"),
    ([], "p"),
    ("x", "p"),
    ({}, "p.c"),
    ({"f": "close"}, "p.c"),
    ({"c": "-5", "f": "close"}, "p.c"),
    ({"c": 1.5, "f": "close"}, "p.c"),
    ({"c": CID}, "p.f"),
    ({"c": CID, "f": None}, "p.f"),
    ({"c": CID, "f": 5}, "p.f"),
    ({"c": CID, "f": ""}, "p.f"),
    ({"c": CID, "f": "bogus"}, "p.f"),
    ({"c": CID, "f": "Close"}, "p.f"),
    ({"c": CID, "f": "subscribe", "a": "ch1"}, "p.a"),
    ({"c": CID, "f": "subscribe", "a": None}, "p.a"),
    ({"c": CID, "f": "set_context", "a": {"x": 1}}, "p.a"),
    # set_context_value
    ({"c": CID, "f": "set_context_value"}, "p.a"),
    ({"c": CID, "f": "set_context_value", "a": []}, "p.a"),
    ({"c": CID, "f": "set_context_value", "a": ["k"]}, "p.a"),
    ({"c": CID, "f": "set_context_value", "a": ["k", 1, 2]}, "p.a"),
    ({"c": CID, "f": "set_context_value", "a": ["", 1]}, "p.a[0]"),
    ({"c": CID, "f": "set_context_value", "a": [1, 1]}, "p.a[0]"),
    ({"c": CID, "f": "set_context_value", "a": [None, 1]}, "p.a[0]"),
    # set_context
    ({"c": CID, "f": "set_context"}, "p.a"),
    ({"c": CID, "f": "set_context", "a": []}, "p.a"),
    ({"c": CID, "f": "set_context", "a": [[]]}, "p.a"),
    ({"c": CID, "f": "set_context", "a": [None]}, "p.a"),
    ({"c": CID, "f": "set_context", "a": ["x"]}, "p.a"),
    ({"c": CID, "f": "set_context", "a": [{}, {}]}, "p.a"),
    # subscribe / unsubscribe
    ({"c": CID, "f": "subscribe"}, "p.a"),
    ({"c": CID, "f": "subscribe", "a": []}, "p.a"),
    ({"c": CID, "f": "subscribe", "a": [""]}, "p.a[0]"),
    ({"c": CID, "f": "subscribe", "a": ["ok", "a b"]}, "p.a[1]"),
    ({"c": CID, "f": "subscribe", "a": ["ok", 5]}, "p.a[1]"),
    ({"c": CID, "f": "subscribe", "a": [["ch"]]}, "p.a[0]"),
    ({"c": CID, "f": "subscribe", "a": ["x" * 256]}, "p.a[0]"),
    ({"c": CID, "f": "unsubscribe", "a": []}, "p.a"),
    ({"c": CID, "f": "unsubscribe", "a": ["\t"]}, "p.a[0]"),
    # close
    ({"c": CID, "f": "close", "a": [1000, "r", 1]}, "p.a"),
    ({"c": CID, "f": "close", "a": [999]}, "p.a[0]"),
    ({"c": CID, "f": "close", "a": [1004]}, "p.a[0]"),
    ({"c": CID, "f": "close", "a": [1005]}, "p.a[0]"),
    ({"c": CID, "f": "close", "a": [1006]}, "p.a[0]"),
    ({"c": CID, "f": "close", "a": [1015]}, "p.a[0]"),
    ({"c": CID, "f": "close", "a": [2999]}, "p.a[0]"),
    ({"c": CID, "f": "close", "a": [5000]}, "p.a[0]"),
    ({"c": CID, "f": "close", "a": ["1000"]}, "p.a[0]"),
    ({"c": CID, "f": "close", "a": [1000.0]}, "p.a[0]"),
    ({"c": CID, "f": "close", "a": [True]}, "p.a[0]"),
    ({"c": CID, "f": "close", "a": [None]}, "p.a[0]"),
    ({"c": CID, "f": "close", "a": [1000, 5]}, "p.a[1]"),
    ({"c": CID, "f": "close", "a": [1000, None]}, "p.a[1]"),
    ({"c": CID, "f": "close", "a": [1000, "r" * 124]}, "p.a[1]"),
    ({"c": CID, "f": "close", "a": [1000, "\u00e9" * 62]}, "p.a[1]"),
    # get_context
    ({"c": CID, "f": "get_context", "a": [1]}, "p.a"),
    ({"c": CID, "f": "get_context", "a": ["k"]}, "p.a"),
])
def test_parse_conn_call_bad(params, field):
    """Unknown f and bad `a` for every function are 101 naming the field."""
    assert_invalid(protocol.parse_conn_call, params, field=field)


def test_parse_conn_call_close_reason_lone_surrogate():
    """A close reason that is not valid Unicode is 101, not a crash."""
    assert_invalid(protocol.parse_conn_call, {"c": CID, "f": "close", "a": [1000, "\ud800"]}, field="p.a[1]")


def test_call_functions_are_all_parsed():
    """Every function in CALL_FUNCTIONS has a rule for its arguments."""
    samples = {"set_context_value": ["k", 1], "set_context": [{}], "subscribe": ["c"],
               "unsubscribe": ["c"], "close": [], "get_context": []}
    assert set(samples) == set(protocol.CALL_FUNCTIONS)
    for function, args in samples.items():
        assert protocol.parse_call_args(function, args) == args


# --- WebSocket requests ---------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('{"m": "mesh.send", "p": {"c": "1", "d": "x"}, "i": 12345}', WsRequest("mesh.send", {"c": "1", "d": "x"}, 12345)),
    ('{"m": "queue.pop", "p": {"t": ["a"]}, "i": "abc"}', WsRequest("queue.pop", {"t": ["a"]}, "abc")),
    ('{"m": "queue.pop", "p": ["a"], "id": 7}', WsRequest("queue.pop", ["a"], 7)),
    ('{"m": "mesh.send", "p": {}, "id": "x-1"}', WsRequest("mesh.send", {}, "x-1")),
    ('{"m": "mesh.send", "p": {}, "i": 1, "id": 2}', WsRequest("mesh.send", {}, 1)),
    ('{"m": "queue.unpop", "p": {}}', WsRequest("queue.unpop", {}, None)),
    ('{"m": "queue.unpop"}', WsRequest("queue.unpop", {}, None)),
    ('{"m": "queue.unpop", "p": null, "i": 0}', WsRequest("queue.unpop", None, 0)),
    ('{"m": "conn.call", "p": {"c": 1}, "i": 18446744073709551615}',
     WsRequest("conn.call", {"c": 1}, MAX_ID)),
    ('{"m": "mesh.publish", "p": {"c": "a", "d": "x"}, "i": -3}', WsRequest("mesh.publish", {"c": "a", "d": "x"}, -3)),
    (b'{"m": "mesh.publish", "p": {"c": "a", "d": "x"}, "i": 1}', WsRequest("mesh.publish", {"c": "a", "d": "x"}, 1)),
])
def test_parse_ws_request_good(text, expected):
    """Requests decode with `i` (or its alias `id`) echoed unchanged; a missing id is None."""
    assert protocol.parse_ws_request(text) == expected


@pytest.mark.parametrize("method", list(protocol.METHODS))
def test_parse_ws_request_every_method(method):
    """Every documented method is accepted."""
    assert protocol.parse_ws_request(json.dumps({"m": method, "p": {}, "i": 1})).method == method


def test_methods_match_protocol():
    """The method list is exactly the one docs/protocol.md documents."""
    assert set(protocol.METHODS) == {"queue.pop", "queue.unpop", "conn.call", "mesh.send", "mesh.publish",
                                     "channel.presence", "channel.count", "queue.ack"}


@pytest.mark.parametrize("text", ["", "{", "{'m': 1}", '{"m": "mesh.send",}', "nope", b"\xff\xfe", '{"m": "x"} junk'])
def test_parse_ws_request_bad_json(text):
    """Malformed JSON is 101 with no request id."""
    with pytest.raises(ApiError) as info:
        protocol.parse_ws_request(text)
    assert info.value.code is ErrorCode.INVALID_PARAMS
    assert "JSON" in info.value.message
    assert info.value.req_id is None


@pytest.mark.parametrize("text", ["[]", "[1, 2]", '"queue.pop"', "1", "null", "true"])
def test_parse_ws_request_not_object(text):
    """A request that is not a JSON object is 101."""
    with pytest.raises(ApiError) as info:
        protocol.parse_ws_request(text)
    assert info.value.code is ErrorCode.INVALID_PARAMS
    assert info.value.req_id is None


@pytest.mark.parametrize("message, req_id", [
    ({"m": "bogus", "i": 5}, 5),
    ({"m": "queue.pop2", "id": "abc"}, "abc"),
    ({"m": "", "i": 1}, 1),
    ({"m": "QUEUE.POP", "i": 2}, 2),
    ({"i": 3}, 3),
    ({"m": None, "i": 4}, 4),
    ({"m": 5, "i": "x"}, "x"),
    ({"m": ["queue.pop"]}, None),
])
def test_parse_ws_request_bad_method(message, req_id):
    """An unknown or missing method is 101 naming m, with the request id kept for the reply."""
    error = assert_invalid(protocol.parse_ws_request, json.dumps(message), field="m")
    assert error.req_id == req_id


@pytest.mark.parametrize("req_id", [1.5, True, False, [1], {"a": 1}])
def test_parse_ws_request_bad_id(req_id):
    """An id that is neither an integer nor a string is 101 naming i."""
    assert_invalid(protocol.parse_ws_request, json.dumps({"m": "queue.pop", "p": {}, "i": req_id}), field="i")
    assert_invalid(protocol.parse_ws_request, json.dumps({"m": "queue.pop", "p": {}, "id": req_id}), field="i")


# --- HTTP bodies ------------------------------------------------------------------------

@pytest.mark.parametrize("body, expected", [
    (b'{"c": "1", "d": "x"}', {"c": "1", "d": "x"}),
    (b"{}", {}),
    (b' {"a": [1]} ', {"a": [1]}),
    ('{"u": "\u00e9"}'.encode("utf-8"), {"u": "\u00e9"}),
])
def test_parse_http_body_good(body, expected):
    """An HTTP body that is a JSON object decodes to a dict."""
    assert protocol.parse_http_body(body) == expected


@pytest.mark.parametrize("body", [b"", b"[]", b"[{}]", b'"x"', b"1", b"null", b"true"])
def test_parse_http_body_not_object(body):
    """An empty body or one that is not a JSON object is 101 naming body."""
    assert_invalid(protocol.parse_http_body, body, field="body")


@pytest.mark.parametrize("body", [b"{", b"{'c': 1}", b"c=1&d=2", b"\xff", b'{"c": "\xff"}', b'{"a": 1}}'])
def test_parse_http_body_bad_json(body):
    """A body that is not JSON (or not UTF-8) is 101 naming body."""
    assert_invalid(protocol.parse_http_body, body, field="body")


# --- envelopes ---------------------------------------------------------------------------

@pytest.mark.parametrize("result", [{"s": True}, {"s": 9, "f": 0}, {"s": True, "d": {"k": [1, None]}}, None])
def test_ok_body_http(result):
    """An HTTP success is exactly {"E": null, "r": result}."""
    assert json.loads(protocol.ok_body(result)) == {"E": None, "r": result}


@pytest.mark.parametrize("req_id", [12345, "abc", None, 0, MAX_ID])
def test_ok_body_ws(req_id):
    """A WebSocket success also carries `i`, echoed unchanged."""
    assert json.loads(protocol.ok_body({"s": True}, req_id, ws=True)) == {"E": None, "r": {"s": True}, "i": req_id}


def test_ok_body_http_ignores_id():
    """An HTTP success never carries `i`."""
    assert "i" not in json.loads(protocol.ok_body({"s": True}, 5))


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_body_http(code):
    """An HTTP error is {"E": {"c": code, "m": message}} with no `r` and no `i`."""
    body = json.loads(protocol.error_body(code, "p.c: bad", req_id=7))
    assert body == {"E": {"c": int(code), "m": "p.c: bad"}}


@pytest.mark.parametrize("req_id", [12345, "abc", None])
def test_error_body_ws(req_id):
    """A WebSocket error also carries `i` and still no `r`."""
    body = json.loads(protocol.error_body(ErrorCode.SEND_FAILED, "p.c: not connected", req_id, ws=True))
    assert body == {"E": {"c": 401, "m": "p.c: not connected"}, "i": req_id}


def test_error_body_code_is_number():
    """The error code is written as a JSON number."""
    assert '"c":101' in protocol.error_body(ErrorCode.INVALID_PARAMS, "x").replace(" ", "")


def test_envelopes_keep_unicode():
    """Non-ASCII results and messages round-trip through the envelopes."""
    assert json.loads(protocol.ok_body({"d": "\u9891\u9053"}))["r"]["d"] == "\u9891\u9053"
    assert json.loads(protocol.error_body(101, "p.c: \u00e9"))["E"]["m"] == "p.c: \u00e9"


# --- events and frames ---------------------------------------------------------------------

@pytest.mark.parametrize("client_id", [1, 1463819408261513216, MAX_ID, 2 ** 53 + 1])
def test_queue_event_shape(client_id):
    """A queue.pop event carries n as a number, c as a decimal string, t, d and `i: null`."""
    data = {"frame": {"type": "text", "data": "json str", "finish": True}}
    raw = protocol.queue_event(1, client_id, "topic1", data)
    assert isinstance(raw, bytes)
    event = json.loads(raw)
    assert event == {"e": "queue.pop", "p": {"n": 1, "c": str(client_id), "t": "topic1", "d": data}, "i": None}
    assert f'"c":"{client_id}"' in raw.decode("utf-8").replace(" ", "")


def test_queue_event_unicode():
    """Non-ASCII topic and data survive the event encoding as UTF-8."""
    event = json.loads(protocol.queue_event(3, 9, "\u9891", {"frame": {"data": "\u00e9"}}).decode("utf-8"))
    assert event["p"]["t"] == "\u9891"
    assert event["p"]["d"] == {"frame": {"data": "\u00e9"}}


@pytest.mark.parametrize("message, expected", [
    ("hello", {"type": "text", "data": "hello", "finish": True}),
    ("", {"type": "text", "data": "", "finish": True}),
    (b"a", {"type": "binary", "data": "YQ==", "finish": True}),
    (b"ab", {"type": "binary", "data": "YWI=", "finish": True}),
    (b"\x00\xff\xfe", {"type": "binary", "data": "AP/+", "finish": True}),
    (b"", {"type": "binary", "data": "", "finish": True}),
])
def test_client_frame(message, expected):
    """Client messages become frames; binary data is standard base64 with padding."""
    assert protocol.client_frame(message) == expected


def test_client_frame_long_binary_has_no_newlines():
    """Base64 of a long binary message is one line."""
    raw = bytes(range(256)) * 40
    frame = protocol.client_frame(raw)
    assert "\n" not in frame["data"]
    assert base64.b64decode(frame["data"], validate=True) == raw


@pytest.mark.parametrize("length, header_len, marker", [
    (0, 2, 0),
    (1, 2, 1),
    (125, 2, 125),
    (126, 4, 126),
    (127, 4, 126),
    (65535, 4, 126),
    (65536, 10, 127),
    (70000, 10, 127),
])
@pytest.mark.parametrize("binary, opcode", [(False, 0x81), (True, 0x82)])
def test_encode_ws_frame(length, header_len, marker, binary, opcode):
    """Frames are FIN + opcode, unmasked, with the RFC 6455 length encodings at 125/126/65535/65536."""
    data = bytes((index * 7) & 0xFF for index in range(length))
    frame = protocol.encode_ws_frame(data, binary=binary)
    assert len(frame) == header_len + length
    assert frame[0] == opcode
    assert frame[1] & 0x80 == 0
    assert frame[1] & 0x7F == marker
    if header_len == 4:
        assert struct.unpack("!H", frame[2:4])[0] == length
    elif header_len == 10:
        assert struct.unpack("!Q", frame[2:10])[0] == length
    assert frame[header_len:] == data


@pytest.mark.parametrize("member, value", [
    ("NORMAL", 1000), ("GOING_AWAY", 1001), ("POLICY_VIOLATION", 1008),
    ("MESSAGE_TOO_BIG", 1009), ("INTERNAL_ERROR", 1011),
])
def test_close_codes(member, value):
    """Close codes have their RFC 6455 values."""
    assert protocol.CloseCode[member] == value


@pytest.mark.parametrize("text, req_id", [
    ('{"m": "mesh.send", "p": {"c": "1", "d": "\\ud800"}, "i": 5}', 5),
    ('{"m": "mesh.send", "p": {"c": "1", "d": "\\udfff"}, "id": "abc"}', "abc"),
    ('{"m": "mesh.send", "p": {}, "i": "\\ud800"}', None),
])
def test_a_lone_surrogate_is_101_answered_with_the_request_id(text, req_id):
    """A request holding a lone surrogate escape is 101 with its own id (None only when the id is the surrogate)."""
    with pytest.raises(ApiError) as info:
        protocol.parse_ws_request(text)
    assert info.value.code is ErrorCode.INVALID_PARAMS and "surrogate" in info.value.message
    assert info.value.req_id == req_id


def test_infinity_next_to_a_surrogate_escape_is_still_101():
    """A request holding Infinity and a \\ud escape (found by a property test) is 101, never another error."""
    with pytest.raises(ApiError) as info:
        protocol.parse_ws_request('{"m": "mesh.send", "p": {"c": "1", "d": {"\\ud800": Infinity}}, "i": 3}')
    assert info.value.code is ErrorCode.INVALID_PARAMS and info.value.req_id == 3
    assert protocol.parse_ws_request('{"m": "mesh.send", "p": {"d": {"\\ud83d\\ude00": Infinity}}, "i": 4}').req_id == 4


@pytest.mark.parametrize("function, args, field", [
    ("set_context_value", ["k", float("nan")], "p.a[1]"),
    ("set_context_value", ["k", {"deep": [float("inf")]}], "p.a[1]"),
    ("set_context", [{"k": float("-inf")}], "p.a[0]"),
    ("set_context_value", ["k", "\ud800"], "p.a[1]"),
])
def test_context_values_json_cannot_carry_are_101(function, args, field):
    """A context value holding NaN, Infinity or a lone surrogate is refused 101 naming the argument."""
    error = assert_invalid(protocol.parse_call_args, function, args, field=field)
    assert "NaN" in error.message or "surrogate" in error.message


def test_json_text_writes_as_the_protocol_says():
    """The options given by position mean what they say: UTF-8 and `/` and `<` as they are, keys in
    their order, no spaces; NaN, Infinity and bytes refused."""
    assert protocol.json_text({"b": "a/b <i> \u9891", "a": [1, 1.5, None, True]}) == \
        '{"b":"a/b <i> \u9891","a":[1,1.5,null,true]}'
    for value in (float("nan"), float("inf"), [float("-inf")]):
        with pytest.raises(OverflowError):
            protocol.json_text(value)
    with pytest.raises(TypeError):
        protocol.json_text({"d": b"raw"})


_JSON_TEXTS = [
    '{"m":"mesh.send","p":{"c":"1463786910324359168","d":"hi"},"i":7}', '{"a":1,"a":2}', "[]", "{}", '""',
    "[18446744073709551615, 18446744073709551616, -9223372036854775809, 123456789012345678901234567890]",
    "[0.1, -0.0, 1E2, 1.5e300, 1e-320, 5e-324, 1.7976931348623157e308]", "[1e400]", "[-1e400]",
    '"\\ud83d\\ude00 \\u00e9 \\u9891 \\u0000 \\/ \\b\\f\\n\\r\\t \\\\"', '"\\ud800"', '"\\udc00x"', '{"\\ud800": 1}',
    '"a\x01b"', "[NaN]", "[Infinity]", "[-Infinity]", '  {"a" : [ 1 , 2 ] }  ', '{"a":1} x', "[1,]", "{'a': 1}",
    "[" * 500 + "]" * 500, "[" * 1025 + "]" * 1025, "[" * 5000 + "]" * 5000, "", "nul", "[true, false, null]",
    '{"d": "h\u00e9llo \u9891\u9053 \U0001F600"}', "01", "-", "[1.]", "[.5]", "1" * 400,
]


@pytest.mark.parametrize("text", _JSON_TEXTS, ids=range(len(_JSON_TEXTS)))
@pytest.mark.parametrize("as_bytes", [False, True])
def test_json_loads_reads_what_ujson_reads(text, as_bytes):
    """The same value as ujson.loads, or the same refusal, for text or UTF-8 bytes: integers exact,
    -0.0 kept, what strict JSON refuses still ujson's (a lone surrogate, NaN, a raw control character)."""
    given = text.encode("utf-8") if as_bytes else text

    def read(loads):
        try:
            return ("value", repr(loads(given)))
        except (ValueError, TypeError, OverflowError) as exc:
            return ("refused", type(exc).__name__)
    assert read(protocol.json_loads) == read(ujson.loads)


def test_json_loads_refuses_what_is_nested_deeper_than_ujson_reads():
    """Deeper than ujson's 1,024 levels is refused even where msgspec would go deeper (a higher
    recursion limit, as Python 3.12's C recursion limit allows): ujson decides, and a request with
    it is a 101, not an error from inside the reader."""
    import sys
    deep = "[" * 1100 + "]" * 1100
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)
    try:
        for given in (deep, deep.encode()):
            with pytest.raises(ValueError):
                protocol.json_loads(given)
        request = '{"m":"mesh.send","i":1,"p":{"c":"1","d":"\\ud83d\\ude00","x":%s}}' % deep
        assert_invalid(protocol.parse_ws_request, request, field="request")
        assert_invalid(protocol.parse_http_body, request.encode(), field="body")
    finally:
        sys.setrecursionlimit(limit)
    assert protocol.json_loads("[" * 1024 + "]" * 1024) is not None   # as deep as ujson goes: read
