"""System tests of the backend WebSocket API /ws/v1 (docs/protocol.md, WebSocket API).

One real 3-node cluster per module, real client WebSockets. Client messages go
to the default entry's topic `default`; every test that consumes it closes its
consumers before it ends, since consumers of one topic compete.
"""

import base64
import json
import time
import uuid

import pytest
import websocket

from conftest import WAIT, assert_error, channel, compact, names_field, raw_api, wait_until

MAX_BODY = 1024 * 1024      # node.api.max_body default
TOPIC = "default"           # the default entry's topic
UNKNOWN_ID = "123"          # a well-formed client id that no node ever made


def assert_ok(reply: dict, result=None) -> None:
    assert reply["E"] is None, reply
    assert reply["r"] == ({"s": True} if result is None else result), reply


def event_from(consumer, client_id: str = None, data=None) -> dict:
    """The next queue event of `client_id` (or carrying frame data `data`) within WAIT; other events are dropped."""
    deadline = time.monotonic() + WAIT
    while True:
        event = consumer.event(max(deadline - time.monotonic(), 0.001))
        payload = event["p"]
        if client_id is not None and payload["c"] == client_id:
            return event
        if data is not None and payload["d"]["frame"]["data"] == data:
            return event


@pytest.fixture
def api(cluster):
    """A /ws/v1 connection closed at the end of the test (an implicit queue.unpop)."""
    opened = []

    def connect():
        conn = cluster.api()
        opened.append(conn)
        return conn

    first = connect()
    first.connect = connect
    yield first
    for conn in opened:
        conn.ws.close()


@pytest.fixture
def raw_client(cluster):
    """A client that has not sent anything yet (its id is learned from its first queue event)."""
    made = []

    def connect():
        client = cluster.client()
        made.append(client)
        return client

    yield connect
    for client in made:
        client.ws.close()


# --- envelope ---------------------------------------------------------------------

def test_text_ping_is_answered_with_text_pong(api):
    """A text frame `ping` gets a text frame `pong`."""
    api.send_raw("ping")
    api.ws.settimeout(WAIT)
    assert api.ws.recv_data() == (websocket.ABNF.OPCODE_TEXT, b"pong")
    assert_ok(api.request("mesh.publish", {"c": channel(), "d": "x"}), {"s": 0, "f": 0})


def test_protocol_ping_is_answered_with_pong(api):
    """A protocol ping frame gets a protocol pong with the same data."""
    api.ws.ping(b"are-you-there")
    api.ws.settimeout(WAIT)
    opcode, data = api.ws.recv_data(control_frame=True)
    assert (opcode, data) == (websocket.ABNF.OPCODE_PONG, b"are-you-there")


@pytest.mark.parametrize("req_id", [7, 0, -3, 2 ** 60, "abc", "", "42"],
                         ids=["int", "zero", "negative", "big-int", "string", "empty-string", "numeric-string"])
def test_id_is_echoed_unchanged(api, req_id):
    """`i` is echoed unchanged on success and on error, keeping its type."""
    reply = api.request("mesh.publish", {"c": channel(), "d": "x"}, req_id=req_id)
    assert reply == {"E": None, "r": {"s": 0, "f": 0}, "i": req_id}
    reply = api.request("mesh.publish", {"c": "", "d": "x"}, req_id=req_id)
    assert_error(reply, 101, "p.c", req_id)


@pytest.mark.parametrize("req_id", [99, "alias"])
def test_id_alias_is_echoed_as_i(api, req_id):
    """`id` is accepted as an alias of `i` and the reply carries it as `i`."""
    api.send_raw(json.dumps({"m": "mesh.publish", "p": {"c": channel(), "d": "x"}, "id": req_id}))
    reply = api.read()
    assert reply == {"E": None, "r": {"s": 0, "f": 0}, "i": req_id}
    api.send_raw(json.dumps({"m": "mesh.send", "p": {"c": "bad", "d": "x"}, "id": req_id}))
    assert_error(api.read(), 101, "p.c", req_id)


def test_request_without_id_gets_null_id(api):
    """A request without an id is answered with `"i": null`, on success and on error."""
    api.send_raw(json.dumps({"m": "mesh.publish", "p": {"c": channel(), "d": "x"}}))
    reply = api.read()
    assert reply == {"E": None, "r": {"s": 0, "f": 0}, "i": None}
    api.send_raw(json.dumps({"m": "mesh.publish", "p": {"c": channel()}}))
    assert_error(api.read(), 101, "p.d", None)


@pytest.mark.parametrize("request_text,field", [
    ('{"m": "mesh.nope", "p": {}, "i": 5}', "m"),
    ('{"m": "MESH.SEND", "p": {}, "i": 5}', "m"),
    ('{"m": "", "p": {}, "i": 5}', "m"),
    ('{"p": {"c": "x", "d": "y"}, "i": 5}', "m"),
    ('{"m": null, "i": 5}', "m"),
    ('{"m": 3, "i": 5}', "m"),
], ids=["unknown", "wrong-case", "empty", "missing", "null", "number"])
def test_unknown_or_missing_method_is_101(api, request_text, field):
    """An unknown, missing or mistyped `m` is 101 naming `m`, with the id echoed."""
    api.send_raw(request_text)
    assert_error(api.read(), 101, field, 5)


@pytest.mark.parametrize("text", ["{not json", "{\"m\": \"mesh.send\",", "", "nul", "ping pong"],
                         ids=["garbage", "truncated", "empty", "bad-literal", "almost-ping"])
def test_malformed_json_is_101_and_connection_keeps_answering(api, text):
    """Malformed JSON is answered 101 with `"i": null` and the connection serves the next request."""
    api.send_raw(text)
    assert_error(api.read(), 101, mentions="JSON")
    assert_ok(api.request("mesh.publish", {"c": channel(), "d": "x"}, req_id="after"), {"s": 0, "f": 0})


@pytest.mark.parametrize("text", ['[1, 2]', '"mesh.send"', '42', 'null'],
                         ids=["array", "string", "number", "null"])
def test_request_that_is_not_an_object_is_101(api, text):
    """A request that is valid JSON but not an object is 101 and the connection keeps answering."""
    api.send_raw(text)
    assert_error(api.read(), 101, mentions="object")
    assert_ok(api.request("mesh.publish", {"c": channel(), "d": "x"}, req_id=1), {"s": 0, "f": 0})


@pytest.mark.parametrize("method, params", [
    ("mesh.publish", '{"c": "news", "d": "\\ud800"}'),
    ("mesh.send", '{"c": "1", "d": {"k": "\\udfff"}}'),
    ("conn.call", '{"c": "1", "f": "set_context_value", "a": ["k", "\\ud800"]}'),
])
def test_a_lone_surrogate_is_101_with_the_requests_id(api, method, params):
    """A request whose JSON holds a lone surrogate is answered 101 with its own `i`; the connection goes on."""
    api.send_raw('{"m": "%s", "p": %s, "i": 77}' % (method, params))
    assert_error(api.read(), 101, req_id=77, mentions="surrogate")
    assert_ok(api.request("mesh.publish", {"c": channel(), "d": "x"}, req_id="after"), {"s": 0, "f": 0})


@pytest.mark.parametrize("bad_id", [{"x": 1}, [1], 1.5, True], ids=["object", "list", "float", "bool"])
def test_mistyped_id_is_101_naming_i(api, bad_id):
    """An id that is neither an integer nor a string is 101 naming `i`."""
    api.send_raw(json.dumps({"m": "mesh.publish", "p": {"c": channel(), "d": "x"}, "i": bad_id}))
    assert_error(api.read(), 101, "i", None)


def test_request_over_max_body_is_103_and_connection_keeps_answering(api):
    """A request larger than node.api.max_body is 103 and the connection serves the next request."""
    head = json.dumps({"m": "mesh.publish", "p": {"c": channel(), "d": ""}, "i": 1})
    text = head.replace('"d": ""', '"d": "' + "x" * MAX_BODY + '"')
    assert len(text) > MAX_BODY
    api.send_raw(text)
    message = assert_error(api.read(), 103)   # not read, so its id is not echoed (docs/protocol.md, Sizes)
    assert "request" in message or "p.d" in message, message
    assert_ok(api.request("mesh.publish", {"c": channel(), "d": "x"}, req_id=2), {"s": 0, "f": 0})


def test_request_over_max_body_in_utf8_bytes_is_103(api):
    """max_body counts bytes: a request under it in characters but over it in UTF-8 bytes is 103."""
    text = json.dumps({"m": "mesh.publish", "p": {"c": channel(), "d": "\u00e9" * (MAX_BODY // 2 + 1000)}, "i": 1},
                      ensure_ascii=False)
    assert len(text) < MAX_BODY < len(text.encode("utf-8"))
    api.send_raw(text)
    assert_error(api.read(), 103)
    assert_ok(api.request("mesh.publish", {"c": channel(), "d": "x"}, req_id=2), {"s": 0, "f": 0})


def test_pipelined_requests_all_get_their_replies(api, clients):
    """Many requests sent without waiting are all answered, each reply carrying its own id."""
    client, = clients(1)
    expected = {}
    for index in range(60):
        kind = index % 4
        if kind == 0:
            message = {"m": "mesh.send", "p": {"c": client.client_id, "d": f"pipe-{index}"}}
            expected[index] = {"E": None, "r": {"s": True}, "i": index}
        elif kind == 1:
            message = {"m": "mesh.publish", "p": {"c": channel(), "d": "x"}}
            expected[index] = {"E": None, "r": {"s": 0, "f": 0}, "i": index}
        elif kind == 2:
            message = {"m": "conn.call", "p": {"c": client.client_id, "f": "get_context", "a": []}}
            expected[index] = {"E": None, "r": {"s": True, "d": {}}, "i": index}
        else:
            message = {"m": "mesh.send", "p": {"c": client.client_id}}
            expected[index] = None
        api.send_raw(json.dumps({**message, "i": index}))
    replies = {}
    while len(replies) < len(expected):
        reply = api.read()
        assert reply["i"] in expected and reply["i"] not in replies, reply
        replies[reply["i"]] = reply
    for index, want in expected.items():
        if want is None:
            assert_error(replies[index], 101, "p.d", index)
        else:
            assert replies[index] == want
    received = {client.recv() for _ in range(15)}
    assert received == {f"pipe-{index}" for index in range(0, 60, 4)}


# --- mesh.send ---------------------------------------------------------------------

def test_send_text_with_string_and_integer_ids(api, clients):
    """mesh.send delivers text to clients on any node, by string id and by integer id."""
    for client in clients(4):
        assert_ok(api.request("mesh.send", {"c": client.client_id, "d": "by string"}))
        assert client.recv_frame() == (websocket.ABNF.OPCODE_TEXT, b"by string")
        assert_ok(api.request("mesh.send", {"c": int(client.client_id), "d": "by int", "t": "text"}))
        assert client.recv_frame() == (websocket.ABNF.OPCODE_TEXT, b"by int")


def test_send_json_object_and_binary(api, clients):
    """mesh.send sends an object `d` as compact JSON text and binary `d` as decoded bytes."""
    client, = clients(1)
    data = {"a": [1, {"b": None}], "c": "\u00e9 x"}
    assert_ok(api.request("mesh.send", {"c": client.client_id, "d": data}))
    assert client.recv_frame() == (websocket.ABNF.OPCODE_TEXT, compact(data).encode())
    assert_ok(api.request("mesh.send", {"c": client.client_id, "d": [1, 2]}))
    assert client.recv_frame() == (websocket.ABNF.OPCODE_TEXT, b"[1,2]")
    payload = bytes(range(255, -1, -1))
    assert_ok(api.request("mesh.send", {"c": client.client_id, "t": "binary",
                                        "d": base64.b64encode(payload).decode()}))
    assert client.recv_frame() == (websocket.ABNF.OPCODE_BINARY, payload)


def test_send_to_client_not_connected_is_401(api, clients):
    """mesh.send to a closed or never-seen client is 401 naming the client, without `r`."""
    client, = clients(1)
    client.ws.close()
    reply = wait_until(lambda: (lambda r: r if r["E"] is not None else None)(
        api.request("mesh.send", {"c": client.client_id, "d": "late"}, req_id="late")), what="401")
    assert_error(reply, 401, req_id="late", mentions=client.client_id)
    for client_id in (UNKNOWN_ID, str(2 ** 64 - 1), 0):
        reply = api.request("mesh.send", {"c": client_id, "d": "nobody"}, req_id=3)
        assert_error(reply, 401, req_id=3, mentions=str(client_id))


# --- mesh.publish ------------------------------------------------------------------

def test_publish_reaches_subscribers_once(api, clients):
    """mesh.publish with a channel list reaches a client subscribed to two of them once."""
    ch1, ch2, ch3 = channel(), channel(), channel()
    both, single = clients(2)
    assert_ok(api.request("conn.call", {"c": both.client_id, "f": "subscribe", "a": [ch1, ch2]}))
    assert_ok(api.request("conn.call", {"c": single.client_id, "f": "subscribe", "a": [ch2]}))
    assert_ok(api.request("mesh.publish", {"c": [ch1, ch2, ch3], "d": "list"}), {"s": 2, "f": 0})
    assert both.recv_frame() == (websocket.ABNF.OPCODE_TEXT, b"list")
    assert single.recv_frame() == (websocket.ABNF.OPCODE_TEXT, b"list")
    assert_ok(api.request("mesh.publish", {"c": ch1, "d": {"k": 1}}), {"s": 1, "f": 0})
    assert both.recv_frame() == (websocket.ABNF.OPCODE_TEXT, b'{"k":1}')
    assert_ok(api.request("mesh.publish", {"c": ch2, "t": "binary", "d": "AAEC"}), {"s": 2, "f": 0})
    assert both.recv_frame() == (websocket.ABNF.OPCODE_BINARY, b"\x00\x01\x02")
    assert single.recv_frame() == (websocket.ABNF.OPCODE_BINARY, b"\x00\x01\x02")


def test_publish_without_subscriber_is_zero_zero(api):
    """mesh.publish to channels without subscribers is s:0, f:0."""
    assert_ok(api.request("mesh.publish", {"c": channel(), "d": "x"}), {"s": 0, "f": 0})
    assert_ok(api.request("mesh.publish", {"c": [channel(), "x" * 255], "d": "x"}), {"s": 0, "f": 0})


def _bad_mesh_cases():
    cases = []
    for method in ("mesh.send", "mesh.publish"):
        target = UNKNOWN_ID if method == "mesh.send" else "news"
        short = method.split(".")[1]
        cases += [
            (method, [target, "x"], "p", f"{short}-p-list"),
            (method, "text", "p", f"{short}-p-string"),
            (method, None, "p", f"{short}-p-null"),
            (method, {}, "p.c", f"{short}-p-empty"),
            (method, {"d": "x"}, "p.c", f"{short}-missing-c"),
            (method, {"c": target}, "p.d", f"{short}-missing-d"),
            (method, {"c": target, "d": 3}, "p.d", f"{short}-d-number"),
            (method, {"c": target, "d": False}, "p.d", f"{short}-d-bool"),
            (method, {"c": target, "d": None}, "p.d", f"{short}-d-null"),
            (method, {"c": target, "d": "x", "t": "blob"}, "p.t", f"{short}-t-unknown"),
            (method, {"c": target, "d": "x", "t": None}, "p.t", f"{short}-t-null"),
            (method, {"c": target, "d": "x", "t": 2}, "p.t", f"{short}-t-number"),
            (method, {"c": target, "d": "@@@@", "t": "binary"}, "p.d", f"{short}-bad-base64"),
            (method, {"c": target, "d": "YWI", "t": "binary"}, "p.d", f"{short}-base64-no-padding"),
            (method, {"c": target, "d": "YWJj=", "t": "binary"}, "p.d", f"{short}-base64-excess-padding"),
            (method, {"c": target, "d": ["AA=="], "t": "binary"}, "p.d", f"{short}-binary-d-list"),
        ]
    cases += [
        ("mesh.send", {"c": str(2 ** 64), "d": "x"}, "p.c", "send-c-out-of-range"),
        ("mesh.send", {"c": 2 ** 64, "d": "x"}, "p.c", "send-c-out-of-range-int"),
        ("mesh.send", {"c": "-5", "d": "x"}, "p.c", "send-c-negative-string"),
        ("mesh.send", {"c": -5, "d": "x"}, "p.c", "send-c-negative-int"),
        ("mesh.send", {"c": 2.5, "d": "x"}, "p.c", "send-c-float"),
        ("mesh.send", {"c": "2.5", "d": "x"}, "p.c", "send-c-float-string"),
        ("mesh.send", {"c": "client", "d": "x"}, "p.c", "send-c-non-numeric"),
        ("mesh.send", {"c": "", "d": "x"}, "p.c", "send-c-empty"),
        ("mesh.send", {"c": False, "d": "x"}, "p.c", "send-c-bool"),
        ("mesh.send", {"c": None, "d": "x"}, "p.c", "send-c-null"),
        ("mesh.publish", {"c": "", "d": "x"}, "p.c", "publish-c-empty"),
        ("mesh.publish", {"c": "two words", "d": "x"}, "p.c", "publish-c-space"),
        ("mesh.publish", {"c": "bell\x07", "d": "x"}, "p.c", "publish-c-control"),
        ("mesh.publish", {"c": "x" * 256, "d": "x"}, "p.c", "publish-c-256-bytes"),
        ("mesh.publish", {"c": [], "d": "x"}, "p.c", "publish-c-empty-list"),
        ("mesh.publish", {"c": ["ok", " "], "d": "x"}, "p.c", "publish-c-list-blank"),
        ("mesh.publish", {"c": ["ok", None], "d": "x"}, "p.c", "publish-c-list-null"),
        ("mesh.publish", {"c": 7, "d": "x"}, "p.c", "publish-c-number"),
    ]
    return [pytest.param(method, params, field, id=case_id) for method, params, field, case_id in cases]


@pytest.mark.parametrize("method,params,field", _bad_mesh_cases())
def test_bad_mesh_params_are_101_naming_the_field(api, method, params, field):
    """Each invalid mesh.send / mesh.publish is 101 with a message naming the field under `p`."""
    api.send_raw(json.dumps({"m": method, "p": params, "i": "bad"}))
    assert_error(api.read(), 101, field, "bad")


# --- queue.pop / queue.unpop ---------------------------------------------------------

@pytest.mark.parametrize("params", [{"t": [TOPIC]}, {"t": TOPIC}, [TOPIC]], ids=["list", "string", "connmix-list"])
def test_queue_pop_forms_receive_text_messages(api, raw_client, cluster, params):
    """Every queue.pop form subscribes the connection; a client's text message arrives as a queue.pop event."""
    assert api.request("queue.pop", params, req_id=12345) == {"E": None, "r": {"s": True}, "i": 12345}
    client = raw_client()
    marker = f"text-{uuid.uuid4().hex}"
    client.ws.send(marker)
    event = event_from(api, data=marker)
    payload = event["p"]
    node_ids = {node["node_id"] for node in cluster.status()["nodes"]}
    assert isinstance(payload["n"], int) and not isinstance(payload["n"], bool) and payload["n"] in node_ids, event
    assert isinstance(payload["c"], str) and payload["c"].isdigit(), event
    assert event == {"e": "queue.pop", "i": None,
                     "p": {"n": payload["n"], "c": payload["c"], "t": TOPIC,
                           "d": {"frame": {"type": "text", "data": marker, "finish": True}}}}
    # The id in the event names that very client.
    assert_ok(api.request("mesh.send", {"c": payload["c"], "d": "back to you"}))
    assert client.recv() == "back to you"


def test_queue_pop_binary_message_arrives_as_base64(api, raw_client):
    """A client's binary message arrives with type binary and standard padded base64 data."""
    assert_ok(api.request("queue.pop", {"t": [TOPIC]}))
    client = raw_client()
    marker = f"first-{uuid.uuid4().hex}"
    client.ws.send(marker)
    client_id = event_from(api, data=marker)["p"]["c"]
    payload = b"\x00\xff\x10binary\x80"
    client.ws.send_binary(payload)
    event = event_from(api, client_id=client_id)
    assert event["p"]["d"] == {"frame": {"type": "binary", "data": base64.b64encode(payload).decode(),
                                         "finish": True}}
    assert event["p"]["t"] == TOPIC and event["i"] is None
    client.ws.send_binary(b"ab")
    event = event_from(api, client_id=client_id)
    assert event["p"]["d"]["frame"]["data"] == "YWI="


def test_queue_pop_events_keep_client_order(api, raw_client):
    """Messages of one client reach the single consumer in the order the client sent them."""
    assert_ok(api.request("queue.pop", {"t": [TOPIC]}))
    client = raw_client()
    markers = [f"seq-{index}-{uuid.uuid4().hex[:6]}" for index in range(20)]
    for marker in markers:
        client.ws.send(marker)
    first = event_from(api, data=markers[0])
    received = [first["p"]["d"]["frame"]["data"]]
    while len(received) < len(markers):
        received.append(event_from(api, client_id=first["p"]["c"])["p"]["d"]["frame"]["data"])
    assert received == markers


def test_queue_pop_repeated_topic_is_202_and_changes_nothing(api, raw_client):
    """Popping a topic the connection already consumes is 202 and registers none of the listed topics."""
    extra = f"extra-{uuid.uuid4().hex[:8]}"
    assert_ok(api.request("queue.pop", {"t": [TOPIC]}))
    for params in ({"t": [extra, TOPIC]}, {"t": TOPIC}, [TOPIC]):
        message = assert_error(api.request("queue.pop", params, req_id="again"), 202, req_id="again")
        assert names_field(message, "p.t") or names_field(message, "p"), message
    # `extra` was not registered by the refused request, and the original topic still delivers.
    assert_ok(api.request("queue.pop", {"t": [extra]}))
    client = raw_client()
    marker = f"still-{uuid.uuid4().hex}"
    client.ws.send(marker)
    assert event_from(api, data=marker)["p"]["t"] == TOPIC


def test_queue_pop_refused_request_registers_nothing(api):
    """A queue.pop refused for one bad name in its list registers none of the other names."""
    good = f"good-{uuid.uuid4().hex[:8]}"
    assert_error(api.request("queue.pop", {"t": [good, "bad name"]}, req_id=1), 101, "p.t", 1)
    assert_ok(api.request("queue.pop", {"t": [good]}))


@pytest.mark.parametrize("params,field", [
    ({"t": []}, "p.t"),
    ([], "p"),
    ({}, "p.t"),
    ({"t": None}, "p.t"),
    ({"t": ""}, "p.t"),
    ({"t": [""]}, "p.t"),
    ({"t": ["a b"]}, "p.t"),
    ({"t": "tab\there"}, "p.t"),
    ({"t": ["x" * 256]}, "p.t"),
    ({"t": ["\u00e9" * 128]}, "p.t"),
    ({"t": ["ok", 5]}, "p.t"),
    ({"t": 5}, "p.t"),
    ({"t": {"name": "x"}}, "p.t"),
    (["ok", ""], "p"),
    (["new\nline"], "p"),
    ("topic", "p"),
    (7, "p"),
], ids=["empty-list", "connmix-empty-list", "missing-t", "t-null", "t-empty-string", "empty-name", "space",
        "tab", "256-bytes", "256-bytes-utf8", "non-string-item", "t-number", "t-object", "connmix-empty-name",
        "connmix-newline", "p-string", "p-number"])
def test_queue_pop_bad_topics_are_101(api, params, field):
    """queue.pop with an empty topic list or a bad topic name is 101 naming the field."""
    assert_error(api.request("queue.pop", params, req_id="pop"), 101, field, "pop")


def test_queue_pop_accepts_255_byte_topic_name(api):
    """A topic name of exactly 255 bytes is valid."""
    assert_ok(api.request("queue.pop", {"t": ["t" * 255]}))
    assert_ok(api.request("queue.pop", {"t": ["\u00e9" * 127 + "t"]}))
    assert_ok(api.request("queue.unpop", {}))


def test_queue_unpop_listed_topic_and_all(api, raw_client):
    """queue.unpop of a listed topic stops just it; unpop of all stops the rest; both are idempotent."""
    other = f"other-{uuid.uuid4().hex[:8]}"
    assert_ok(api.request("queue.pop", {"t": [TOPIC, other]}))
    for _ in range(2):
        assert api.request("queue.unpop", {"t": [other]}, req_id=9) == {"E": None, "r": {"s": True}, "i": 9}
    assert_ok(api.request("queue.pop", {"t": [other]}))          # it was really removed: no 202
    assert_ok(api.request("queue.unpop", [other]))                # connmix list form
    client = raw_client()
    first = f"before-{uuid.uuid4().hex}"
    client.ws.send(first)
    assert event_from(api, data=first)["p"]["t"] == TOPIC       # the unlisted topic still delivers
    for _ in range(2):
        assert api.request("queue.unpop", {}, req_id=10) == {"E": None, "r": {"s": True}, "i": 10}
    assert_ok(api.request("queue.unpop", None))                 # no params at all
    second = f"after-{uuid.uuid4().hex}"
    client.ws.send(second)
    # The message waits for a consumer instead of reaching the connection that stopped.
    other_consumer = api.connect()
    assert_ok(other_consumer.request("queue.pop", {"t": [TOPIC]}))
    assert event_from(other_consumer, data=second)["p"]["t"] == TOPIC
    assert api.no_event_for(0.2)
    assert_ok(api.request("queue.pop", {"t": [TOPIC]}))           # stopped: may consume again


@pytest.mark.parametrize("params,field", [
    ({"t": [""]}, "p.t"), ({"t": ["a b"]}, "p.t"), ({"t": "x" * 256}, "p.t"), ({"t": 3}, "p.t"), ([""], "p"),
], ids=["empty-name", "space", "256-bytes", "number", "connmix-empty-name"])
def test_queue_unpop_bad_topics_are_101(api, params, field):
    """queue.unpop with a bad topic name is 101 naming the field."""
    assert_error(api.request("queue.unpop", params, req_id="u"), 101, field, "u")


def test_closing_consumer_hands_messages_to_the_next(api, raw_client):
    """Closing a consuming connection is an implicit queue.unpop: later messages go to another consumer."""
    first_consumer = api.connect()
    assert_ok(first_consumer.request("queue.pop", {"t": [TOPIC]}))
    first_consumer.ws.close()
    client = raw_client()
    marker = f"handover-{uuid.uuid4().hex}"
    client.ws.send(marker)
    assert_ok(api.request("queue.pop", {"t": [TOPIC]}))
    assert event_from(api, data=marker)["p"]["d"]["frame"]["data"] == marker


# --- conn.call ---------------------------------------------------------------------

def call(api, client_id, function, args, req_id=1):
    return api.request("conn.call", {"c": client_id, "f": function, "a": args}, req_id=req_id)


def test_set_context_value_and_get_context(api, clients):
    """set_context_value sets keys, null removes one, and get_context returns the context."""
    for client in clients(3):
        assert call(api, client.client_id, "get_context", []) == {"E": None, "r": {"s": True, "d": {}}, "i": 1}
        assert_ok(call(api, client.client_id, "set_context_value", ["uid", 42]))
        assert_ok(call(api, int(client.client_id), "set_context_value", ["room", {"id": "r1", "tags": ["a"]}]))
        assert_ok(call(api, client.client_id, "get_context", []),
                  {"s": True, "d": {"uid": 42, "room": {"id": "r1", "tags": ["a"]}}})
        assert_ok(call(api, client.client_id, "set_context_value", ["uid", None]))
        assert_ok(call(api, client.client_id, "set_context_value", ["missing", None]))
        assert_ok(call(api, client.client_id, "get_context", []),
                  {"s": True, "d": {"room": {"id": "r1", "tags": ["a"]}}})


def test_set_context_replaces_the_whole_context(api, clients):
    """set_context replaces every key of the context."""
    client, = clients(1)
    assert_ok(call(api, client.client_id, "set_context_value", ["old", 1]))
    assert_ok(call(api, client.client_id, "set_context", [{"new": "v", "n": [1, 2]}]))
    assert_ok(call(api, client.client_id, "get_context", []), {"s": True, "d": {"new": "v", "n": [1, 2]}})
    assert_ok(call(api, client.client_id, "set_context", [{}]))
    assert_ok(call(api, client.client_id, "get_context", []), {"s": True, "d": {}})


def test_subscribe_then_publish_from_any_node_reaches_client(api, clients):
    """After subscribe replies, a publish issued from any connection reaches the client; unsubscribe stops it."""
    ch, ch2 = channel(), channel()
    subscribers = clients(3)
    publishers = [api.connect() for _ in range(3)]
    for client in subscribers:
        assert_ok(call(api, client.client_id, "subscribe", [ch, ch2]))
        for publisher in publishers:
            marker = f"pub-{uuid.uuid4().hex[:8]}"
            assert_ok(publisher.request("mesh.publish", {"c": ch, "d": marker}), {"s": 1, "f": 0})
            assert client.recv() == marker
        assert_ok(call(api, client.client_id, "unsubscribe", [ch, "never-subscribed"]))
        assert_ok(call(api, client.client_id, "unsubscribe", [ch]))   # again: fine
        for publisher in publishers:
            assert_ok(publisher.request("mesh.publish", {"c": ch, "d": "gone"}), {"s": 0, "f": 0})
        # The other channel still delivers, and it is the next frame: "gone" never arrived.
        assert_ok(api.request("mesh.publish", {"c": ch2, "d": "still"}), {"s": 1, "f": 0})
        assert client.recv() == "still"
        assert_ok(call(api, client.client_id, "unsubscribe", [ch2]))


def test_close_default_code(api, clients):
    """close with no arguments closes the client with code 1000."""
    client, = clients(1)
    assert_ok(call(api, client.client_id, "close", []))
    assert client.close_code() == 1000


@pytest.mark.parametrize("args", [[4001, "bye now"], [1001], [3000, ""], [4999, "r" * 123]],
                         ids=["code-reason", "code", "empty-reason", "reason-123-bytes"])
def test_close_with_code_and_reason(api, clients, args):
    """close with [code] or [code, reason] closes the client with that code and reason."""
    client, = clients(1)
    assert_ok(call(api, client.client_id, "close", args))
    assert (client.close_code(), client.close_reason) == (args[0], args[1] if len(args) > 1 else "")


def test_call_after_close_is_301(api, clients):
    """conn.call on a client that has disconnected is 301 naming the client, without `r`."""
    client, = clients(1)
    assert_ok(call(api, client.client_id, "close", []))
    client.close_code()
    reply = wait_until(lambda: (lambda r: r if r["E"] is not None else None)(
        call(api, client.client_id, "get_context", [], req_id="gone")), what="301")
    assert_error(reply, 301, req_id="gone", mentions=client.client_id)


@pytest.mark.parametrize("function,args", [
    ("get_context", []), ("set_context_value", ["k", 1]), ("set_context", [{}]), ("subscribe", ["ch"]),
    ("unsubscribe", ["ch"]), ("close", []),
])
@pytest.mark.parametrize("client_id", [UNKNOWN_ID, int(UNKNOWN_ID), str(2 ** 64 - 1)], ids=["string", "int", "max"])
def test_call_on_never_connected_client_is_301(api, function, args, client_id):
    """Every conn.call function on a client not connected anywhere is 301 naming the client."""
    assert_error(call(api, client_id, function, args, req_id="nobody"), 301, req_id="nobody", mentions=str(client_id))


def _bad_call_cases():
    cases = [
        ({"f": "get_context", "a": []}, "p.c", "missing-c"),
        ({"c": "", "f": "get_context", "a": []}, "p.c", "c-empty"),
        ({"c": "-1", "f": "get_context", "a": []}, "p.c", "c-negative"),
        ({"c": 1.5, "f": "get_context", "a": []}, "p.c", "c-float"),
        ({"c": str(2 ** 64), "f": "get_context", "a": []}, "p.c", "c-out-of-range"),
        ({"c": "abc", "f": "get_context", "a": []}, "p.c", "c-non-numeric"),
        ({"c": "CLIENT", "f": "explode", "a": []}, "p.f", "unknown-f"),
        ({"c": "CLIENT", "a": []}, "p.f", "missing-f"),
        ({"c": "CLIENT", "f": None, "a": []}, "p.f", "f-null"),
        ({"c": "CLIENT", "f": 3, "a": []}, "p.f", "f-number"),
        ({"c": "CLIENT", "f": "get_context", "a": {}}, "p.a", "a-object"),
        ({"c": "CLIENT", "f": "subscribe", "a": "room"}, "p.a", "a-string"),
        ({"c": "CLIENT", "f": "close", "a": 1000}, "p.a", "a-number"),
        ({"c": "CLIENT", "f": "set_context_value", "a": ["k"]}, "p.a", "scv-one-arg"),
        ({"c": "CLIENT", "f": "set_context_value", "a": ["k", 1, 2]}, "p.a", "scv-three-args"),
        ({"c": "CLIENT", "f": "set_context_value", "a": [1, 2]}, "p.a", "scv-key-number"),
        ({"c": "CLIENT", "f": "set_context_value", "a": ["", 2]}, "p.a", "scv-key-empty"),
        ({"c": "CLIENT", "f": "set_context_value", "a": [None, 2]}, "p.a", "scv-key-null"),
        ({"c": "CLIENT", "f": "set_context", "a": []}, "p.a", "sc-no-arg"),
        ({"c": "CLIENT", "f": "set_context", "a": ["x"]}, "p.a", "sc-string"),
        ({"c": "CLIENT", "f": "set_context", "a": [[1]]}, "p.a", "sc-list"),
        ({"c": "CLIENT", "f": "set_context", "a": [{}, {}]}, "p.a", "sc-two-args"),
        ({"c": "CLIENT", "f": "subscribe", "a": []}, "p.a", "sub-empty"),
        ({"c": "CLIENT", "f": "subscribe", "a": ["ok", ""]}, "p.a", "sub-empty-name"),
        ({"c": "CLIENT", "f": "subscribe", "a": ["a b"]}, "p.a", "sub-space"),
        ({"c": "CLIENT", "f": "subscribe", "a": ["x" * 256]}, "p.a", "sub-256-bytes"),
        ({"c": "CLIENT", "f": "subscribe", "a": [5]}, "p.a", "sub-number"),
        ({"c": "CLIENT", "f": "unsubscribe", "a": []}, "p.a", "unsub-empty"),
        ({"c": "CLIENT", "f": "unsubscribe", "a": ["bad\tname"]}, "p.a", "unsub-tab"),
        ({"c": "CLIENT", "f": "close", "a": [999]}, "p.a", "close-code-999"),
        ({"c": "CLIENT", "f": "close", "a": [1005]}, "p.a", "close-code-1005"),
        ({"c": "CLIENT", "f": "close", "a": [5000]}, "p.a", "close-code-5000"),
        ({"c": "CLIENT", "f": "close", "a": ["1000"]}, "p.a", "close-code-string"),
        ({"c": "CLIENT", "f": "close", "a": [1000, 5]}, "p.a", "close-reason-number"),
        ({"c": "CLIENT", "f": "close", "a": [1000, "r" * 124]}, "p.a", "close-reason-too-long"),
        ({"c": "CLIENT", "f": "close", "a": [1000, "x", 1]}, "p.a", "close-three-args"),
        ({"c": "CLIENT", "f": "get_context", "a": ["x"]}, "p.a", "get-context-arg"),
    ]
    return [pytest.param(params, field, id=case_id) for params, field, case_id in cases]


@pytest.mark.parametrize("params,field", _bad_call_cases())
def test_bad_call_params_are_101_naming_the_field(api, clients, params, field):
    """Each invalid conn.call on a connected client is 101 naming the field, and the client is untouched."""
    client, = clients(1)
    params = {key: (client.client_id if value == "CLIENT" else value) for key, value in params.items()}
    assert_error(api.request("conn.call", params, req_id="call"), 101, field, "call")
    assert_ok(call(api, client.client_id, "get_context", []), {"s": True, "d": {}})
    assert_ok(api.request("mesh.send", {"c": client.client_id, "d": "alive"}))
    assert client.recv() == "alive"


@pytest.mark.parametrize("params", [["CLIENT", "get_context", []], "CLIENT", None, 5],
                         ids=["list", "string", "null", "number"])
def test_call_params_not_an_object_is_101(api, params):
    """conn.call whose `p` is not an object is 101 naming `p`."""
    api.send_raw(json.dumps({"m": "conn.call", "p": params, "i": "p"}))
    assert_error(api.read(), 101, "p", "p")


def test_queue_pop_over_the_topic_limit_is_201(api):
    """A consumer may hold at most 1000 topics: more is 201, and what it had stays."""
    conn = api
    assert_ok(conn.request("queue.pop", {"t": [f"limit-{i}" for i in range(1000)]}))
    reply = conn.request("queue.pop", {"t": ["one-more"]}, req_id=77)
    assert_error(reply, 201, "p.t", req_id=77)
    assert_ok(conn.request("queue.unpop", {"t": ["limit-0"]}))
    assert_ok(conn.request("queue.pop", {"t": ["one-more"]}))


def test_cross_origin_upgrade_is_refused(cluster):
    """/ws/v1 refuses an upgrade whose Origin names another site (a web page), accepts its own host."""
    import websocket
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://127.0.0.1:{cluster.api_port}/ws/v1", origin="http://evil.example",
                                    timeout=10)
    assert refused.value.status_code == 403
    own = websocket.create_connection(f"ws://127.0.0.1:{cluster.api_port}/ws/v1", timeout=10,
                                      origin=f"http://127.0.0.1:{cluster.api_port}")
    own.send("ping")
    assert own.recv() == "pong"
    own.close()
    bare = websocket.create_connection(f"ws://127.0.0.1:{cluster.api_port}/ws/v1", timeout=10, suppress_origin=True)
    bare.send("ping")
    assert bare.recv() == "pong"
    bare.close()


def _close_code_of(sock, data: bytes) -> int:
    """Reads frames until the server's close frame; returns its code."""
    while True:
        while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F):
            chunk = sock.recv(4096)
            assert chunk, "closed without a close frame"
            data += chunk
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        if opcode == 0x8:
            return int.from_bytes(data[2:4], "big")
        data = data[2 + length:]


@pytest.mark.parametrize("frame, code", [
    (b"\x81\x05hello", 1002),                                                # not masked
    (b"\xc1\x85" + b"\x00" * 4 + b"hello", 1002),                            # a reserved bit
    (websocket.ABNF.create_frame(b"\xff\xfe", websocket.ABNF.OPCODE_TEXT).format(), 1007),   # not UTF-8
])
def test_ws_frames_that_break_the_rfc_close_with_its_code(cluster, frame, code):
    """/ws/v1 reads frames as strictly as the client servers: 1002 for a protocol violation, 1007 for bad UTF-8."""
    sock, rest = raw_api(cluster)
    try:
        sock.sendall(frame)
        assert _close_code_of(sock, rest) == code
    finally:
        sock.close()
    api = cluster.api()
    assert api.request("mesh.publish", {"c": channel(), "d": "still serving"})["E"] is None
