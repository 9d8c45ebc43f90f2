"""Mesh-wide behaviour with more node processes than cores: wherever the client, wherever the request."""

import json
import time
import uuid

import pytest
import websocket

from conftest import WAIT, wait_until


@pytest.fixture(scope="module")
def spread(cluster):
    """Clients on every node process (learned from the `n` of their queue events)."""
    return cluster.clients(24, nodes=cluster.workers)


def test_clients_spread_over_every_node(cluster, spread):
    """Every node process holds clients, and the status table counts them all."""
    status = cluster.status()
    assert {n["node_id"] for n in status["nodes"]} == {c.node for c in spread}
    wait_until(lambda: cluster.status()["totals"]["clients"] >= len(spread), what="client counts in status")


def test_http_requests_land_on_every_node(cluster):
    """The shared API port is served by every node process."""
    seen = set()
    for _ in range(60):
        status, body = cluster.http("/v1/mesh/publish", {"c": "nobody-here", "d": "x"})
        assert status == 200 and body == {"E": None, "r": {"s": 0, "f": 0}}
    import urllib.request
    for _ in range(60):
        request = urllib.request.Request(f"http://127.0.0.1:{cluster.api_port}/v1/mesh/publish",
                                         data=b'{"c":"nobody","d":"x"}', method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            seen.add(response.headers["X-Meshgate-Node"])
        if len(seen) == cluster.workers:
            break
    assert len(seen) == cluster.workers


def test_send_reaches_clients_on_every_node_from_any_node(cluster, spread):
    """mesh.send over HTTP (fresh connections, so any node answers) reaches every client."""
    for round_number in range(3):
        for client in spread:
            status, body = cluster.http("/v1/mesh/send", {"c": client.client_id, "d": f"to-{client.client_id}-{round_number}"})
            assert (status, body) == (200, {"E": None, "r": {"s": True}})
            assert client.recv() == f"to-{client.client_id}-{round_number}"


def test_conn_call_and_publish_mesh_wide(cluster, spread):
    """Subscribing clients of every node through one API connection; a publish reaches all of them once."""
    api = cluster.api()
    channel = f"room-{uuid.uuid4().hex[:6]}"
    for client in spread:
        reply = api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": [channel]})
        assert reply == {"E": None, "r": {"s": True}, "i": reply["i"]}
    status, body = cluster.http("/v1/mesh/publish", {"c": channel, "d": {"hello": "mesh"}})
    assert status == 200 and body["r"] == {"s": len(spread), "f": 0}
    for client in spread:
        assert json.loads(client.recv()) == {"hello": "mesh"}
    other = cluster.api()
    reply = other.request("mesh.publish", {"c": [channel, "unrelated"], "d": "again"})
    assert reply["r"] == {"s": len(spread), "f": 0}
    # Once each: that publish has been written everywhere when it replies, so a second copy would come
    # before the next one.
    assert other.request("mesh.publish", {"c": channel, "d": "next"})["r"] == {"s": len(spread), "f": 0}
    for client in spread:
        assert client.recv() == "again"
        assert client.recv() == "next"
    for client in spread:
        api.request("conn.call", {"c": client.client_id, "f": "unsubscribe", "a": [channel]})
    status, body = cluster.http("/v1/mesh/publish", {"c": channel, "d": "gone"})
    assert body["r"] == {"s": 0, "f": 0}


def test_context_is_kept_by_the_owner_node(cluster, spread):
    """set_context_value through one connection is read back through another, for clients of every node."""
    writer, reader = cluster.api(), cluster.api()
    for client in spread[:9]:
        assert writer.request("conn.call", {"c": client.client_id, "f": "set_context_value",
                                            "a": ["uid", client.client_id]})["E"] is None
        reply = reader.request("conn.call", {"c": int(client.client_id), "f": "get_context"})
        assert reply["r"] == {"s": True, "d": {"uid": client.client_id}}


def test_one_consumer_receives_from_every_node(cluster, spread):
    """A single consumer gets the messages of clients on every node process."""
    consumer = cluster.api()
    assert consumer.request("queue.pop", {"t": ["default"]})["E"] is None
    expected = {}
    for client in spread:
        marker = f"m-{uuid.uuid4().hex[:8]}"
        client.ws.send(marker)
        expected[marker] = client
    nodes = set()
    for _ in expected:
        event = consumer.event()
        client = expected[event["p"]["d"]["frame"]["data"]]
        assert event["p"]["c"] == client.client_id and event["p"]["n"] == client.node
        assert event["p"]["t"] == "default" and event["i"] is None
        nodes.add(event["p"]["n"])
    assert nodes == {c.node for c in spread}
    consumer.ws.close()


def test_two_consumers_split_a_topic_with_per_client_order(cluster, spread):
    """Each client's messages all go to one of two consumers, in the order it sent them."""
    first, second = cluster.api(), cluster.api()
    assert first.request("queue.pop", {"t": ["default"]})["E"] is None
    assert second.request("queue.pop", ["default"])["E"] is None
    # Consumer adverts reach the other nodes asynchronously. A node sends them to each peer on the same link
    # as, later, the advert of a channel's first local subscriber, which every peer acknowledges before
    # conn.call subscribe replies: once a client of every node process has joined a fresh channel, every
    # node knows both consumers.
    api, probe = cluster.api(), f"adverts-{uuid.uuid4().hex[:6]}"
    one_per_node = list({client.node: client for client in spread}.values())
    for client in one_per_node:
        assert api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": [probe]})["E"] is None
    per_client = 15
    for index in range(per_client):
        for client in spread:
            client.ws.send(f"{client.client_id}:{index}")
    received = {id(first): [], id(second): []}
    total = per_client * len(spread)
    deadline = time.monotonic() + WAIT
    while sum(len(v) for v in received.values()) < total and time.monotonic() < deadline:
        for consumer in (first, second):   # all that one consumer has, then the other's
            for _ in range(total):
                try:
                    event = consumer.event(0.05)
                except (AssertionError, websocket.WebSocketTimeoutException):
                    break
                received[id(consumer)].append(event["p"]["d"]["frame"]["data"])
    assert sum(len(v) for v in received.values()) == total
    owner = {}
    for consumer_key, messages in received.items():
        order = {}
        for message in messages:
            client_id, index = message.split(":")
            assert owner.setdefault(client_id, consumer_key) == consumer_key, "a client's messages were split"
            order.setdefault(client_id, []).append(int(index))
        for client_id, indexes in order.items():
            assert indexes == list(range(per_client)), f"client {client_id} out of order"
    assert all(received.values()), "one consumer got nothing"
    for client in one_per_node:
        assert api.request("conn.call", {"c": client.client_id, "f": "unsubscribe", "a": [probe]})["E"] is None
    first.ws.close()
    second.ws.close()


def test_subscribe_then_publish_never_misses(cluster, spread):
    """200 rounds of subscribe via one API connection then publish via another: no miss."""
    subscriber_apis = [cluster.api() for _ in range(3)]
    publisher_apis = [cluster.api() for _ in range(3)]
    for round_number in range(200):
        client = spread[round_number % len(spread)]
        channel = f"r{round_number}-{uuid.uuid4().hex[:6]}"
        sub = subscriber_apis[round_number % 3]
        pub = publisher_apis[(round_number // 3) % 3]
        assert sub.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": [channel]})["E"] is None
        reply = pub.request("mesh.publish", {"c": channel, "d": f"p{round_number}"})
        assert reply["r"] == {"s": 1, "f": 0}, f"round {round_number}: {reply}"
        assert client.recv() == f"p{round_number}"
        sub.request("conn.call", {"c": client.client_id, "f": "unsubscribe", "a": [channel]})
