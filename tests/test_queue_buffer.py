"""Topic buffers: messages wait for a consumer, oldest first, bounded by topic_size."""

import pytest

from conftest import Cluster, wait_until


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory):
    instance = Cluster(tmp_path_factory.mktemp("buffer"), workers=2, queue={"topic_size": 5, "max_topics": 2})
    instance.start()
    yield instance
    instance.stop()


def _node_figure(cluster, node_id, name):
    return next(n[name] for n in cluster.status()["nodes"] if n["node_id"] == node_id)


def test_messages_wait_for_a_consumer_and_overflow_is_dropped_and_counted(small_cluster):
    """Pushed before any consumer: the first topic_size wait (oldest first), the extra ones are dropped and counted."""
    [client] = small_cluster.clients(1)
    for index in range(8):
        client.ws.send(f"early-{index}")
    # Both figures come from one heartbeat, which may be taken while the eight are still arriving.
    wait_until(lambda: [_node_figure(small_cluster, client.node, name) for name in ("queue_depth", "queue_dropped")]
               == [5, 3], what="5 buffered and 3 dropped")
    consumer = small_cluster.api()
    consumer.send_raw('{"m": "queue.pop", "p": {"t": "default"}, "i": "pop"}')
    assert consumer.read() == {"E": None, "r": {"s": True}, "i": "pop"}, "the reply comes before the events"
    got = [consumer.event()["p"]["d"]["frame"]["data"] for _ in range(5)]
    assert got == [f"early-{index}" for index in range(5)]
    assert consumer.no_event_for(0.3)
    client.ws.send("live")
    assert consumer.event()["p"]["d"]["frame"]["data"] == "live"
    wait_until(lambda: _node_figure(small_cluster, client.node, "queue_depth") == 0, what="buffer drained")
    consumer.ws.close()


def test_buffer_waits_again_after_the_consumer_leaves(small_cluster):
    """When the last consumer stops, new messages wait again and go to the next consumer."""
    [client] = small_cluster.clients(1)
    consumer = small_cluster.api()
    assert consumer.request("queue.pop", {"t": ["default"]})["E"] is None
    assert consumer.request("queue.unpop", {})["E"] is None
    assert consumer.request("queue.unpop", {})["r"] == {"s": True}   # idempotent
    client.ws.send("while-nobody-listens")
    wait_until(lambda: _node_figure(small_cluster, client.node, "queue_depth") == 1, what="1 buffered")
    other = small_cluster.api()
    assert other.request("queue.pop", ["default"])["E"] is None
    event = other.event()
    assert event["p"]["d"]["frame"]["data"] == "while-nobody-listens"
    assert event["p"]["c"] == client.client_id
    consumer.ws.close()
    other.ws.close()
