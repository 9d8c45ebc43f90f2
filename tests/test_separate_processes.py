"""`meshgate coordinator` and `meshgate node` run apart, as on several machines (here: one, on loopback)."""

import signal
import subprocess

import pytest

from conftest import MESHGATE, WAIT, Cluster, stop_all, wait_until


@pytest.fixture
def split(tmp_path):
    """A coordinator and two `meshgate node` groups (2 + 1 node processes) started by separate commands."""
    layout = Cluster(tmp_path, workers=2, key_file=True)   # apart, they share a key file
    layout.process = None
    log = open(tmp_path / "split.log", "wb")
    config = str(layout.config_path)
    processes = [subprocess.Popen([MESHGATE, "coordinator", "-c", config], stdout=log, stderr=subprocess.STDOUT)]
    processes.append(subprocess.Popen([MESHGATE, "node", "-c", config, "--workers", "2",
                                       "--coordinator", f"127.0.0.1:{layout.registry_port}"],
                                      stdout=log, stderr=subprocess.STDOUT))
    processes.append(subprocess.Popen([MESHGATE, "node", "-c", config, "--workers", "1"],
                                      stdout=log, stderr=subprocess.STDOUT))
    layout.log_path = tmp_path / "split.log"

    def three_nodes():
        try:
            return len(layout.status()["nodes"]) == 3
        except OSError:
            return False
    try:
        wait_until(three_nodes, what="3 nodes from two `meshgate node` commands")
        yield layout, processes
    finally:
        for ws in layout._open:   # clients first, so draining nodes need not wait for them
            ws.close()
        stop_all(processes)
        log.close()


def test_nodes_started_apart_form_one_mesh(split):
    """Clients of every node process are reached through any API request; one consumer hears them all."""
    cluster, processes = split
    clients = cluster.clients(18, nodes=3)
    assert len({c.node for c in clients}) == 3
    api = cluster.api()
    for client in clients:
        assert api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": ["apart"]})["E"] is None
    status, body = cluster.http("/v1/mesh/publish", {"c": "apart", "d": "one mesh"})
    assert body["r"] == {"s": len(clients), "f": 0}
    for client in clients:
        assert client.recv() == "one mesh"


def test_stopping_one_node_group_leaves_the_rest(split):
    """SIGTERM to one `meshgate node` stops its processes (clients closed 1001); the others go on."""
    cluster, processes = split
    clients = cluster.clients(18, nodes=3)   # clients on the stopped group and on the others
    status = cluster.status()
    single = processes[2]
    import psutil
    pids = {child.pid for child in psutil.Process(single.pid).children()}
    gone = {n["node_id"] for n in status["nodes"] if n["pid"] in pids}
    assert len(gone) == 1
    single.send_signal(signal.SIGTERM)
    for client in clients:
        if client.node in gone:
            assert client.close_code() == 1001
    assert single.wait(timeout=WAIT) == 0
    wait_until(lambda: len(cluster.status()["nodes"]) == 2, what="the stopped node to leave at once")
    for client in clients:
        if client.node not in gone:
            assert cluster.http("/v1/mesh/send", {"c": client.client_id, "d": "still"})[1]["r"] == {"s": True}
            assert client.recv() == "still"
