"""The C versions of cluster/_speedups.c do what the Python functions they stand for do.

Each C function is compared with its Python version on the same inputs, the
common case and every other (random bytes and JSON, each boundary of each
length field, what the Python code refuses): the same value, or the same
error with the same code and message. The C code hands what is not the
common case back to the Python function, so a difference here is a bug in
the C code. Without the compiled module these tests are skipped (and
`test_built_where_a_compiler_is` fails if a compiler was there to build it).
"""

import asyncio
import decimal
import json
import os
import random
import shutil
import socket
import struct
from functools import partial

import pytest
import tornado.iostream
from hypothesis import HealthCheck, given, settings, strategies as st
from tornado.util import _websocket_mask

from cluster import mesh, protocol, speedups
from cluster.protocol import ApiError, ErrorCode
from conftest import Cluster, StreamConn, read_available, running, wait_until
from node import api_fast, client_protocol, clients, metrics

native = speedups.native
needs_native = pytest.mark.skipif(native is None, reason="cluster._speedups is not built here (no C compiler when "
                                                          "the package was installed, or MESHGATE_NO_SPEEDUPS=1)")
SETTINGS = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_built_where_a_compiler_is():
    """`make install` builds the module wherever a C compiler is; it is off only when asked."""
    if speedups.turned_off:
        assert native is None and speedups.describe() == "no C speedups (MESHGATE_NO_SPEEDUPS)"
        return
    if shutil.which("cc") or shutil.which("gcc"):
        assert native is not None, "a C compiler is here but cluster._speedups is not built: pip install -e ."


def _outcome(call, *args):
    """What a call gives: ("ok", the value's repr (NaN is not equal to itself), its type) or ("error",
    type, code, message, req_id)."""
    try:
        value = call(*args)
    except ApiError as exc:
        return ("error", ApiError, exc.code, exc.message, exc.req_id)
    except Exception as exc:   # the same exception type and text, whatever it is
        return ("error", type(exc), None, str(exc), None)
    return ("ok", repr(value), type(value))


# --- the frame reader (node/client_protocol.py, text_frame) --------------------------------------------------

def _frame(payload: bytes, first: int = 0x81, mask: bytes = b"\x01\x02\x03\x04", length_form: str = "auto") -> bytes:
    length = len(payload)
    if length_form == "short" or (length_form == "auto" and length < 126):
        head = bytes((first, 0x80 | length))
    elif length_form == "16" or (length_form == "auto" and length <= 0xFFFF):
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", length)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", length)
    return head + mask + (_websocket_mask(mask, payload) if payload else b"")


def _same_frame(data: bytes, pos: int, max_size: int) -> None:
    data = bytearray(data)
    assert native.text_frame(data, pos, max_size) == client_protocol.text_frame(data, pos, max_size)


@needs_native
@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 7, 125, 126, 127, 511, 512, 513, 1000, 65535])
def test_text_frame_every_length_form(length):
    payload = ("é" * length).encode("utf-8")[:length].decode("utf-8", "ignore").encode("utf-8")
    frame = _frame(payload, mask=os.urandom(4))
    data = b"xy" + frame + _frame(b"next")
    for pos in (0, 1, 2, 3):
        for max_size in (0, len(payload) - 1, len(payload), 1 << 20):
            _same_frame(data, pos, max_size)
    assert native.text_frame(bytearray(data), 2, 1 << 20) == (2 + len(frame), payload.decode("utf-8"))
    for cut in (1, 2, 5, len(frame) - 1):   # not whole yet
        _same_frame(frame[:cut], 0, 1 << 20)


@needs_native
@pytest.mark.parametrize("first", [0x01, 0x80, 0x82, 0x88, 0x89, 0x8A, 0x91, 0xC1, 0xF1])
def test_text_frame_leaves_other_frames(first):
    frame = _frame(b"hello", first=first)
    assert native.text_frame(bytearray(frame), 0, 100) is None
    _same_frame(frame, 0, 100)


@needs_native
def test_text_frame_unmasked_long_forms_and_bad_text():
    for frame in (b"\x81\x05hello", _frame(b"x" * 200, length_form="64"), _frame(b"x" * 70000),
                  _frame(b"\xff\xfe"), _frame(b"\xed\xa0\x80"), _frame(b"ok \xc3"), _frame("日本".encode()),
                  _frame(b"\x00\x7f"), _frame(b"x" * 10, length_form="16")):
        _same_frame(frame, 0, 1 << 20)
    assert native.text_frame(bytearray(_frame(b"\xff")), 0, 10) == (7, None)   # not UTF-8: read, refused
    frame = bytearray(_frame(b"abc"))
    for data, pos, max_size in ((frame, -9, 10), (frame, -1, 10), (frame, 2 ** 70, 10), (frame, len(frame), 10),
                                (frame, 0, -1), (frame, 0, 2 ** 70), (frame, True, 10), (bytes(frame), 0, 10),
                                (memoryview(frame), 0, 10), ("not bytes", 0, 10), (None, 0, 10)):
        assert _outcome(native.text_frame, data, pos, max_size) == _outcome(client_protocol.text_frame, data, pos,
                                                                              max_size)


@needs_native
@SETTINGS
@given(st.binary(max_size=300), st.integers(0, 8), st.integers(0, 400))
def test_text_frame_any_bytes(data, pos, max_size):
    _same_frame(data, pos, max_size)
    _same_frame(b"\x81" + data, 0, max_size)


@needs_native
@SETTINGS
@given(st.text(max_size=300) | st.binary(max_size=300), st.binary(min_size=4, max_size=4), st.integers(0, 400))
def test_text_frame_any_payload(payload, mask, max_size):
    payload = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    _same_frame(_frame(payload, mask=mask) + b"\x81", 0, max_size)


# --- frames out (cluster/protocol.py, encode_ws_frame) ---------------------------------------------------------

@needs_native
@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_encode_ws_frame(length):
    data = os.urandom(length)
    for binary in (False, True, 0, 1, None):
        assert native.encode_ws_frame(data, binary) == protocol.encode_ws_frame_python(data, binary)
    assert native.encode_ws_frame(data) == protocol.encode_ws_frame_python(data)
    assert native.encode_ws_frame(data, binary=True) == protocol.encode_ws_frame_python(data, binary=True)
    for wrong in ({"bin": True}, {"binary": True, "data": data}):
        with pytest.raises(TypeError):
            native.encode_ws_frame(data, **wrong)
    assert protocol.encode_ws_frame is native.encode_ws_frame
    for odd in ("text", None, bytearray(data), memoryview(data)):
        assert _outcome(native.encode_ws_frame, odd) == _outcome(protocol.encode_ws_frame_python, odd)
    assert native.encode_ws_frame(data=data) == protocol.encode_ws_frame_python(data=data)


# --- /ws/v1 requests and mesh.send's parameters (cluster/protocol.py) -------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["", "\ud800", "mesh.send", "queue.pop", "1463786910324359168", "0", "00012",
                              "12345678901234567890", "1234567890123456789", "١٢٣", "text", "binary", "AAEC"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(["c", "d", "t", "x"]) | st.text(max_size=4), inner,
                                        max_size=4), max_leaves=15)
params = st.dictionaries(st.sampled_from(["c", "d", "t", "x"]), values, max_size=4)
requests = st.fixed_dictionaries({}, optional={
    "m": st.sampled_from(list(protocol.METHODS)) | scalars, "p": params | values, "i": scalars, "id": scalars,
    "x": values})


def _text(value) -> str:
    return json.dumps(value, allow_nan=True, ensure_ascii=random.random() < 0.5)


@needs_native
@SETTINGS
@given(requests)
def test_parse_ws_request_any_request(request):
    text = _text(request)
    assert _outcome(native.parse_ws_request, text) == _outcome(protocol.parse_ws_request_python, text)


@needs_native
@SETTINGS
@given(st.text(max_size=80) | st.binary(max_size=80))
def test_parse_ws_request_any_text(text):
    assert _outcome(native.parse_ws_request, text) == _outcome(protocol.parse_ws_request_python, text)


@needs_native
@pytest.mark.parametrize("text", [
    '{"m":"mesh.send","p":{"c":"1","d":"x"},"i":1}', '{"m":"mesh.send","p":{"c":"1","d":"x"},"i":"a"}',
    '{"m":"mesh.send","p":{"c":"1","d":"x"},"id":7}', '{"m":"mesh.send","i":null,"id":7}', '{"m":"channel.count"}',
    '{"m":"mesh.send","i":true}', '{"m":"mesh.send","i":1.5}', '{"m":"mesh.sendx"}', '{"m":5}', '{}', '[]', '5',
    '{"m":"mesh.send","p":"\\ud800"}', '{"m":"mesh.send","p":"\\uD83D\\uDE00"}', '{"m":"mesh.send","p":"\\\\ud"}',
    '{"m":"mesh.send","p":NaN}', '{"m":"mesh.send","p":"a\x01b"}', '{"m":"mesh.send","m":"queue.pop"}',
    '{"m":"mesh.send","i":123456789012345678901234567890}', '{bad', '', ' {"m":"queue.pop"} ',
    '{"m":"mesh.send","p":' + "[" * 1100 + "]" * 1100 + "}", '{"m":"mesh.send","p":"' + "[" * 1100 + '"}',
    '{"m":"mesh.send","p":' + "[" * 900 + "]" * 900 + "}", '{"m":"mesh.send","i":"\\ud800"}',
])
def test_parse_ws_request_each_case(text):
    assert _outcome(native.parse_ws_request, text) == _outcome(protocol.parse_ws_request_python, text)
    assert _outcome(native.parse_ws_request, text.encode("utf-8")) == \
        _outcome(protocol.parse_ws_request_python, text.encode("utf-8"))


@needs_native
def test_parse_ws_request_result_type():
    request = native.parse_ws_request('{"m":"mesh.send","p":{"c":"1","d":"x"},"i":3}')
    assert type(request) is protocol.WsRequest and request.method == "mesh.send" and request.req_id == 3
    assert native.parse_ws_request('{"m":"queue.pop"}') == ("queue.pop", {}, None)
    assert protocol.parse_ws_request is native.parse_ws_request and protocol.parse_send is native.parse_send


@needs_native
@SETTINGS
@given(params | values, st.sampled_from(["p.", ""]))
def test_parse_send_any_parameters(value, prefix):
    assert _outcome(native.parse_send, value, prefix) == _outcome(protocol.parse_send_python, value, prefix)


@needs_native
@pytest.mark.parametrize("value", [
    {"c": "1", "d": "x"}, {"c": "0", "d": ""}, {"c": "00012", "d": "é"}, {"c": "1234567890123456789", "d": "x"},
    {"c": "12345678901234567890", "d": "x"}, {"c": "18446744073709551615", "d": "x"}, {"c": "", "d": "x"},
    {"c": "١٢٣", "d": "x"}, {"c": "12a", "d": "x"}, {"c": 12, "d": "x"}, {"c": True, "d": "x"}, {"c": "1"},
    {"d": "x"}, {"c": "1", "d": "\ud800"}, {"c": "1", "d": "x", "t": "text"}, {"c": "1", "d": "AAEC", "t": "binary"},
    {"c": "1", "d": "x", "t": "other"}, {"c": "1", "d": "x", "t": None}, {"c": "1", "d": {"a": 1}},
    {"c": "1", "d": [1, float("nan")]}, {"c": "1", "d": 5}, {"c": "-1", "d": "x"}, {"c": " 1", "d": "x"}, [], "x",
    {"c": "1:", "d": "x"}, {"c": "/", "d": "x"},
])
def test_parse_send_each_case(value):
    _same_params(native.parse_send, protocol.parse_send_python, value)


def _same_params(fast, python, value) -> None:
    """`fast(value, ...)` is `python(value, ...)` with each prefix, none, and the prefix by keyword."""
    for prefix in ("p.", ""):
        assert _outcome(fast, value, prefix) == _outcome(python, value, prefix)
    assert _outcome(fast, value) == _outcome(python, value)
    assert _outcome(partial(fast, prefix=""), value) == _outcome(partial(python, prefix=""), value)


@needs_native
def test_parse_send_result_types():
    params = native.parse_send({"c": "42", "d": "hé"}, "p.")
    assert type(params) is protocol.SendParams and type(params.payload) is protocol.Payload
    assert params == (42, (b"h\xc3\xa9", False))


# --- HTTP bodies and mesh.publish's parameters (cluster/protocol.py) ------------------------------------------

names = st.sampled_from(["bench", "a", "x" * 255, "x" * 256, "", "a b", "a\tb", "a\x7fb", "a\x1fb", "!~", "é", "a\x85",
                         "\ud800"])
publish_params = st.dictionaries(st.sampled_from(["c", "d", "t", "x"]), names | values, max_size=4)


@needs_native
@SETTINGS
@given(publish_params | values, st.sampled_from(["p.", ""]))
def test_parse_publish_any_parameters(value, prefix):
    assert _outcome(native.parse_publish, value, prefix) == _outcome(protocol.parse_publish_python, value, prefix)


@needs_native
@pytest.mark.parametrize("value", [
    {"c": "bench", "d": "x"}, {"c": "!", "d": ""}, {"c": "~" * 255, "d": "é"}, {"c": "x" * 256, "d": "x"},
    {"c": "", "d": "x"}, {"c": " a", "d": "x"}, {"c": "a\x7f", "d": "x"}, {"c": "a\x00", "d": "x"}, {"c": "é", "d": "x"},
    {"c": ["a", "b", "a"], "d": "x"}, {"c": [], "d": "x"}, {"c": 5, "d": "x"}, {"c": "a"}, {"d": "x"},
    {"c": "a", "d": "\ud800"}, {"c": "a", "d": "x", "t": "text"}, {"c": "a", "d": "AAEC", "t": "binary"},
    {"c": "a", "d": "x", "t": "other"}, {"c": "a", "d": "x", "t": None}, {"c": "a", "d": {"k": [1]}},
    {"c": "a", "d": 5}, [], "x", None,
])
def test_parse_publish_each_case(value):
    _same_params(native.parse_publish, protocol.parse_publish_python, value)


@needs_native
def test_parse_publish_result_types():
    params = native.parse_publish({"c": "news", "d": "hé"}, "")
    assert type(params) is protocol.PublishParams and type(params.payload) is protocol.Payload
    assert type(params.channels) is list and params == (["news"], (b"h\xc3\xa9", False))
    assert protocol.parse_publish is native.parse_publish and protocol.parse_http_body is native.parse_http_body


@needs_native
@SETTINGS
@given(requests | values)
def test_parse_http_body_any_json(value):
    body = _text(value).encode("utf-8", "surrogatepass")
    assert _outcome(native.parse_http_body, body) == _outcome(protocol.parse_http_body_python, body)


@needs_native
@SETTINGS
@given(st.binary(max_size=80))
def test_parse_http_body_any_bytes(body):
    assert _outcome(native.parse_http_body, body) == _outcome(protocol.parse_http_body_python, body)


@needs_native
@pytest.mark.parametrize("body", [
    b'{"c":"a","d":"x"}', b"{}", b"[]", b"5", b"", b" ", b"{bad", b'{"d":NaN}', b'{"d":"\\ud800"}', b'{"d":"\\uD83D\\uDE00"}',
    b'{"d":"\\\\ud"}', b'{"d":"\xed\xa0\x80"}', b'{"d":"\xff"}', b'{"d":"a\x01b"}', b'{"d":"\xc3\xa9"}',
    b'{"a":1,"a":2}', b'{"d":' + b"[" * 1100 + b"]" * 1100 + b"}", b'{"d":"' + b"[" * 1100 + b'"}',
    b'{"d":' + b"[" * 900 + b"]" * 900 + b"}", b'{"d":123456789012345678901234567890}', bytearray(b"{}"),
    memoryview(b"{}"), "{}",
])
def test_parse_http_body_each_case(body):
    """Strict JSON, what only ujson reads (NaN, a raw control character), a lone surrogate escaped and as
    UTF-8 bytes, nesting either side of ujson's depth (and brackets in a string), a repeated key."""
    assert _outcome(native.parse_http_body, body) == _outcome(protocol.parse_http_body_python, body)


# --- durations (node/metrics.py, observe) and mesh frames (cluster/mesh.py, request_frame) -------------------

# --- the API port's request heads (node/api_fast.py, _head) ---------------------------------------------------

_LINES = ["POST /v1/mesh/publish HTTP/1.1", "POST /v1/mesh/send HTTP/1.1", "POST /v1/mesh/publish HTTP/1.0",
          "GET /v1/mesh/publish HTTP/1.1", "POST /v1/mesh/publish?x HTTP/1.1", "post /v1/mesh/send HTTP/1.1"]
_NAMES = ["Host", "host", "Content-Length", "CONTENT-LENGTH", "content-length ", " Content-Length", "Content-Type",
          "Connection", "Transfer-Encoding", "Expect", "Upgrade", "Authorization", "Origin", "X-\xe9", "X-\xc9",
          "X\tY", "", "\x00", "upgradE"]
_VALUES = ["", " ", "12", " 12 ", "1:", "/9", "\t7\t", "\xb2", "1" * 18, "1" * 19, "1" * 5000, "+1", "1 2", "0x10", "007",
           "application/json", "APPLICATION/JSON; charset=utf-8", " application/json ;", "application/json\x1f",
           "\x85application/json", "application/jsonx", "text/plain", "application/json\x0b", "keep-alive",
           "Keep-Alive", "close", "CLOSE", "upgrade", "close, keep-alive", "\xe9t\xe9", "a:b", "\r", "x\ny"]
header_lines = st.builds(lambda name, value: name + ":" + value, st.sampled_from(_NAMES), st.sampled_from(_VALUES))
heads = st.builds(lambda line, headers, tail: "\r\n".join([line] + headers).encode("latin-1") + tail,
                  st.sampled_from(_LINES), st.lists(header_lines, max_size=6),
                  st.sampled_from([b"", b"\r\n", b"\r", b"\n", b"\r\nx", b"\r\n:"]))


@needs_native
@SETTINGS
@given(heads)
def test_parse_head_any_head(head):
    assert _outcome(native.parse_head, head) == _outcome(api_fast.head_python, head)


@needs_native
@SETTINGS
@given(st.binary(max_size=200))
def test_parse_head_any_bytes(data):
    head = b"POST /v1/mesh/send HTTP/1.1\r\nContent-Length: 2\r\n" + data
    assert _outcome(native.parse_head, head) == _outcome(api_fast.head_python, head)
    assert _outcome(native.parse_head, data) == _outcome(api_fast.head_python, data)


@needs_native
@pytest.mark.parametrize("head", [
    b"POST /v1/mesh/publish HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Length: 120",
    b"POST /v1/mesh/send HTTP/1.1\r\nContent-Length:0\r\nConnection: Close",
    b"POST /v1/mesh/send HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3",
    b"POST /v1/mesh/send HTTP/1.1\r\nContent-Length: 1:", b"POST /v1/mesh/send HTTP/1.1\r\nContent-Length: /",
    b"POST /v1/mesh/send HTTP/1.1\r\nContent-Length: 3\r\nX-\xc9: 1",
    b"POST /v1/mesh/send HTTP/1.1\r\nContent-Length: 3\r\nContent-Type: application/json\xa0",
    b"POST /v1/mesh/send HTTP/1.1\r\nContent-Length: 3\r\n",
    b"POST /v1/mesh/send HTTP/1.1", b"", bytearray(b"POST /v1/mesh/send HTTP/1.1\r\nContent-Length: 3"),
])
def test_parse_head_each_case(head):
    """The common case, a duplicate in another case, the characters either side of the digits, a Latin-1 name and a Content-Type whose no-break space str.strip
    strips (both left to Python), a trailing empty line, no headers at all, a bytearray."""
    assert _outcome(native.parse_head, head) == _outcome(api_fast.head_python, head)


@needs_native
def test_parse_head_is_the_one_in_use():
    assert api_fast._head is native.parse_head
    method, headers, length, close = native.parse_head(b"POST /v1/mesh/publish HTTP/1.1\r\nContent-Length: 9")
    assert (method, headers, length, close) == ("mesh.publish", {"content-length": "9"}, 9, False)
    assert type(headers) is dict and type(length) is int


@needs_native
def test_observe_as_python_does():
    durations = [0.0, 0.0004, 0.0005, 0.00050001, 0.003, 1.0, 9.99, 10.0, 10.5, 1e9, -1.0, 0, 1, True]
    durations += [random.random() * random.choice((0.001, 0.1, 20)) for _ in range(2000)]
    native_series, python_series = {}, {}
    for index, seconds in enumerate(durations):
        labels = ("mesh.send", index % 3)
        native.observe(native_series, labels, seconds)
        metrics.observe_python(python_series, labels, seconds)
    assert native_series == python_series
    nan_native, nan_python = {}, {}
    native.observe(nan_native, (), float("nan"))
    metrics.observe_python(nan_python, (), float("nan"))
    assert nan_native[()][1:] == nan_python[()][1:]   # the same bucket (NaN is not equal to itself)
    class Series(dict):
        pass
    for series, seconds in (({}, "slow"), ({}, None), ({}, 2 ** 1100), ({}, decimal.Decimal("0.1")), ({}, 3),
                            ({}, True), ([], 1.0), (Series(), 0.2)):
        python_series = type(series)(series) if isinstance(series, dict) else series
        assert _outcome(native.observe, series, ("x",), seconds) == \
            _outcome(metrics.observe_python, python_series, ("x",), seconds)
        assert series == python_series   # the same series made, even when it then failed
    timings, expected = metrics.Timings(), {}
    for seconds in (0.002, 0.5, 30.0):
        timings.observe(("a",), seconds)
        metrics.observe_python(expected, ("a",), seconds)
    assert timings.series == expected and expected[("a",)][1:] == [0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]


@needs_native
@SETTINGS
@given(st.integers(0, 255), st.integers(0, 2 ** 64 - 1), st.binary(max_size=60), st.binary(max_size=60))
def test_request_frame(code, request_id, head, body):
    assert native.request_frame(code, request_id, head, body) == mesh.request_frame_python(code, request_id, head, body)


@needs_native
def test_request_frame_refuses_what_struct_refuses():
    for args in ((256, 1, b"", b""), (-1, 1, b"", b""), (1, 2 ** 64, b"", b""), (1, -1, b"", b""), (1.0, 1, b"", b""),
                 (1, 1, "head", b""), (1, 1, bytearray(b"h"), memoryview(b"b")), (True, 1, b"", b"")):
        assert _outcome(native.request_frame, *args) == _outcome(mesh.request_frame_python, *args)
    message = mesh.send_request(5, b"frame")
    assert mesh.request_frame(message, 9) == mesh.frame_request(message, 9)[0] == \
        mesh.request_frame_python(1, 9, message.head, message.body)


# --- a cluster with and without them -------------------------------------------------------------------------

@pytest.mark.parametrize("turned_off", [True, False], ids=["python", "c"])
def test_a_cluster_serves_the_same_with_or_without_them(tmp_path, turned_off):
    """Pipelined /ws/v1 requests, local and cross-node, good and bad, in one burst: the same replies
    with the Python versions (MESHGATE_NO_SPEEDUPS=1) and the C ones; each node says which it runs."""
    if not turned_off and native is None:
        pytest.skip("cluster._speedups is not built here")
    cluster = Cluster(tmp_path, workers=2)
    env = {key: value for key, value in os.environ.items() if key != "MESHGATE_NO_SPEEDUPS"}
    cluster.start_options = {"env": {**env, "MESHGATE_NO_SPEEDUPS": "1"} if turned_off else env}
    expected = "no C speedups (MESHGATE_NO_SPEEDUPS)" if turned_off else "C speedups"
    with running(cluster):
        wait_until(lambda: cluster.logs().count(f", {expected}\n") == 2, what=f"both nodes ready with {expected}")
        clients = cluster.clients(2, nodes=2)
        api = cluster.api()
        requests = []
        for index in range(200):
            client = clients[index % len(clients)]
            requests.append(json.dumps({"m": "mesh.send", "p": {"c": str(client.client_id), "d": f"m{index}"},
                                        "i": index}))
        requests += ['{"m":"mesh.send","p":{"c":"x","d":"y"},"i":"bad-id"}', '{"m":"mesh.send","i":true}',
                     '{"m":"mesh.sendx","i":"unknown"}', '{bad',
                     '{"m":"mesh.send","p":{"c":"1","d":"\\ud800"},"i":"surrogate"}',
                     json.dumps({"m": "mesh.send", "p": {"c": clients[0].client_id, "d": "é"}, "i": "int-id"})]
        for request in requests:
            api.send_raw(request)
        replies = [api.read() for _ in requests]
        by_id = {reply.get("i"): reply for reply in replies}
        assert [by_id[index] for index in range(200)] == [{"E": None, "r": {"s": True}, "i": index} for index in range(200)]
        assert by_id["bad-id"]["E"]["c"] == ErrorCode.INVALID_PARAMS and "p.c" in by_id["bad-id"]["E"]["m"]
        assert by_id[None]["E"] == {"c": int(ErrorCode.INVALID_PARAMS), "m": "request: malformed JSON"}
        assert by_id["unknown"]["E"]["m"] == "m: unknown method 'mesh.sendx'"
        assert by_id["surrogate"]["E"]["m"] == "request: lone UTF-16 surrogate escape"
        assert by_id["int-id"] == {"E": None, "r": {"s": True}, "i": "int-id"}
        assert sum(1 for reply in replies if reply.get("i") is None) == 2   # the malformed one, and `i: true`
        for position, client in enumerate(clients):   # (clients(2, nodes=2) may connect more than 2)
            expected = [f"m{index}" for index in range(position, 200, len(clients))]
            assert [client.recv() for _ in expected] == expected
        assert clients[0].recv() == "é"


# --- a peer's batch of replies (cluster/mesh.py, batched_replies_python) ------------------------------------

def _batch(messages) -> bytes:
    return b"\x07" + b"".join(struct.pack("!I", len(message)) + message for message in messages)


replies = st.tuples(st.integers(0, 2 ** 64 - 1), st.binary(max_size=30)).map(
    lambda pair: mesh.frame_reply(*pair)[0])


@needs_native
@SETTINGS
@given(st.lists(replies | st.binary(max_size=20), max_size=8), st.integers(0, 12))
def test_batched_replies_any_batch(messages, cut):
    frame = _batch(messages)
    for candidate in (frame, frame[:len(frame) - cut], frame + b"\x00" * cut):
        assert native.batched_replies(candidate) == mesh.batched_replies_python(candidate)


@needs_native
def test_batched_replies_bounds():
    many = [mesh.frame_reply(index, b'{"s":true}')[0] for index in range(mesh.MAX_BATCH + 1)]
    for messages in (many, many[:-1], many[:1], [], [b"\x06" + b"\x00" * 7], [mesh.frame_reply(2 ** 64 - 1, b"")[0]]):
        frame = _batch(messages)
        assert native.batched_replies(frame) == mesh.batched_replies_python(frame)
    assert native.batched_replies(_batch(many[:-1]))[-1] == (mesh.MAX_BATCH - 1, b'{"s":true}')
    assert native.batched_replies(_batch(many)) is None   # over the bound: unpack says so
    with pytest.raises(TypeError):
        native.batched_replies(bytearray(_batch(many[:1])))


# --- a peer's mesh.send (cluster/mesh.py, read_request) --------------------------------------------------------

def _python_read(frame):
    """read_request as the Python code alone reads it."""
    reader, mesh._read_common_request = mesh._read_common_request, None
    try:
        return _outcome(mesh.read_request, [frame])
    finally:
        mesh._read_common_request = reader


def _same_request(frame) -> None:
    fast = native.read_common_request(frame)
    if fast is not None:
        assert ("ok", repr(fast), type(fast)) == _python_read(frame)
        assert type(fast.message) in (mesh.Send, mesh.Publish)
    assert _outcome(mesh.read_request, [frame]) == _python_read(frame)


@needs_native
@pytest.mark.parametrize("client_id", [0, 1, 9, 10, 4611686018427387905, 2 ** 64 - 1])
@pytest.mark.parametrize("payload", [b"", b"x", b"x" * 125, b"x" * 126, "é".encode() * 100, b"x" * 65535,
                                     b"x" * 65536, b"\xff", b"\xed\xa0\x80"])
def test_read_common_request_reads_what_send_request_writes(client_id, payload):
    for binary in (False, True):
        frame = mesh.request_frame(mesh.send_request(client_id, protocol.encode_ws_frame(payload, binary)), 99)
        _same_request(frame)
        if len(payload) <= 0xFFFF and (binary or payload.isascii() or payload == "é".encode() * 100):
            assert native.read_common_request(frame) == (99, (client_id, protocol.encode_ws_frame(payload, binary)))


@needs_native
@pytest.mark.parametrize("head", [b'{"c":007}', b'{"c":18446744073709551616}', b'{"c":-1}', b'{"c":1.0}', b'{"c":}',
                                  b'{"c":1 }', b'{ "c":1}', b'{"c":"1"}', b'{"c":1,"x":2}', b'{"c":99999999999999999999}',
                                  b'{"c":123456789012345678901}', b'[]', b'{"c":1}x', b''])
def test_read_common_request_leaves_other_send_heads(head):
    body = protocol.encode_ws_frame(b"hi")
    _same_request(struct.pack("!BQI", 1, 5, len(head)) + head + body)
    _same_request(struct.pack("!BQI", 2, 5, len(head)) + head + body)   # another kind


@needs_native
@SETTINGS
@given(st.binary(max_size=80), st.integers(0, 2 ** 64 - 1), st.sampled_from([b'{"c":5}', b'{"c":0}', b'{"c":12x}']))
def test_read_common_request_any_send_body(body, request_id, head):
    _same_request(struct.pack("!BQI", 1, request_id, len(head)) + head + body)
    _same_request(struct.pack("!BQI", 1, request_id, len(head)) + head + bytes((0x81, len(body) & 0x7F)) + body)
    _same_request(body)
    for size in (len(head) - 1, len(head) + 1, 1 << 31):
        _same_request(struct.pack("!BQI", 1, request_id, size) + head + body)


@needs_native
@pytest.mark.parametrize("channels", [["bench"], ["a", "b", "a"], ["!~" * 127 + "!"], ["x" * 256], ["a/b", "c:d"],
                                      ['a"b'], ["a\\b"], ["a b"], ["é"], ["a\x7f"], [""], [], ["x"] * 300])
@pytest.mark.parametrize("payload", [b"", b"x" * 126, "é".encode() * 100, b"x" * 65536, b"\xff"])
def test_read_common_request_reads_what_publish_request_writes(channels, payload):
    """Names at and past each bound, a repeated one, the characters JSON escapes, what name_problem refuses."""
    for binary in (False, True):
        frame = mesh.request_frame(mesh.publish_request(channels, protocol.encode_ws_frame(payload, binary)), 7)
        _same_request(frame)
    frame = mesh.request_frame(mesh.publish_request(["news", "sport"], protocol.encode_ws_frame(b"hi")), 7)
    assert native.read_common_request(frame) == (7, (["news", "sport"], protocol.encode_ws_frame(b"hi")))


@needs_native
@pytest.mark.parametrize("head", [b'{"ch":[]}', b'{"ch":["a",]}', b'{"ch":[,"a"]}', b'{"ch":["a" ,"b"]}', b'{"ch":"a"}',
                                  b'{"ch":["a"],"x":1}', b'{"ch":["a""b"]}', b'{"ch":["\\u0041"]}', b'{"ch":[""]}',
                                  b'{"ch":["a"]} ', b'{"ch": ["a"]}', b'{"ch":["a"', b'{"ch":[5]}', b'{"ch":["a"]}x',
                                  b'{"ch":["a","a"]}', b'{"ch":["a,b"]}', b'{"ch":["a"]]}', b'{"c":["a"]}'])
def test_read_common_request_leaves_other_publish_heads(head):
    body = protocol.encode_ws_frame(b"hi")
    _same_request(struct.pack("!BQI", 2, 5, len(head)) + head + body)


@needs_native
@SETTINGS
@given(st.binary(max_size=80), st.lists(names, max_size=4))
def test_read_common_request_any_publish(body, channels):
    head = json.dumps({"ch": channels}, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    _same_request(struct.pack("!BQI", 2, 9, len(head)) + head + body)
    _same_request(struct.pack("!BQI", 2, 9, len(head)) + head + bytes((0x81, len(body) & 0x7F)) + body)
    _same_request(struct.pack("!BQI", 2, 9, len(head)) + head[:-1] + bytes((0x82, len(body) & 0x7F)) + body)


@needs_native
def test_read_common_request_odd_frames():
    for frame in (b"", bytearray(b"\x01" * 20), memoryview(b"\x01" * 20), "text", 5, None):
        assert native.read_common_request(frame) is None
    good = mesh.request_frame(mesh.send_request(3, protocol.encode_ws_frame(b"ok")), 1)
    assert native.read_common_request(bytearray(good)) == native.read_common_request(memoryview(good)) == \
        native.read_common_request(good) == (1, (3, protocol.encode_ws_frame(b"ok")))


# --- corked frames out (node/clients.py, send_corked) ----------------------------------------------------------

class _Subclassed(socket.socket):
    """A socket of another type (as ssl.SSLSocket is): written through its own send, never to its descriptor."""


def _flush_both_ways(make):
    """Runs the flush with each version on connections `make()` builds; returns what each peer read."""
    async def run(send_corked):
        conns, peers, corked = make()
        for conn, data in send_corked(corked):
            clients._write(conn, data)
        await asyncio.sleep(0.05)   # what waits in a stream's buffer goes out
        received = []
        for peer in peers:
            peer.setblocking(False)
            received.append(read_available(peer))
        for conn in conns:
            if conn.stream is not None:
                conn.stream.close()
        for peer in peers:
            peer.close()
        return received
    return asyncio.run(run(native.send_corked)), asyncio.run(run(clients.send_corked))


def _pair(socket_class=socket.socket):
    mine, peer = socket.socketpair()
    if socket_class is not socket.socket:
        mine = socket_class(fileno=mine.detach())
    mine.setblocking(False)
    return StreamConn(tornado.iostream.IOStream(mine)), peer


@needs_native
def test_send_corked_writes_what_python_writes():
    frame, more = protocol.encode_ws_frame(b"x" * 100), protocol.encode_ws_frame(b"y" * 3000)

    def make():
        pairs = [_pair() for _ in range(4)] + [_pair(_Subclassed)]
        conns, peers = [conn for conn, _ in pairs], [peer for _, peer in pairs]
        corked = {conns[0]: frame, conns[1]: clients._Frames((frame, more)), conns[4]: more}
        conns[2].stream._write_buffer.append(b"queued first ")   # something waits: it keeps its place
        corked[conns[2]] = frame
        gone = StreamConn(None)
        corked[gone] = frame
        peers[3].close()   # a peer gone: its connection is dropped
        corked[conns[3]] = frame
        return conns, peers[:3] + peers[4:], corked
    with_c, with_python = _flush_both_ways(make)
    assert with_c == with_python
    assert with_c[0] == frame and with_c[1] == frame + more and with_c[3] == more


@needs_native
def test_send_corked_leaves_what_the_kernel_does_not_take():
    big = protocol.encode_ws_frame(os.urandom(60000).hex().encode()[:65535])

    frames = clients._Frames([protocol.encode_ws_frame(b"%d" % index * 500) for index in range(100)])
    many = clients._Frames([protocol.encode_ws_frame(b"%d" % index) for index in range(300)])

    def make():
        pairs = [_pair() for _ in range(3)]
        for conn, _ in pairs:
            conn.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        corked = {pairs[0][0]: big, pairs[1][0]: frames, pairs[2][0]: many}
        return [conn for conn, _ in pairs], [peer for _, peer in pairs], corked
    with_c, with_python = _flush_both_ways(make)
    assert with_c == with_python
    for sent, whole in zip(with_c, (big, b"".join(frames), b"".join(many))):
        assert 0 < len(sent) <= len(whole) and whole.startswith(sent)


@needs_native
def test_send_corked_refuses_what_is_not_a_dict():
    with pytest.raises(TypeError):
        native.send_corked([])
    assert native.send_corked({}) == []


class _Sly:
    """A connection whose `stream` runs Python code: it adds frames while the flush looks."""

    def __init__(self, stream, frames):
        self._stream, self.frames = stream, frames
        self._closed_by_server = None

    @property
    def stream(self):
        self.frames.extend([protocol.encode_ws_frame(b"late")] * 5)
        return self._stream


@needs_native
def test_send_corked_and_cork_all_where_python_code_runs():
    async def run():
        conn, peer = _pair()
        frames = clients._Frames([protocol.encode_ws_frame(b"%d" % index) for index in range(255)])
        sly = _Sly(conn.stream, frames)
        left = native.send_corked({sly: frames})   # 260 frames by then: more than one sendmsg takes
        assert [(who, data) for who, data in left] == [(sly, frames)] and len(frames) == 260
        huge = _pair()[0]
        huge.stream._write_buffer._size = 2 ** 70   # not a C long: still "something queued"
        assert native.send_corked({huge: b"x"}) == clients.send_corked({huge: b"x"}) == [(huge, b"x")]
        assert native.cork_all([huge], b"x", {}) == clients.cork_all([huge], b"x", {}) == [huge]
        class Bare:
            pass
        for broken in (Bare(), StreamConn(object())):
            assert _outcome(native.send_corked, {broken: b"x"}) == _outcome(clients.send_corked, {broken: b"x"})
            assert _outcome(native.cork_all, [broken], b"x", {}) == _outcome(clients.cork_all, [broken], b"x", {})
            assert _outcome(native.send_corked, {broken: b"x"})[1] is AttributeError
        for each in (conn, huge):
            each.stream.close()
        peer.close()
    asyncio.run(run())


def _corked_view(corked, conns):
    """Who has what corked, comparable between the two versions: (index, type name, frames, size)."""
    view = []
    for conn, data in corked.items():
        frames = [data] if type(data) is bytes else list(data)
        view.append((conns.index(conn) if conn in conns else -1, type(data).__name__, frames,
                     getattr(data, "size", len(data))))
    return view


@needs_native
def test_cork_all_corks_what_python_corks():
    async def run(cork_all):
        pairs = [_pair() for _ in range(9)]
        conns = [conn for conn, _ in pairs]
        conns[1].stream._write_buffer.append(b"waiting")          # something queued: write_frame's
        conns[2].stream = None                                   # gone
        conns[3]._closed_by_server = (1000, "bye")               # our close under way
        conns[4].stream.close()                                  # closed: no buffer any more
        near = clients.CORK_BYTES - len(frame) + 1
        corked = {conns[5]: b"earlier",                           # corked already this turn: after it
                  conns[6]: b"n" * near,                          # one byte too many together
                  conns[7]: clients._Frames((b"a", b"bc")),       # frames already: one more
                  conns[8]: clients._Frames((b"a", b"bc"))}
        corked[conns[7]].size = 3
        corked[conns[8]].size = clients.CORK_BYTES - len(frame) + 1
        rest = cork_all(conns + [conns[0]], frame, corked)
        outcome = (_corked_view(corked, conns), [conns.index(conn) for conn in rest])
        for conn, peer in pairs:
            peer.close()
            if conn.stream is not None:
                conn.stream.close()
        return outcome
    frame = protocol.encode_ws_frame(b"x")
    with_c, with_python = asyncio.run(run(native.cork_all)), asyncio.run(run(clients.cork_all))
    assert with_c == with_python
    corked, rest = with_c
    assert rest == [1, 2, 3, 4, 6, 8]
    assert dict((index, (kind, frames, size)) for index, kind, frames, size in corked) == {
        0: ("_Frames", [frame, frame], 2 * len(frame)),     # named twice: corked twice, in order
        5: ("_Frames", [b"earlier", frame], 7 + len(frame)),
        6: ("bytes", [b"n" * (clients.CORK_BYTES - len(frame) + 1)], clients.CORK_BYTES - len(frame) + 1),
        7: ("_Frames", [b"a", b"bc", frame], 3 + len(frame)),
        8: ("_Frames", [b"a", b"bc"], clients.CORK_BYTES - len(frame) + 1)}
    with pytest.raises(TypeError):
        native.cork_all((), b"x", {})
    with pytest.raises(TypeError):
        native.cork_all([], bytearray(b"x"), {})


@needs_native
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([1, 200, 30000, 65536])), min_size=1, max_size=40))
def test_cork_all_publishes_as_python_does(publishes):
    """A turn's publishes (to which of six connections, and how big) cork the same frames both ways."""
    async def run(cork_all):
        pairs = [_pair() for _ in range(6)]
        conns = [conn for conn, _ in pairs]
        corked, rests = {}, []
        for count, size in publishes:
            rests.append([conns.index(conn) for conn in cork_all(conns[:count + 1], b"f" * size, corked)])
        outcome = (_corked_view(corked, conns), rests)
        for conn, peer in pairs:
            peer.close()
            conn.stream.close()
        return outcome
    assert asyncio.run(run(native.cork_all)) == asyncio.run(run(clients.cork_all))
