"""Lifecycle events (docs/protocol.md, Lifecycle events): an open and a close message per connection, through
the queue path, the open always first."""

import os
import signal
import socket
import textwrap
import time

import pytest
import websocket

from cluster import config as config_module
from conftest import WAIT, Cluster, raw_upgrade, running

SLOW_OPEN_ENTRY = textwrap.dedent('''
    import asyncio

    async def on_open(conn):
        await asyncio.sleep(0.3)
        conn.set_context_value("seat", 7)

    def on_message(conn, frame):
        conn.send("echo " + frame["data"])
''')


@pytest.fixture(scope="module")
def life(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lifecycle")
    (folder / "slow_open.py").write_text(SLOW_OPEN_ENTRY)
    with running(Cluster(folder, workers=3, server={"lifecycle_topic": "life"},
                         extra_servers=[{"path": "/slow", "entry": "slow_open.py", "lifecycle_topic": "slow-life"},
                                        {"path": "/quiet"}])) as instance:
        yield instance


@pytest.fixture
def consume(life):
    """`consume(topics)`: a consumer of `topics`, the only one of them: closed after the test."""
    made = []

    def start(*topics):
        consumer = life.api()
        assert consumer.request("queue.pop", {"t": list(topics)})["E"] is None
        made.append(consumer)
        return consumer

    yield start
    for consumer in made:
        consumer.ws.close()


def events_of(consumer, count: int) -> list:
    return [consumer.event()["p"] for _ in range(count)]


def test_open_then_close_with_path_query_address_and_code(life, consume):
    consumer = consume("life")
    client = life.client("/?room=4")
    client.ws.close(status=4000, reason=b"bye now")
    opened, closed = events_of(consumer, 2)
    assert opened["t"] == closed["t"] == "life" and opened["c"] == closed["c"] and opened["n"] == closed["n"]
    assert opened["d"] == {"open": {"path": "/", "remote_addr": "127.0.0.1", "query": "room=4", "context": {}}}
    assert closed["d"] == {"close": {"code": 4000, "reason": "bye now", "lost": False}}


def test_a_server_close_and_a_dropped_connection(life, consume):
    consumer = consume("life")
    client = life.client("/")
    opened = consumer.event()["p"]
    assert consumer.request("conn.call", {"c": opened["c"], "f": "close", "a": [4001, "kicked"]})["E"] is None
    assert consumer.event()["p"]["d"] == {"close": {"code": 4001, "reason": "kicked", "lost": False}}
    sock, _ = raw_upgrade(life.client_port, "/")
    opened = consumer.event()["p"]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")   # a reset
    sock.close()
    closed = consumer.event()["p"]
    assert closed["c"] == opened["c"] and closed["d"] == {"close": {"code": 1006, "reason": "", "lost": False}}
    client.ws.close()


def test_the_open_waits_for_on_open_and_comes_before_a_quick_close(life, consume):
    """on_open takes 0.3 s and sets the context: the open message carries it, and a client that left during
    on_open still has its open before its close."""
    consumer = consume("slow-life")
    started = time.monotonic()
    client = life.client("/slow?x=y")
    client.ws.close()
    opened, closed = events_of(consumer, 2)
    assert time.monotonic() - started >= 0.29   # the loop clock may run a fraction of a millisecond behind
    assert opened["d"] == {"open": {"path": "/slow", "remote_addr": "127.0.0.1", "query": "x=y",
                                    "context": {"seat": 7}}}
    assert closed["c"] == opened["c"] and closed["d"]["close"]["lost"] is False


def test_every_open_has_one_close_on_every_node(life, consume):
    consumer = consume("life")
    clients = [life.client("/") for _ in range(30)]
    for client in clients:
        client.ws.close()
    seen = {}
    for event in events_of(consumer, 60):
        kind = next(iter(event["d"]))
        seen.setdefault(event["c"], []).append(kind)
    assert len(seen) == 30 and all(kinds == ["open", "close"] for kinds in seen.values()), seen
    assert consumer.no_event_for(0.3)


def test_a_server_without_lifecycle_topic_pushes_nothing(life, consume):
    consumer = consume("life", "slow-life")
    life.client("/quiet").ws.close()
    assert consumer.no_event_for(0.5)


@pytest.mark.parametrize("topic", ["", "a b", "x" * 256, 5])
def test_a_bad_lifecycle_topic_is_a_configuration_error(topic):
    with pytest.raises(config_module.ConfigError, match=r"node\.servers\[0\]\.lifecycle_topic"):
        config_module.from_dict({"node": {"servers": [{"lifecycle_topic": topic}]}})


def test_a_node_killed_has_a_lost_close_for_each_of_its_clients(life, consume):
    """kill -9 of the node holding 20 clients: within node_timeout + 1 s another node pushes one close with
    "lost": true for each of them, none twice, none for the clients of the other nodes."""
    consumer = consume("life")
    keep = int(consumer.ws.getheaders()["x-meshgate-node"])   # the consumer's node must live
    clients, node_of = [], {}
    for _ in range(300):   # the kernel spreads connections: connect until another node holds 20
        clients.append(life.client("/"))
        opened = consumer.event()["p"]
        node_of[opened["c"]] = opened["n"]
        held = {}
        for client_id, node in node_of.items():
            held.setdefault(node, []).append(client_id)
        victim = next((node for node, ids in held.items() if len(ids) >= 20 and node != keep), None)
        if victim is not None:
            break
    assert victim is not None, held
    time.sleep(0.1)   # the adverts of the last opens reach the coordinator (coalesced every 20 ms)
    pid = next(n["pid"] for n in life.status()["nodes"] if n["node_id"] == victim)
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    closes = {}
    while len(closes) < len(held[victim]) and time.monotonic() - started < 3 + 1:
        try:
            event = consumer.event(timeout=0.2)["p"]
        except (AssertionError, websocket.WebSocketTimeoutException):
            continue
        assert event["c"] not in closes, f"a second close for {event['c']}"
        closes[event["c"]] = event
    assert set(closes) == set(held[victim]) and time.monotonic() - started <= 3 + 1
    for event in closes.values():
        assert event["d"] == {"close": {"code": 1006, "reason": "node lost", "lost": True}} and event["n"] == victim
    assert consumer.no_event_for(0.5)   # nothing twice, nothing for the clients still connected
    for client in clients:
        client.ws.close()
