"""Client server limits: message size, idle timeout, write buffer bound, allowed origins."""

import socket
import time

import pytest
import websocket

from conftest import Cluster, WAIT, wait_until

ORIGIN = "http://good.example"


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    instance = Cluster(tmp_path_factory.mktemp("limits"), workers=2, server={
        "max_message_size": 1024, "read_timeout": 1, "write_buffer_limit": 65536, "allowed_origins": [ORIGIN]})
    instance.client_options = {"origin": ORIGIN}
    instance.start()
    yield instance
    instance.stop()


def test_message_of_exactly_max_size_is_accepted_and_one_more_byte_closes_1009(limited):
    """max_message_size: exactly the limit is delivered; one byte more closes the connection 1009."""
    consumer = limited.api()
    assert consumer.request("queue.pop", ["default"])["E"] is None
    client = limited.client()
    client.ws.send("x" * 1024)
    assert consumer.event()["p"]["d"]["frame"]["data"] == "x" * 1024
    client.ws.send("y" * 1025)
    assert client.close_code() == 1009
    assert consumer.no_event_for(0.3)
    consumer.ws.close()


def test_idle_client_is_closed_1001_after_read_timeout(limited):
    """A client that sends nothing for read_timeout is closed 1001; pings keep a client alive."""
    idle = limited.client()
    lively = limited.client()
    ponging = limited.client()
    started = time.monotonic()
    for _ in range(8):
        lively.ws.ping(b"k")
        ponging.ws.pong(b"k")   # unsolicited pongs are frames too (heartbeats)
        time.sleep(0.25)
    assert idle.close_code() == 1001
    assert 0.9 < time.monotonic() - started < 1 + 2.5
    for client in (lively, ponging):
        client.ws.ping(b"k")
        assert client.ws.connected and client.nothing_for(0.05)


def test_slow_client_over_its_write_buffer_is_closed_1008(limited):
    """A client that does not read is closed 1008 once its write buffer passes the limit, and it is counted."""
    [reader] = limited.clients(1)
    slow = limited.client(sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    # Learn the slow client's id by asking the mesh to subscribe every client we know of: use a channel.
    consumer = limited.api()
    assert consumer.request("queue.pop", ["default"])["E"] is None
    slow.ws.send("who-am-i")
    deadline = time.monotonic() + WAIT
    event = consumer.event()
    while event["p"]["d"]["frame"]["data"] != "who-am-i":   # skip what earlier tests left buffered
        event = consumer.event(max(deadline - time.monotonic(), 0.001))
    slow_id = event["p"]["c"]
    api = limited.api()
    for client_id in (slow_id, reader.client_id):
        assert api.request("conn.call", {"c": client_id, "f": "subscribe", "a": ["flood"]})["E"] is None
    chunk = "z" * 60000
    failed = 0
    for _ in range(200):
        # Both send a ping each round so read_timeout (1 s here) does not close them first.
        reader.ws.ping(b"k")
        slow.ws.ping(b"k")
        reply = api.request("mesh.publish", {"c": "flood", "d": chunk})
        failed += reply["r"]["f"]
        reader.recv()
        if failed:
            break
    assert failed >= 1, "the slow client was never refused"
    assert slow.close_code(timeout=WAIT) == 1008
    wait_until(lambda: limited.status()["totals"]["slow_closed"] >= 1, what="slow_closed counted")
    consumer.ws.close()


def test_origin_not_allowed_is_refused_403(limited):
    """With allowed_origins set, a handshake from another origin gets HTTP 403."""
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://127.0.0.1:{limited.client_port}/", origin="http://evil.example",
                                    timeout=WAIT)
    assert refused.value.status_code == 403
