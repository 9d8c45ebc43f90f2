"""Hostile client input on a client server: slow or oversized handshakes, too many connections, fragments,
bad frames and floods, each broken by a real client (frames built by hand) against a one-process cluster."""

import os
import socket
import struct
import time

import pytest
import websocket

from conftest import SCALE, WAIT, Cluster, wait_until

MAX_MESSAGE = 1024


def frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """One client frame, built by hand (RFC 6455, section 5.2)."""
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    header = bytes([(0x80 if fin else 0) | rsv | opcode])
    if length < 126:
        header += bytes([mask_bit | length])
    elif length < 65536:
        header += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        header += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if not masked:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    instance = Cluster(tmp_path_factory.mktemp("hostile"), workers=1, server={
        "max_message_size": MAX_MESSAGE, "read_timeout": 1, "handshake_timeout": 1, "max_header_size": 2048,
    }, extra_servers=[
        {"path": "/few", "topic": "few", "max_connections": 2, "max_header_size": 1024, "handshake_timeout": 0.3},
        {"path": "/rated", "topic": "rated", "max_header_size": 2048, "rate_limit": {"rate": 5, "burst": 5}},
    ])
    instance.start()
    yield instance
    instance.stop()


def connect(cluster: Cluster, path: str, **options) -> websocket.WebSocket:
    ws = websocket.create_connection(f"ws://127.0.0.1:{cluster.client_port}{path}", timeout=WAIT, **options)
    cluster._open.append(ws)
    return ws


def alive(ws: websocket.WebSocket) -> bool:
    """True when the connection answers a ping with a pong."""
    ws.ping(b"alive?")
    ws.settimeout(WAIT)
    opcode, _ = ws.recv_data_frame(True)
    return opcode == websocket.ABNF.OPCODE_PONG


def assert_serving(cluster: Cluster) -> None:
    """The node process still takes new connections and answers them."""
    client = cluster.client()
    assert alive(client.ws)
    client.ws.close()


def logged(cluster: Cluster, text: str) -> bool:
    return wait_until(lambda: text in cluster.logs(), what=f"the log to say {text!r}")


def ping_until_closed(ws: websocket.WebSocket, seconds: float, others=()):
    """Pings `ws` (and `others`) every 0.2 s until the server closes `ws`; returns the close code and when."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for other in others:
            other.ping(b"k")
        ws.ping(b"k")
        ws.settimeout(0.2)
        try:
            while True:
                opcode, data = ws.recv_data_frame(True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    return struct.unpack("!H", data.data[:2])[0], time.monotonic() - started
        except websocket.WebSocketTimeoutException:
            pass
    raise AssertionError(f"not closed within {seconds} s")


# --- the handshake ------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"], ids=["silent", "half-request"])
def test_handshake_not_finished_within_handshake_timeout_is_closed(hostile, sent):
    """A connection that has not sent its whole upgrade request within the port's handshake_timeout is closed."""
    with socket.create_connection(("127.0.0.1", hostile.client_port), timeout=WAIT) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        assert sock.recv(1024) == b""
        elapsed = time.monotonic() - started
    assert 0.25 < elapsed < 0.3 + 0.5 * SCALE   # the port's smallest handshake_timeout (0.3 s), not read_timeout (1 s)
    assert_serving(hostile)


def test_headers_over_the_port_max_header_size_are_refused_without_an_answer(hostile):
    """Request headers over the port's max_header_size: the connection is closed unanswered, and logged."""
    request = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {'a' * 3000}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", hostile.client_port), timeout=WAIT) as sock:
        sock.sendall(request)
        try:
            answer = sock.recv(1024)
        except ConnectionResetError:
            answer = b""
    assert answer == b""
    logged(hostile, "not found within 2048 bytes")
    assert_serving(hostile)


def test_headers_over_a_smaller_server_max_header_size_get_431(hostile):
    """Headers within the port's bound but over the server's own max_header_size: HTTP 431; others accept them."""
    pad = ["X-Pad: " + "a" * 1200]
    connect(hostile, "/", header=pad).close()   # 2048 on /
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        connect(hostile, "/few", header=pad)
    assert refused.value.status_code == 431
    logged(hostile, "on /few: request headers over 1024 bytes (431)")
    connect(hostile, "/few").close()


def test_over_max_connections_a_handshake_gets_503_until_one_closes(hostile):
    """max_connections: refused handshakes hold no slot; one over the limit is 503; a close frees its slot."""
    for _ in range(3):   # plain GETs are refused (400) and must not keep a slot
        with socket.create_connection(("127.0.0.1", hostile.client_port), timeout=WAIT) as sock:
            sock.sendall(b"GET /few HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 400")
    first, second = connect(hostile, "/few"), connect(hostile, "/few")
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        connect(hostile, "/few")
    assert refused.value.status_code == 503
    logged(hostile, "on /few: 2 connections open (max_connections) (503)")
    assert alive(connect(hostile, "/"))   # another server of the port is not affected
    first.close()

    def accepted():
        try:
            return connect(hostile, "/few")
        except websocket.WebSocketBadStatusException:
            return None

    wait_until(accepted, what="the freed slot")
    assert alive(second)


# --- fragmented messages ------------------------------------------------------------------


def test_fragmented_message_with_pings_between_is_delivered_whole(hostile):
    """A message sent in three fragments, with a ping between them, reaches the topic as one message."""
    consumer = hostile.api()
    assert consumer.request("queue.pop", ["default"])["E"] is None
    client = hostile.client()
    client.ws.sock.sendall(frame(0x1, b"ab", fin=False) + frame(0x9, b"p") + frame(0x0, "c€".encode()[:2], fin=False)
                           + frame(0x0, "c€".encode()[2:]))
    deadline = time.monotonic() + WAIT
    data = consumer.event()["p"]["d"]["frame"]["data"]
    while data.startswith("hello-"):   # what a helper left buffered
        data = consumer.event(max(deadline - time.monotonic(), 0.001))["p"]["d"]["frame"]["data"]
    assert data == "abc€"
    consumer.ws.close()


def test_fragmented_message_over_max_message_size_closes_1009_before_it_ends(hostile):
    """Fragments count against max_message_size as they arrive: 600 + 600 bytes closes 1009, and it is logged."""
    client = hostile.client()
    client.ws.sock.sendall(frame(0x2, b"x" * 600, fin=False) + frame(0x0, b"y" * 600, fin=False))
    assert client.close_code() == 1009
    logged(hostile, "message too big (1009)")
    assert_serving(hostile)


def test_fragmented_message_not_complete_within_read_timeout_closes_1001_despite_pings(hostile):
    """An unfinished fragmented message is closed 1001 read_timeout after its first fragment; pings do not help."""
    client = hostile.client()
    pinging = hostile.client()
    client.ws.sock.sendall(frame(0x1, b"never", fin=False))
    code, elapsed = ping_until_closed(client.ws, 3 * WAIT, others=[pinging.ws])
    assert code == 1001 and 0.9 < elapsed < 1 + 2.0
    assert alive(pinging.ws)   # pings alone keep a connection open
    logged(hostile, "message not complete within read timeout (1001)")


# --- bad frames ------------------------------------------------------------------


@pytest.mark.parametrize("frames", [
    frame(0x1, b"\xc3\x28"),
    frame(0x1, "€".encode()[:2], fin=False) + frame(0x0, b"\x28"),
    frame(0x8, close_payload(1000, b"\xff")),
], ids=["text", "fragmented-text", "close-reason"])
def test_invalid_utf8_closes_1007(hostile, frames):
    """A text message (whole or in fragments) or a close reason that is not UTF-8 closes 1007."""
    client = hostile.client()
    client.ws.sock.sendall(frames)
    assert client.close_code() == 1007
    logged(hostile, "not UTF-8 (1007)")
    assert_serving(hostile)


VIOLATIONS = {
    "rsv1": (frame(0x1, b"hi", rsv=0x40), "reserved bits set"),
    "rsv3": (frame(0x2, b"hi", rsv=0x10), "reserved bits set"),
    "opcode-3": (frame(0x3, b"hi"), "unknown opcode 0x3"),
    "opcode-b": (frame(0xB), "unknown opcode 0xb"),
    "fragmented-ping": (frame(0x9, b"p", fin=False), "fragmented control frame"),
    "long-ping": (frame(0x9, b"p" * 126), "control frame over 125 bytes"),
    "unmasked": (frame(0x1, b"hi", masked=False), "unmasked client frame"),
    "continuation-first": (frame(0x0, b"hi"), "continuation frame without a message"),
    "text-inside-fragments": (frame(0x1, b"a", fin=False) + frame(0x1, b"b"), "new message before"),
    "close-one-byte": (frame(0x8, b"\x03"), "close frame of one byte"),
    "close-1005": (frame(0x8, close_payload(1005)), "close code 1005 not allowed"),
    "close-999": (frame(0x8, close_payload(999)), "close code 999 not allowed"),
}


@pytest.mark.parametrize("name", VIOLATIONS)
def test_protocol_violation_closes_1002(hostile, name):
    """Each protocol violation closes 1002, is logged with what it was, and the node goes on serving."""
    frames, what = VIOLATIONS[name]
    client = hostile.client()
    client.ws.sock.sendall(frames)
    assert client.close_code() == 1002
    logged(hostile, what)
    assert_serving(hostile)


# --- rate limit ------------------------------------------------------------------


def test_client_within_its_rate_limit_stays_open(hostile):
    """rate_limit {rate: 5, burst: 5}: a burst of 5, then a message and a ping after the bucket refilled."""
    ws = connect(hostile, "/rated")
    for _ in range(5):
        ws.send("burst")
    time.sleep(0.5)   # the bucket gains 2.5 tokens
    ws.send("again")
    assert alive(ws)   # the ping takes the second token


@pytest.mark.parametrize("flood", ["ping", "fragment"])
def test_pings_and_fragments_count_against_the_rate_limit(hostile, flood):
    """Every frame takes a token: a flood of pings or of empty fragments is closed 1008 like one of messages."""
    before = hostile.logs().count("rate limit (1008)")
    client = hostile.client("/rated")
    try:
        for _ in range(20):
            if flood == "ping":
                client.ws.ping(b"k")
            else:
                client.ws.sock.sendall(frame(0x1 if _ == 0 else 0x0, b"", fin=False))
    except (websocket.WebSocketConnectionClosedException, ConnectionError):
        pass
    assert client.close_code() in (1008, None)   # None: reset before the close frame was read (unread frames)
    wait_until(lambda: hostile.logs().count("rate limit (1008)") > before, what="the rate limit close logged")


def test_client_over_its_rate_limit_is_closed_1008(hostile):
    """A client that sends faster than its token bucket is closed 1008 `rate limit`, logged; others go on."""
    consumer = hostile.api()
    assert consumer.request("queue.pop", ["rated"])["E"] is None
    client = hostile.client("/rated")
    for index in range(20):
        client.ws.send(f"flood-{index}")
    assert client.close_code() == 1008 and client.close_reason == "rate limit"
    logged(hostile, "rate limit (1008)")
    received = []
    for _ in range(100):   # what an earlier test left buffered comes too
        try:
            received.append(consumer.event(0.3)["p"]["d"]["frame"]["data"])
        except (AssertionError, websocket.WebSocketTimeoutException):
            break
    assert 5 <= len([data for data in received if data.startswith("flood-")]) < 10   # the burst, and a few regained
    assert alive(connect(hostile, "/rated"))
    consumer.ws.close()
