"""The CLI: `meshgate status`, configuration errors at start, clean stop."""

import json
import signal
import subprocess
import time

import pytest

from conftest import MESHGATE, WAIT, Cluster, free_port


def _run(*args, timeout=WAIT):
    return subprocess.run([MESHGATE, *args], capture_output=True, text=True, timeout=timeout)


def test_status_prints_every_node(cluster):
    """`meshgate status` prints one row per node and a total, and exits 0."""
    cluster.clients(3)
    result = _run("status", "-c", str(cluster.config_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:6] == ["NODE", "HOST", "ADDRESS", "PID", "CPU%", "RSS"]
    node_ids = {n["node_id"] for n in cluster.status()["nodes"]}
    assert {int(line.split()[0]) for line in lines[1:-1]} == node_ids
    assert {line.split()[2] for line in lines[1:-1]} == {"127.0.0.1"}   # node.advertise
    assert lines[-1].startswith("TOTAL") and f"{len(node_ids)} nodes" in lines[-1]


@pytest.mark.parametrize("api_server, shown", [
    ("10.0.0.11:6789", "10.0.0.11"), ("web1.internal:6789", "web1.internal"), ("[fd00::11]:6789", "fd00::11"),
])
def test_status_address_column_is_the_advertised_host(api_server, shown):
    """ADDRESS is the host of each node's api_server (its node.advertise), IPv6 without brackets."""
    from cluster.cli import format_status
    figures = dict.fromkeys(("cpu", "rss", "clients", "channels", "consumers", "queue_depth", "in_rate", "out_rate"), 0)
    node = {"node_id": 7, "host": "web1", "pid": 42, "uptime": 1, "api_server": api_server, **figures}
    header, row, total = format_status({"nodes": [node], "totals": {"nodes": 1, **figures},
                                        "coordinator": {"uptime": 1}}).splitlines()
    assert header.split()[2] == "ADDRESS" and row.split()[:4] == ["7", "web1", shown, "42"]
    assert total.split()[:4] == ["TOTAL", "1", "nodes", "0.0"]   # no address on the total row


def test_status_json_and_coordinator_option(cluster):
    """`--json` prints the /v1/status document; `--coordinator` picks the address."""
    result = _run("status", "--coordinator", f"127.0.0.1:{cluster.coordinator_port}", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert len(document["nodes"]) == cluster.workers
    for node in document["nodes"]:
        assert node["rss"] > 0 and node["pid"] > 0 and node["uptime"] >= 0


def test_status_without_coordinator_exits_1():
    """With no coordinator listening, `meshgate status` says so and exits 1."""
    result = _run("status", "--coordinator", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "not reachable" in result.stderr


@pytest.mark.parametrize("document, message", [
    ("node:\n  servers:\n    - port: '6790'\n", "node.servers[0].port: expected an integer"),
    ("node:\n  bogus: 1\n", "node.bogus: unknown key"),
    ("coordinator:\n  node_timeout: fast\n", "coordinator.node_timeout: expected a number"),
    ("logging: {level: loud}\n", "logging.level: must be one of"),
    ("node: [1, 2]\n", "node: expected a mapping"),
    ("node:\n  workers: true\n", "node.workers: expected an integer"),
])
def test_bad_config_fails_at_start_with_the_key_path(tmp_path, document, message):
    """A wrong key or type refuses to start and names the key's path."""
    path = tmp_path / "bad.yaml"
    path.write_text(document)
    result = _run("start", "-c", str(path))
    assert result.returncode == 2
    assert message in result.stderr


def test_missing_config_file_is_refused(tmp_path):
    """A config path that does not exist is refused with the path named."""
    result = _run("start", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "nope.yaml" in result.stderr


def test_sigterm_closes_clients_1001_and_stops_everything(tmp_path):
    """SIGTERM to `meshgate start` closes clients with 1001 and stops every process."""
    import psutil
    instance = Cluster(tmp_path, workers=2)
    instance.start()
    try:
        clients = instance.clients(4)
        children = psutil.Process(instance.process.pid).children()
        assert len(children) == 3
        instance.process.send_signal(signal.SIGTERM)
        for client in clients:
            assert client.close_code() == 1001
        assert instance.process.wait(timeout=WAIT) == 0
        assert "re-registered" not in instance.logs(), "a draining node came back after its goodbye"
        deadline = time.monotonic() + WAIT
        while any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children):
            assert time.monotonic() < deadline, "a child outlived the supervisor"
            time.sleep(0.05)
    finally:
        instance.stop()


def test_ctrl_c_in_a_terminal_drains_nodes_before_the_coordinator(tmp_path):
    """SIGINT to the whole process group (a terminal's Ctrl-C): nodes drain first, then the coordinator."""
    import os
    instance = Cluster(tmp_path, workers=2)
    instance.start_options = {"start_new_session": True}
    instance.start()
    try:
        clients = instance.clients(3)
        os.killpg(instance.process.pid, signal.SIGINT)
        for client in clients:
            assert client.close_code() == 1001
        assert instance.process.wait(timeout=WAIT) == 0
        log = instance.logs()
        assert log.index("coordinator stopping") > max(log.index(f"node {n} stopped") for n in (1, 2))
    finally:
        instance.stop()


def test_two_servers_share_a_port_by_path(tmp_path):
    """Two client servers on one port with different paths each get their own connections and topic."""
    instance = Cluster(tmp_path, workers=2, server={"path": "/a", "topic": "topic-a"},
                       extra_servers=[{"path": "/b", "topic": "topic-b"}])
    instance.start()
    try:
        consumer_a, consumer_b = instance.api(), instance.api()
        assert consumer_a.request("queue.pop", ["topic-a"])["E"] is None
        assert consumer_b.request("queue.pop", ["topic-b"])["E"] is None
        for index in range(10):
            instance.client("/a").ws.send(f"a{index}")
            instance.client("/b").ws.send(f"b{index}")
        assert sorted(consumer_a.event()["p"]["d"]["frame"]["data"] for _ in range(10)) == sorted(
            f"a{i}" for i in range(10))
        assert sorted(consumer_b.event()["p"]["d"]["frame"]["data"] for _ in range(10)) == sorted(
            f"b{i}" for i in range(10))
    finally:
        instance.stop()


@pytest.mark.parametrize("document, message", [
    ("node:\n  servers:\n    - topic: 'has space'\n", "node.servers[0].topic: topic name must not contain"),
    ("node:\n  workers: 2\n  mesh: {port: 6788}\n", "node.mesh.port: worker 1 would use port 6789"),
    ("node:\n  workers: 1\n  mesh: {port: 6788}\n", "node.mesh.port: the replacement of worker 0 would use port 6789"),
    ("node:\n  servers:\n    - {port: 7000, bind: 127.0.0.1}\n    - {port: 7000, path: /x, bind: 0.0.0.0}\n",
     "node.servers[1].bind: servers on port 7000 must share one bind address"),
])
def test_inconsistent_config_fails_at_start(tmp_path, document, message):
    """Settings that cannot work together are refused at start, naming the key."""
    path = tmp_path / "bad.yaml"
    path.write_text(document)
    result = _run("start", "-c", str(path))
    assert result.returncode == 2 and message in result.stderr, result.stderr
