"""Failure behaviour (docs/operations.md): a node killed -9, the coordinator killed -9."""

import os
import signal
import time
import uuid

import psutil
import pytest

from conftest import Cluster, WAIT, assert_error, wait_until


@pytest.fixture
def crash_cluster(tmp_path):
    instance = Cluster(tmp_path, workers=3, node_timeout=1, forward_timeout=1)
    instance.start()
    yield instance
    instance.stop()


def _pid_of(cluster, node_id):
    return next(n["pid"] for n in cluster.status()["nodes"] if n["node_id"] == node_id)


def test_killed_node_is_replaced_and_its_clients_fail_fast(crash_cluster):
    """kill -9 of one node: sends to its clients answer 401 promptly, others are untouched, a new node joins."""
    clients = crash_cluster.clients(18, nodes=2)   # some clients survive the kill
    victim = clients[0].node
    doomed = [c for c in clients if c.node == victim]
    survivors = [c for c in clients if c.node != victim]
    nodes_before = {n["node_id"] for n in crash_cluster.status()["nodes"]}
    api = crash_cluster.api()
    channel = f"crash-{uuid.uuid4().hex[:6]}"
    for client in survivors:
        assert api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": [channel]})["E"] is None
    os.kill(_pid_of(crash_cluster, victim), signal.SIGKILL)

    started = time.monotonic()
    assert_error(crash_cluster.http("/v1/mesh/send", {"c": doomed[0].client_id, "d": "x"}), 401, http_status=200)
    assert time.monotonic() - started < 1 + 1.5, "send to a dead node's client hung"

    def victim_gone():
        return victim not in {n["node_id"] for n in crash_cluster.status()["nodes"]}
    wait_until(victim_gone, timeout=1 + 2.5, what="coordinator to drop the dead node")
    api = crash_cluster.api()   # the first one may have been on the killed node
    for client in doomed:
        started = time.monotonic()
        assert_error(crash_cluster.http("/v1/mesh/send", {"c": client.client_id, "d": "x"}), 401, http_status=200)
        assert time.monotonic() - started < 1.0
        assert_error(api.request("conn.call", {"c": client.client_id, "f": "get_context"}, req_id="gone"), 301,
                     req_id="gone")

    status, body = crash_cluster.http("/v1/mesh/publish", {"c": channel, "d": "still-here"})
    assert body["r"] == {"s": len(survivors), "f": 0}
    for client in survivors:
        assert client.recv() == "still-here"
        assert crash_cluster.http("/v1/mesh/send", {"c": client.client_id, "d": "direct"})[1]["r"] == {"s": True}
        assert client.recv() == "direct"

    status_doc = crash_cluster.wait_ready(3)
    assert victim not in {n["node_id"] for n in status_doc["nodes"]}
    [replacement] = {n["node_id"] for n in status_doc["nodes"]} - nodes_before
    fresh = crash_cluster.client_on({replacement})   # the kernel spreads connections; retried until one lands there
    assert crash_cluster.http("/v1/mesh/send", {"c": fresh.client_id, "d": "on the new node"})[1]["r"] == {"s": True}
    assert fresh.recv() == "on the new node"


def test_coordinator_restart_keeps_the_mesh(crash_cluster):
    """kill -9 of the coordinator: the data plane keeps working, and after its restart nothing is lost."""
    clients = crash_cluster.clients(9)
    api = crash_cluster.api()
    channel = f"keep-{uuid.uuid4().hex[:6]}"
    for client in clients:
        assert api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": [channel]})["E"] is None
    consumer = crash_cluster.api()
    assert consumer.request("queue.pop", {"t": ["default"]})["E"] is None
    supervisor = psutil.Process(crash_cluster.process.pid)
    [coordinator] = [p for p in supervisor.children() if "coordinator" in p.cmdline()]
    nodes_before = {n["node_id"]: n["pid"] for n in crash_cluster.status()["nodes"]}
    coordinator.kill()
    coordinator.wait(timeout=WAIT)

    # Data plane on cached tables while the coordinator is away.
    for client in clients:
        assert crash_cluster.http("/v1/mesh/send", {"c": client.client_id, "d": "during"})[1]["r"] == {"s": True}
        assert client.recv() == "during"
    assert crash_cluster.http("/v1/mesh/publish", {"c": channel, "d": "pub-during"})[1]["r"]["s"] == len(clients)
    for client in clients:
        assert client.recv() == "pub-during"

    def restarted():
        try:
            status = crash_cluster.status()
        except OSError:
            return None
        return status if {n["node_id"]: n["pid"] for n in status["nodes"]} == nodes_before else None
    wait_until(restarted, timeout=WAIT * 2, what="nodes to re-register with their ids")
    # Their full state came back with them (figures follow with each node's next heartbeat).
    wait_until(lambda: crash_cluster.status()["coordinator"]["channels"] >= 1, what="interest re-sent")
    wait_until(lambda: crash_cluster.status()["totals"]["clients"] >= len(clients), what="client counts re-sent")
    # Subscriptions and consumers survived the restart.
    assert crash_cluster.http("/v1/mesh/publish", {"c": channel, "d": "after"})[1]["r"] == {"s": len(clients), "f": 0}
    for client in clients:
        assert client.recv() == "after"
        client.ws.send(f"up-{client.client_id}")
    got = {consumer.event()["p"]["d"]["frame"]["data"] for _ in clients}
    assert got == {f"up-{c.client_id}" for c in clients}
    # A new node can join again.
    victim = clients[0].node
    os.kill(nodes_before[victim], signal.SIGKILL)
    wait_until(lambda: victim not in {n["node_id"] for n in crash_cluster.status()["nodes"]}, what="drop")
    crash_cluster.wait_ready(3)
