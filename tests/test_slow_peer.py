"""A peer that does not answer (SIGSTOP): forwarded requests end within forward_timeout as 401 / f / 501."""

import json
import os
import signal
import time
import uuid

import pytest

from cluster.protocol import encode_ws_frame
from conftest import Cluster, assert_error, live_api


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
    reply = api.request("mesh.send", {"c": on_victim[0].client_id, "d": "x"}, req_id="send")
    assert_error(reply, 401, req_id="send", mentions="did not answer")
    assert 0.4 < time.monotonic() - started < 0.5 + 1.0

    started = time.monotonic()
    reply = api.request("conn.call", {"c": on_victim[0].client_id, "f": "get_context"}, req_id="call")
    assert_error(reply, 501, req_id="call")
    assert time.monotonic() - started < 0.5 + 1.0

    started = time.monotonic()
    reply = api.request("mesh.publish", {"c": channel, "d": "partial"})
    # f for a silent node is its subscriber count as last advertised (coalesced every few ms).
    assert reply["r"]["s"] == len(others) and 1 <= reply["r"]["f"] <= len(on_victim)
    assert time.monotonic() - started < 0.5 + 1.0
    for client in others:
        assert client.recv() == "partial"


def test_unanswered_bytes_to_a_frozen_peer_are_bounded(tmp_path):
    """Requests to a silent peer wait up to node.mesh.max_pending_bytes; past it, the next one fails at once."""
    data = "b" * 4092
    request_bytes = len(encode_ws_frame(data.encode()))   # what a publish sends to each peer: the client frame
    cluster = Cluster(tmp_path, workers=2, node_timeout=30, forward_timeout=1,
                      mesh={"max_pending_bytes": 4 * request_bytes})
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
        started = time.monotonic()
        for index in range(5):
            publisher.send_raw(json.dumps({"m": "mesh.publish", "i": index, "p": {"c": "big", "d": data}}))
        # The fifth is past the budget: it is answered first, while the four within it wait for the peer
        # until the forward timeout.
        refused = publisher.reply_to(4)
        assert refused["r"]["f"] >= 1 and not publisher.replies, (refused, publisher.replies)
        for index in range(4):
            assert publisher.reply_to(index)["r"]["f"] >= 1
        assert time.monotonic() - started >= 1 - 0.05, "a request within the budget did not wait for the peer"
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
        cluster.stop()


def test_requests_in_flight_per_api_connection_are_bounded(tmp_path):
    """node.api.max_in_flight requests of one /ws/v1 connection may wait on a frozen peer; one more is 501 at once."""
    limit = 20
    cluster = Cluster(tmp_path, workers=2, node_timeout=30, forward_timeout=1, api={"max_in_flight": limit})
    cluster.start()
    pid = None
    try:
        clients = cluster.clients(12)
        victim = clients[0]
        pid = next(n["pid"] for n in cluster.status()["nodes"] if n["node_id"] == victim.node)
        os.kill(pid, signal.SIGSTOP)
        api = live_api(cluster)
        request = '{"m": "conn.call", "i": %d, "p": {"c": "' + victim.client_id + '", "f": "get_context"}}'
        for index in range(limit + 1):
            api.send_raw(request % index)
        # The one past the bound is answered first; the others wait for the peer until the forward timeout.
        refused = api.reply_to(limit)
        assert_error(refused, 501, req_id=limit, mentions=f"{limit} requests of this connection are still in flight")
        assert not api.replies, api.replies
        for index in range(limit):
            assert_error(api.reply_to(index), 501, req_id=index, mentions="did not answer within the forward timeout")
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
        cluster.stop()
