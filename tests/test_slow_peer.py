"""A peer that does not answer (SIGSTOP): forwarded requests end within forward_timeout as 401 / f / 501."""

import os
import signal
import time
import uuid

import pytest

from conftest import WAIT, Cluster


def live_api(cluster, attempts: int = 30):
    """An API connection to a live node process.

    The kernel may hand a new connection to the frozen process, whose handshake
    is never answered (several times in a row, now and then): such an attempt
    gives up after 0.25 s (later ones wait longer, up to 1 s, in case a live
    process is just slow) and another is made, bounded in count and time.
    """
    deadline = time.monotonic() + 2 * WAIT
    for attempt in range(attempts):
        conn = cluster.api_with_timeout(min(1.0, 0.25 * (1 + attempt // 5)))
        if conn is not None:
            return conn
        if time.monotonic() > deadline:
            break
    raise AssertionError("no live node process accepted an API connection")


@pytest.fixture
def frozen(tmp_path):
    """A cluster whose node_timeout is long enough that a frozen node stays in the tables."""
    instance = Cluster(tmp_path, workers=3, node_timeout=30, forward_timeout=0.5)
    instance.start()
    stopped = []
    yield instance, stopped
    for pid in stopped:
        os.kill(pid, signal.SIGCONT)
    instance.stop()


def test_frozen_owner_gives_401_501_and_counted_failures(frozen):
    """send -> 401, conn.call -> 501, publish -> counted in f, each after about forward_timeout, never a hang."""
    cluster, stopped = frozen
    clients = cluster.clients(18, nodes=2)   # clients on the frozen node and on live ones
    victim = clients[0].node
    on_victim = [c for c in clients if c.node == victim]
    others = [c for c in clients if c.node != victim]
    channel = f"slow-{uuid.uuid4().hex[:6]}"
    api = cluster.api()
    for client in clients:
        assert api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": [channel]})["E"] is None
    pid = next(n["pid"] for n in cluster.status()["nodes"] if n["node_id"] == victim)
    api.ws.close()
    os.kill(pid, signal.SIGSTOP)
    stopped.append(pid)

    api = live_api(cluster)   # requests must land on a live node

    started = time.monotonic()
    reply = api.request("mesh.send", {"c": on_victim[0].client_id, "d": "x"})
    assert reply["E"]["c"] == 401 and "did not answer" in reply["E"]["m"]
    assert 0.4 < time.monotonic() - started < 0.5 + 1.0

    started = time.monotonic()
    reply = api.request("conn.call", {"c": on_victim[0].client_id, "f": "get_context"})
    assert reply["E"]["c"] == 501
    assert time.monotonic() - started < 0.5 + 1.0

    started = time.monotonic()
    reply = api.request("mesh.publish", {"c": channel, "d": "partial"})
    # f for a silent node is its subscriber count as last advertised (coalesced every few ms).
    assert reply["r"]["s"] == len(others) and 1 <= reply["r"]["f"] <= len(on_victim)
    assert time.monotonic() - started < 0.5 + 1.0
    for client in others:
        assert client.recv() == "partial"


def test_unanswered_bytes_to_a_frozen_peer_are_bounded(tmp_path):
    """Past 64 MiB of unanswered requests to one peer, more fail at once instead of piling up."""
    cluster = Cluster(tmp_path, workers=2, node_timeout=30, forward_timeout=8)
    cluster.start()
    pid = None
    try:
        clients = cluster.clients(12)
        victim = clients[0].node
        api = cluster.api()
        for client in clients:
            assert api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": ["big"]})["E"] is None
        api.ws.close()
        pid = next(n["pid"] for n in cluster.status()["nodes"] if n["node_id"] == victim)
        os.kill(pid, signal.SIGSTOP)
        publisher = live_api(cluster)
        chunk = "b" * 1_000_000
        started = time.monotonic()
        for index in range(80):
            publisher.send_raw('{"m": "mesh.publish", "i": %d, "p": {"c": "big", "d": "%s"}}' % (index, chunk))
        # Requests past the budget are answered at once, long before the 8 s forward timeout.
        early = publisher.reply_to(79, timeout=6)
        assert time.monotonic() - started < 6
        assert early["r"]["f"] >= 1
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
        cluster.stop()


def test_requests_in_flight_per_api_connection_are_bounded(tmp_path):
    """With 10000 requests of one /ws/v1 connection waiting on a frozen peer, one more is 501 at once."""
    cluster = Cluster(tmp_path, workers=2, node_timeout=30, forward_timeout=20)
    cluster.start()
    pid = None
    try:
        clients = cluster.clients(12)
        victim = clients[0]
        pid = next(n["pid"] for n in cluster.status()["nodes"] if n["node_id"] == victim.node)
        os.kill(pid, signal.SIGSTOP)
        api = live_api(cluster)
        request = '{"m": "conn.call", "i": %d, "p": {"c": "' + victim.client_id + '", "f": "get_context"}}'
        for index in range(10000):
            api.send_raw(request % index)
        api.send_raw(request % 10000)
        reply = api.reply_to(10000, timeout=15)
        assert reply["E"]["c"] == 501 and "10000 requests of this connection are still in flight" in reply["E"]["m"]
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
        cluster.stop()
