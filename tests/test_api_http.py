"""System tests of the HTTP backend API: POST /v1/mesh/send and /v1/mesh/publish (docs/protocol.md).

One real 3-node cluster per module, real client WebSockets; every error case
checks the code, the HTTP status and that the message names the field.
"""

import base64
import http.client
import json

import pytest
import websocket

from conftest import assert_error, channel, compact, wait_until

MAX_BODY = 1024 * 1024      # node.api.max_body default
UNKNOWN_ID = "123"          # a well-formed client id that no node ever made


@pytest.fixture
def api(cluster):
    conn = cluster.api()
    yield conn
    conn.ws.close()


def subscribe(api, client, *channels) -> None:
    reply = api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": list(channels)})
    assert reply == {"E": None, "r": {"s": True}, "i": reply["i"]}, reply


# --- mesh/send: success ---------------------------------------------------------

def test_send_text_to_clients_on_every_node(cluster, clients):
    """A text send with a string client id reaches each client, wherever it is connected."""
    for client in clients(6):
        marker = f"hello {client.client_id}"
        reply = cluster.http("/v1/mesh/send", {"c": client.client_id, "d": marker})
        assert reply == (200, {"E": None, "r": {"s": True}})
        assert client.recv_frame() == (websocket.ABNF.OPCODE_TEXT, marker.encode())


def test_send_integer_client_id_and_explicit_text_type(cluster, clients):
    """A JSON integer client id is accepted; `t: "text"` gives a text frame."""
    client, = clients(1)
    status, body = cluster.http("/v1/mesh/send", {"c": int(client.client_id), "d": "int id", "t": "text"})
    assert (status, body) == (200, {"E": None, "r": {"s": True}})
    assert client.recv_frame() == (websocket.ABNF.OPCODE_TEXT, b"int id")


@pytest.mark.parametrize("data", [
    {"a": 1, "b": [1, 2, {"x": "\u00e9"}], "c": None, "d": True, "e": "t e x t"},
    [1, "two", {"three": 3.5}],
    {},
], ids=["object", "array", "empty-object"])
def test_send_json_value_as_compact_text(cluster, clients, data):
    """An object or array `d` arrives as its compact JSON text in a text frame."""
    client, = clients(1)
    assert cluster.http("/v1/mesh/send", {"c": client.client_id, "d": data}) == (200, {"E": None, "r": {"s": True}})
    opcode, received = client.recv_frame()
    assert opcode == websocket.ABNF.OPCODE_TEXT
    assert received.decode("utf-8") == compact(data)


def test_send_json_value_with_escapes_keeps_its_value(cluster, clients):
    """An object `d` holding quotes, slashes, control characters and non-ASCII text arrives as equal JSON."""
    client, = clients(1)
    data = {"url": "https://example.com/a?b=c", "q": "say \"hi\"\n", "u": "\u4e2d\u6587", "n": 2 ** 60}
    assert cluster.http("/v1/mesh/send", {"c": client.client_id, "d": data}) == (200, {"E": None, "r": {"s": True}})
    opcode, received = client.recv_frame()
    assert opcode == websocket.ABNF.OPCODE_TEXT
    assert json.loads(received.decode("utf-8")) == data


def test_send_binary_delivers_decoded_bytes(cluster, clients):
    """`t: "binary"` with base64 `d` gives the client a binary frame holding the decoded bytes."""
    client, = clients(1)
    payload = bytes(range(256)) + b"\x00\xff"
    status, body = cluster.http("/v1/mesh/send", {"c": client.client_id, "t": "binary",
                                                  "d": base64.b64encode(payload).decode()})
    assert (status, body) == (200, {"E": None, "r": {"s": True}})
    assert client.recv_frame() == (websocket.ABNF.OPCODE_BINARY, payload)


def test_send_empty_text_and_empty_binary(cluster, clients):
    """An empty string and empty base64 are valid data and arrive as empty frames."""
    client, = clients(1)
    assert cluster.http("/v1/mesh/send", {"c": client.client_id, "d": ""})[0] == 200
    assert client.recv_frame() == (websocket.ABNF.OPCODE_TEXT, b"")
    assert cluster.http("/v1/mesh/send", {"c": client.client_id, "d": "", "t": "binary"})[0] == 200
    assert client.recv_frame() == (websocket.ABNF.OPCODE_BINARY, b"")


# --- mesh/send: delivery failure -----------------------------------------------

def test_send_to_closed_client_is_401_with_status_200(cluster, clients):
    """Sending to a client that has disconnected is a 200 carrying E.c 401 and no result."""
    client, = clients(1)
    client.ws.close()

    def failed():
        status, body = cluster.http("/v1/mesh/send", {"c": client.client_id, "d": "late"})
        return (status, body) if body["E"] is not None else None

    assert_error(wait_until(failed, what="send to a closed client to fail"), 401, http_status=200,
                 mentions=client.client_id)


@pytest.mark.parametrize("client_id", [UNKNOWN_ID, "0", int(UNKNOWN_ID), str(2 ** 64 - 1)])
def test_send_to_never_connected_client_is_401(cluster, client_id):
    """A well-formed client id that no live connection holds is a 200 carrying E.c 401."""
    assert_error(cluster.http("/v1/mesh/send", {"c": client_id, "d": "nobody"}), 401, http_status=200,
                 mentions=str(client_id))


# --- mesh/publish: success ------------------------------------------------------

def test_publish_reaches_every_subscriber(cluster, api, clients):
    """A publish reaches all subscribers in the mesh once each and counts them in `s`."""
    ch = channel()
    subscribers = clients(5)
    for client in subscribers:
        subscribe(api, client, ch)
    assert cluster.http("/v1/mesh/publish", {"c": ch, "d": "news"}) == (200, {"E": None, "r": {"s": 5, "f": 0}})
    for client in subscribers:
        assert client.recv_frame() == (websocket.ABNF.OPCODE_TEXT, b"news")


def test_publish_json_object_and_binary(cluster, api, clients):
    """Publish sends an object `d` as compact JSON text and binary `d` as decoded bytes."""
    ch = channel()
    client, = clients(1)
    subscribe(api, client, ch)
    data = {"k": [1, 2], "v": "x"}
    assert cluster.http("/v1/mesh/publish", {"c": ch, "d": data}) == (200, {"E": None, "r": {"s": 1, "f": 0}})
    assert client.recv_frame() == (websocket.ABNF.OPCODE_TEXT, compact(data).encode())
    payload = b"\x00\x01binary\xfe\xff"
    status, body = cluster.http("/v1/mesh/publish", {"c": ch, "t": "binary", "d": base64.b64encode(payload).decode()})
    assert (status, body) == (200, {"E": None, "r": {"s": 1, "f": 0}})
    assert client.recv_frame() == (websocket.ABNF.OPCODE_BINARY, payload)


def test_publish_channel_list_delivers_once_per_connection(cluster, api, clients):
    """With a list of channels, a client subscribed to two of them receives the message once."""
    ch1, ch2, ch3, unused = channel(), channel(), channel(), channel()
    both, other = clients(2)
    subscribe(api, both, ch1, ch2)
    subscribe(api, other, ch3)
    status, body = cluster.http("/v1/mesh/publish", {"c": [ch1, ch2, ch3, unused], "d": "once"})
    assert (status, body) == (200, {"E": None, "r": {"s": 2, "f": 0}})
    assert both.recv_frame() == (websocket.ABNF.OPCODE_TEXT, b"once")
    assert other.recv_frame() == (websocket.ABNF.OPCODE_TEXT, b"once")
    # A later send is the next frame: no second copy was written in between.
    assert cluster.http("/v1/mesh/send", {"c": both.client_id, "d": "after"})[0] == 200
    assert both.recv_frame() == (websocket.ABNF.OPCODE_TEXT, b"after")


def test_publish_without_subscriber_is_zero_zero(cluster):
    """A publish to a channel nobody subscribes to is s:0, f:0 and not an error."""
    assert cluster.http("/v1/mesh/publish", {"c": channel(), "d": "void"}) == (200, {"E": None, "r": {"s": 0, "f": 0}})
    assert cluster.http("/v1/mesh/publish", {"c": [channel(), channel()], "d": "void"}) == \
        (200, {"E": None, "r": {"s": 0, "f": 0}})


@pytest.mark.parametrize("name", ["x" * 255, "\u00e9" * 127 + "x", "a.b:c/d-\u4e2d"],
                         ids=["255-ascii", "255-bytes-utf8", "punctuation"])
def test_publish_channel_name_at_limit(cluster, api, clients, name):
    """A channel name of exactly 255 bytes (or with punctuation) is valid end to end."""
    client, = clients(1)
    subscribe(api, client, name)
    assert cluster.http("/v1/mesh/publish", {"c": name, "d": "edge"}) == (200, {"E": None, "r": {"s": 1, "f": 0}})
    assert client.recv_frame() == (websocket.ABNF.OPCODE_TEXT, b"edge")


# --- bad input ---------------------------------------------------------------------

def _bad_body_cases():
    """(path, body or raw bytes, field) for every invalid request body: all are 101 / 400."""
    cases = []
    for path in ("/v1/mesh/send", "/v1/mesh/publish"):
        kind = path.rsplit("/", 1)[1]
        target = UNKNOWN_ID if kind == "send" else "news"
        cases += [
            (path, b"not json", "body", f"{kind}-non-json"),
            (path, b"{\"c\": ", "body", f"{kind}-truncated-json"),
            (path, b"", "body", f"{kind}-empty-body"),
            (path, b"{\"c\": \"x\", \"d\": \"y\"} trailing", "body", f"{kind}-trailing-data"),
            (path, [{"c": target, "d": "x"}], "body", f"{kind}-array-body"),
            (path, "text", "body", f"{kind}-string-body"),
            (path, None, "body", f"{kind}-null-body"),
            (path, {}, "c", f"{kind}-empty-object"),
            (path, {"d": "x"}, "c", f"{kind}-missing-c"),
            (path, {"c": target}, "d", f"{kind}-missing-d"),
            (path, {"c": target, "d": 5}, "d", f"{kind}-d-number"),
            (path, {"c": target, "d": 1.5}, "d", f"{kind}-d-float"),
            (path, {"c": target, "d": True}, "d", f"{kind}-d-bool"),
            (path, {"c": target, "d": None}, "d", f"{kind}-d-null"),
            (path, {"c": target, "d": "x", "t": "html"}, "t", f"{kind}-t-unknown"),
            (path, {"c": target, "d": "x", "t": "TEXT"}, "t", f"{kind}-t-uppercase"),
            (path, {"c": target, "d": "x", "t": None}, "t", f"{kind}-t-null"),
            (path, {"c": target, "d": "x", "t": 1}, "t", f"{kind}-t-number"),
            (path, {"c": target, "d": "x", "t": ["text"]}, "t", f"{kind}-t-list"),
            (path, {"c": target, "d": "!!!!", "t": "binary"}, "d", f"{kind}-base64-bad-chars"),
            (path, {"c": target, "d": "YWI", "t": "binary"}, "d", f"{kind}-base64-no-padding"),
            (path, {"c": target, "d": "YQ", "t": "binary"}, "d", f"{kind}-base64-no-padding-2"),
            (path, {"c": target, "d": "-_-_", "t": "binary"}, "d", f"{kind}-base64-urlsafe"),
            (path, {"c": target, "d": "YWJj=", "t": "binary"}, "d", f"{kind}-base64-excess-padding"),
            (path, {"c": target, "d": "YWI==", "t": "binary"}, "d", f"{kind}-base64-excess-padding-2"),
            (path, {"c": target, "d": "YWJj\n", "t": "binary"}, "d", f"{kind}-base64-newline"),
            (path, {"c": target, "d": 5, "t": "binary"}, "d", f"{kind}-binary-d-number"),
            (path, {"c": target, "d": {"a": 1}, "t": "binary"}, "d", f"{kind}-binary-d-object"),
        ]
    send = "/v1/mesh/send"
    cases += [
        (send, {"c": str(2 ** 64), "d": "x"}, "c", "send-c-out-of-range-string"),
        (send, {"c": 2 ** 64, "d": "x"}, "c", "send-c-out-of-range-int"),
        (send, {"c": "9" * 30, "d": "x"}, "c", "send-c-huge-string"),
        (send, {"c": "-1", "d": "x"}, "c", "send-c-negative-string"),
        (send, {"c": -1, "d": "x"}, "c", "send-c-negative-int"),
        (send, {"c": 1.5, "d": "x"}, "c", "send-c-float"),
        (send, {"c": 1.0, "d": "x"}, "c", "send-c-float-integral"),
        (send, {"c": "1.5", "d": "x"}, "c", "send-c-float-string"),
        (send, {"c": "abc", "d": "x"}, "c", "send-c-non-numeric"),
        (send, {"c": "12a", "d": "x"}, "c", "send-c-trailing-letter"),
        (send, {"c": " 12", "d": "x"}, "c", "send-c-leading-space"),
        (send, {"c": "0x1f", "d": "x"}, "c", "send-c-hex"),
        (send, {"c": "", "d": "x"}, "c", "send-c-empty"),
        (send, {"c": True, "d": "x"}, "c", "send-c-bool"),
        (send, {"c": None, "d": "x"}, "c", "send-c-null"),
        (send, {"c": [1], "d": "x"}, "c", "send-c-list"),
        (send, {"c": {"id": 1}, "d": "x"}, "c", "send-c-object"),
    ]
    publish = "/v1/mesh/publish"
    cases += [
        (publish, {"c": "", "d": "x"}, "c", "publish-c-empty"),
        (publish, {"c": "a b", "d": "x"}, "c", "publish-c-space"),
        (publish, {"c": "a\tb", "d": "x"}, "c", "publish-c-tab"),
        (publish, {"c": "a\nb", "d": "x"}, "c", "publish-c-newline"),
        (publish, {"c": "a\x00b", "d": "x"}, "c", "publish-c-nul"),
        (publish, {"c": "a\x7fb", "d": "x"}, "c", "publish-c-del"),
        (publish, {"c": "x" * 256, "d": "x"}, "c", "publish-c-256-bytes"),
        (publish, {"c": "\u00e9" * 128, "d": "x"}, "c", "publish-c-256-bytes-utf8"),
        (publish, {"c": [], "d": "x"}, "c", "publish-c-empty-list"),
        (publish, {"c": ["ok", ""], "d": "x"}, "c", "publish-c-list-empty-name"),
        (publish, {"c": ["ok", "a b"], "d": "x"}, "c", "publish-c-list-space"),
        (publish, {"c": ["ok", "x" * 256], "d": "x"}, "c", "publish-c-list-256-bytes"),
        (publish, {"c": ["ok", 5], "d": "x"}, "c", "publish-c-list-number"),
        (publish, {"c": 5, "d": "x"}, "c", "publish-c-number"),
        (publish, {"c": True, "d": "x"}, "c", "publish-c-bool"),
        (publish, {"c": None, "d": "x"}, "c", "publish-c-null"),
        (publish, {"c": {"name": "x"}, "d": "x"}, "c", "publish-c-object"),
    ]
    return [pytest.param(path, body, field, id=case_id) for path, body, field, case_id in cases]


@pytest.mark.parametrize("path,body,field", _bad_body_cases())
def test_bad_input_is_101_naming_the_field(cluster, path, body, field):
    """Each invalid body is 101 with status 400 and a message naming the offending field."""
    if isinstance(body, bytes):
        status, reply = cluster.http(path, raw=body)
    else:
        status, reply = cluster.http(path, raw=json.dumps(body).encode())
    assert_error((status, reply), 101, field)


@pytest.mark.parametrize("path", ["/v1/mesh/send", "/v1/mesh/publish"])
def test_body_over_max_body_is_103(cluster, path):
    """A body one byte over node.api.max_body is 103 with status 400, naming the body."""
    head = json.dumps({"c": UNKNOWN_ID if path.endswith("send") else "news", "d": ""})[:-2]
    raw = (head + "x" * (MAX_BODY - len(head) - 1) + "\"}").encode()
    assert len(raw) == MAX_BODY + 1
    status, reply = cluster.http(path, raw=raw)
    assert_error((status, reply), 103, "body")


@pytest.mark.parametrize("size,code", [(2 * MAX_BODY, 103), (100, 200)], ids=["over", "small"])
def test_chunked_body_is_measured_as_it_arrives(cluster, size, code):
    """A chunked body (no Content-Length) over node.api.max_body is 103; a small one is served."""
    body = json.dumps({"c": channel(), "d": "x" * size}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", cluster.api_port, timeout=10)
    try:
        conn.request("POST", "/v1/mesh/publish", body=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = conn.getresponse()
        status, reply = response.status, json.loads(response.read())
    finally:
        conn.close()
    if code == 103:
        assert_error((status, reply), 103, "body")
    else:
        assert (status, reply) == (200, {"E": None, "r": {"s": 0, "f": 0}})


def test_body_of_exactly_max_body_is_accepted(cluster):
    """A body of exactly node.api.max_body bytes is served."""
    head = json.dumps({"c": channel(), "d": ""})[:-2]
    raw = (head + "x" * (MAX_BODY - len(head) - 2) + "\"}").encode()
    assert len(raw) == MAX_BODY
    assert cluster.http("/v1/mesh/publish", raw=raw) == (200, {"E": None, "r": {"s": 0, "f": 0}})


def test_missing_content_type_is_tolerated(cluster):
    """A body sent without any Content-Type header is still read as JSON."""
    body = json.dumps({"c": channel(), "d": "x"}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", cluster.api_port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/mesh/publish", skip_accept_encoding=True)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (200, {"E": None, "r": {"s": 0, "f": 0}})
    finally:
        conn.close()


@pytest.mark.parametrize("path", ["/v1/nope", "/", "/v1/mesh", "/v1/mesh/send/extra", "/v2/mesh/send"])
def test_unknown_path_is_404_with_101(cluster, path):
    """An unknown path is 404 with an error envelope 101 whose message names the path."""
    assert_error(cluster.http(path, {"c": "news", "d": "x"}), 101, http_status=404, mentions=path)


@pytest.mark.parametrize("method,path", [("GET", "/v1/mesh/send"), ("PUT", "/v1/mesh/send"),
                                         ("DELETE", "/v1/mesh/send"), ("GET", "/v1/mesh/publish"),
                                         ("PATCH", "/v1/mesh/publish")])
def test_wrong_method_is_405_with_101(cluster, method, path):
    """A method other than POST is 405 with an error envelope 101 naming the method."""
    body = None if method in ("GET", "DELETE") else {"c": UNKNOWN_ID, "d": "x"}
    assert_error(cluster.http(path, body, method=method), 101, http_status=405, mentions=method)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_body_types_a_browser_sends_freely_are_refused(cluster, content_type):
    """Form and text/plain bodies (which any web page can send) are 400/101 naming Content-Type."""
    reply = cluster.http("/v1/mesh/publish", raw=b'{"c": "ch", "d": "x"}', headers={"Content-Type": content_type})
    assert assert_error(reply, 101).startswith("Content-Type:")


def test_json_content_type_with_charset_is_accepted(cluster):
    """application/json with a charset parameter is fine."""
    status, body = cluster.http("/v1/mesh/publish", raw=b'{"c": "ch", "d": "x"}',
                                headers={"Content-Type": "application/json; charset=utf-8"})
    assert (status, body) == (200, {"E": None, "r": {"s": 0, "f": 0}})


# --- one connection, many requests (the lean path and the handlers take turns) -------------

def _raw_request(body: bytes, path: str = "/v1/mesh/publish", version: str = "HTTP/1.1", headers: str = "") -> bytes:
    return (f"POST {path} {version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{headers}\r\n").encode() + body


def _read_responses(sock, count: int) -> list:
    """`(status, headers, body)` of `count` responses read off a raw socket (Content-Length bodies)."""
    data, responses = b"", []
    sock.settimeout(10)
    while len(responses) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            head = data[:end].decode("latin-1").split("\r\n")
            fields = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in head[1:]}
            size = int(fields["content-length"])
            if len(data) >= end + 4 + size:
                responses.append((int(head[0].split()[1]), fields, json.loads(data[end + 4:end + 4 + size])))
                data = data[end + 4 + size:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(responses)} responses"
        data += chunk
    return responses


def test_keep_alive_serves_many_requests_with_refusals_between(cluster):
    """One keep-alive connection: good requests, a refused Content-Type and a bad body between them, all answered."""
    conn = http.client.HTTPConnection("127.0.0.1", cluster.api_port, timeout=10)
    try:
        for n in range(60):
            if n == 20:
                conn.request("POST", "/v1/mesh/publish", b'{"c":"x","d":"y"}', {"Content-Type": "text/plain"})
                response = conn.getresponse()
                assert assert_error((response.status, json.loads(response.read())), 101).startswith("Content-Type")
                continue
            body = b'{"c": 5}' if n == 40 else json.dumps({"c": channel(), "d": f"m{n}"}).encode()
            conn.request("POST", "/v1/mesh/publish", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            reply = json.loads(response.read())
            if n == 40:
                assert_error((response.status, reply), 101, "c")
                continue
            assert (response.status, reply) == (200, {"E": None, "r": {"s": 0, "f": 0}})
            assert response.getheader("Content-Type") == "application/json"
            assert response.getheader("X-Meshgate-Node", "").isdigit()
            assert response.getheader("Date", "").endswith(" GMT")
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(cluster):
    """Three requests written at once on one connection: three responses, in the order asked."""
    import socket
    with socket.create_connection(("127.0.0.1", cluster.api_port), timeout=10) as sock:
        sock.sendall(_raw_request(json.dumps({"c": UNKNOWN_ID, "d": "x"}).encode(), "/v1/mesh/send")
                     + _raw_request(json.dumps({"c": channel(), "d": "x"}).encode())
                     + _raw_request(b'{"c": ""}'))
        first, second, third = _read_responses(sock, 3)
    assert (first[0], first[2]["E"]["c"]) == (200, 401)
    assert (second[0], second[2]) == (200, {"E": None, "r": {"s": 0, "f": 0}})
    assert (third[0], third[2]["E"]["c"]) == (400, 101)


def test_http_1_0_request_is_answered_then_closed(cluster):
    """An HTTP/1.0 request without keep-alive gets its response, then the server closes the connection."""
    import socket
    with socket.create_connection(("127.0.0.1", cluster.api_port), timeout=10) as sock:
        sock.sendall(_raw_request(json.dumps({"c": channel(), "d": "x"}).encode(), version="HTTP/1.0"))
        [(status, _, reply)] = _read_responses(sock, 1)
        assert (status, reply) == (200, {"E": None, "r": {"s": 0, "f": 0}})
        sock.settimeout(10)
        assert sock.recv(1) == b""


def test_a_request_that_arrives_a_byte_at_a_time_is_answered(cluster):
    """Head and body in many pieces (a slow network): read until whole, then answered, and the next one too."""
    import socket
    import time
    request = _raw_request(json.dumps({"c": channel(), "d": "x"}).encode())
    with socket.create_connection(("127.0.0.1", cluster.api_port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for n in range(len(request)):
            sock.sendall(request[n:n + 1])
            if n % 16 == 0:
                time.sleep(0.002)
        sock.sendall(request)
        first, second = _read_responses(sock, 2)
    assert first[0] == second[0] == 200 and first[2] == second[2] == {"E": None, "r": {"s": 0, "f": 0}}


def test_a_thousand_pipelined_requests_are_answered_in_order(cluster):
    """Written at once: every one answered, in order, with good and refused ones mixed."""
    import socket
    bodies = [b'{"c": ""}' if n % 7 == 3 else json.dumps({"c": channel(), "d": f"m{n}"}).encode() for n in range(1000)]
    with socket.create_connection(("127.0.0.1", cluster.api_port), timeout=10) as sock:
        sock.sendall(b"".join(_raw_request(body) for body in bodies))
        responses = _read_responses(sock, len(bodies))
    assert [status for status, _, _ in responses] == [400 if n % 7 == 3 else 200 for n in range(1000)]
    assert all(fields["x-meshgate-node"].isdigit() and fields["content-type"] == "application/json"
               for _, fields, _ in responses)


@pytest.mark.parametrize("value", ["close", "Close", "CLOSE"])
def test_connection_close_is_answered_with_it_then_closed(cluster, value):
    """In any case: header values of Connection are case-insensitive (RFC 9110, 7.6.1)."""
    import socket
    with socket.create_connection(("127.0.0.1", cluster.api_port), timeout=10) as sock:
        sock.sendall(_raw_request(json.dumps({"c": channel(), "d": "x"}).encode(), headers=f"Connection: {value}\r\n"))
        [(status, fields, reply)] = _read_responses(sock, 1)
        assert (status, fields["connection"], reply) == (200, "close", {"E": None, "r": {"s": 0, "f": 0}})
        assert sock.recv(1) == b""


@pytest.mark.parametrize("request_text", [
    b"GET /v1/nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"POST /v1/mesh/publish?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v1/mesh/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"POST /v1/mesh/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
])
def test_what_the_quick_reader_is_not_sure_of_goes_on_to_tornado_on_the_same_connection(cluster, request_text):
    """A good request, one the node's own reader leaves to Tornado (with every byte it read), then another
    good one: three answers on one connection, the middle one Tornado's."""
    import socket
    good = _raw_request(json.dumps({"c": channel(), "d": "x"}).encode())
    with socket.create_connection(("127.0.0.1", cluster.api_port), timeout=10) as sock:
        sock.sendall(good + request_text + good)
        first, middle, last = _read_responses(sock, 3)
    assert first[0] == last[0] == 200 and first[2] == last[2] == {"E": None, "r": {"s": 0, "f": 0}}
    assert middle[0] in (200, 400, 404) and "E" in middle[2] and middle[1]["x-meshgate-node"].isdigit()


def test_a_malformed_head_after_a_good_request_ends_the_connection_as_tornado_does(cluster):
    """A folded header line (RFC 9112 forbids them) is left to Tornado: 400, and the connection closes."""
    folded = b"POST /v1/mesh/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\n{}"
    _good_then_400_and_closed(cluster, folded)


def _good_then_400_and_closed(cluster, bad: bytes) -> None:
    """A good request then `bad` on one connection: 200, then Tornado's 400, then the node closes it."""
    import socket
    good = _raw_request(json.dumps({"c": channel(), "d": "x"}).encode())
    with socket.create_connection(("127.0.0.1", cluster.api_port), timeout=10) as sock:
        sock.sendall(good + bad)
        data = b""
        while chunk := sock.recv(65536):   # until the node closes: both answers may come in one read
            data += chunk
    end = data.index(b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ")
    length = int(data[:end].lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert data[end + 4 + length:].startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("length", [b"\xb2", b"1" * 19, b"1" * 5000, b"+2", b"2 2"])
def test_a_content_length_that_is_not_plain_digits_is_tornados_400_and_the_connection_ends(cluster, length):
    """A superscript digit (Unicode's isdigit, not int's), 19 digits (more than any max_body), thousands of
    digits (beyond what int reads), a sign, a space: never a number of bytes to read. After a good request
    on the same connection, the answer is 400 and the node closes it, as Tornado does with any head it
    cannot read."""
    _good_then_400_and_closed(cluster, b"POST /v1/mesh/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + length
                              + b"\r\n\r\n{}")
