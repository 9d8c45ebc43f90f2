"""The cluster key on every ZeroMQ socket: strangers get nothing from the registry or a mesh point.

A real cluster (with a key file, so the test holds the key too); strangers
are plain and CURVE DEALERs without the key; the same requests with the key
show that the test would see it if a stranger got through.
"""

import json
import os
import signal
import stat
import subprocess
import urllib.request

import psutil
import pytest
import zmq

from cluster import cluster_key, mesh, protocol
from conftest import Cluster, MESHGATE, WAIT, dealer, running, wait_until

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two node processes and a coordinator sharing a key file the test can read."""
    with running(Cluster(tmp_path_factory.mktemp("keyed"), workers=2, key_file=True)) as instance:
        yield instance


@pytest.fixture
def context():
    instance = zmq.Context()
    yield instance
    instance.destroy(linger=0)


def _nodes(cluster) -> list:
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.coordinator_port}/v1/nodes", timeout=WAIT) as response:
        return json.loads(response.read())["nodes"]


def _strangers(context, address: str, key) -> list:
    """DEALERs without the cluster key: plain; CURVE with a key pair of its own; CURVE knowing the cluster's
    public key (as if it had leaked) but not its secret."""
    return [dealer(context, address, receive_timeout=1.0), dealer(context, address, cluster_key.generate(), 1.0),
            dealer(context, address, key, 1.0, own_key=cluster_key.generate())]


def _try(stranger, frames: list) -> None:
    """Sends if the socket can: a stranger whose handshake was refused may have no connection to queue on."""
    try:
        stranger.send_multipart(frames)
    except zmq.Again:
        pass


def _register(node_id: int = 0) -> list:
    return mesh.encode_control(mesh.Register(node_id, "rogue", 1, "127.0.0.1:1", "tcp://127.0.0.1:1", 0.0,
                                             mesh.NodeState()))


def test_strangers_get_nothing_from_the_registry(cluster, context):
    """A registration without the cluster key gets no welcome (no node id, no tables) and the refusal is counted."""
    refused_before = cluster.status()["coordinator"]["mesh_handshakes_refused"]
    registry = f"tcp://127.0.0.1:{cluster.registry_port}"
    for stranger in _strangers(context, registry, cluster.key):
        _try(stranger, _register())
        with pytest.raises(zmq.Again):
            stranger.recv_multipart()
    assert len(cluster.status()["nodes"]) == cluster.workers
    wait_until(lambda: cluster.status()["coordinator"]["mesh_handshakes_refused"] > refused_before,
               what="the refused CURVE handshake to be counted")
    keyed = dealer(context, registry, cluster.key)
    keyed.send_multipart(_register())
    reply = mesh.read_control(keyed.recv_multipart(), mesh.FROM_COORDINATOR)
    assert isinstance(reply, (mesh.Welcome, mesh.Refused))   # the key is what let it in


def test_strangers_cannot_make_a_node_write_to_a_client(cluster, clients, context):
    """SEND and PUBLISH from DEALERs without the key never reach the client; the same SEND with the key does."""
    [client] = clients(1)
    node = next(n for n in _nodes(cluster) if n["node_id"] == client.node)
    send = mesh.frame_request(mesh.send_request(int(client.client_id), protocol.encode_ws_frame(b"forged")), 1)
    for stranger in _strangers(context, node["mesh_point"], cluster.key):
        _try(stranger, send)
        with pytest.raises(zmq.Again):
            stranger.recv_multipart()
    assert client.nothing_for(0.3)
    keyed = dealer(context, node["mesh_point"], cluster.key)
    keyed.send_multipart(send)
    assert mesh.read_result(mesh.Send, mesh.read_reply(keyed.recv_multipart())[1]) is True
    assert client.recv() == "forged"
    wait_until(lambda: next(n for n in cluster.status()["nodes"] if n["node_id"] == client.node)
               ["mesh_handshakes_refused"] >= 1, what="the node to count the refused handshake")


def test_bad_messages_with_the_key_are_dropped_counted_and_logged_sparingly(cluster, clients, context):
    """With the key, 60 bad requests are dropped and counted, logged a few times at most; the node goes on serving."""
    [client] = clients(1)
    node = next(n for n in _nodes(cluster) if n["node_id"] == client.node)
    keyed = dealer(context, node["mesh_point"], cluster.key)
    before = next(n for n in cluster.status()["nodes"] if n["node_id"] == client.node)["mesh_refused"]
    raw = mesh.Outbound(mesh.Send, b'{"c": %s}' % client.client_id.encode(), b"raw bytes, not a WebSocket frame")
    for request_id in range(60):
        keyed.send_multipart(mesh.frame_request(raw, request_id + 1))
    keyed.send_multipart(mesh.frame_request(mesh.send_request(int(client.client_id), protocol.encode_ws_frame(b"ok")),
                                            99))
    assert mesh.read_reply(keyed.recv_multipart())[0] == 99   # the bad ones got no reply at all
    assert client.recv() == "ok"
    wait_until(lambda: next(n for n in cluster.status()["nodes"] if n["node_id"] == client.node)["mesh_refused"]
               >= before + 60, what="60 refused mesh messages counted")
    assert cluster.logs().count("dropped a bad mesh request") <= 5


def test_the_key_never_shows_on_a_command_line_or_in_an_environment(cluster):
    """The supervisor hands the key over on standard input: no child's argv or environment holds it."""
    secret = cluster.key.secret.decode()
    children = psutil.Process(cluster.process.pid).children(recursive=True)
    assert len(children) == cluster.workers + 1
    for process in [psutil.Process(cluster.process.pid), *children]:
        assert secret not in " ".join(process.cmdline())
        assert not any(secret in value for value in process.environ().values())


# --- the key file and the commands that need it ----------------------------------------------

def _run(*args, timeout=WAIT):
    return subprocess.run([MESHGATE, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_keygen_writes_a_private_key_file_and_never_overwrites_one(tmp_path):
    """`meshgate keygen -o FILE` writes mode 0600 with one key line; a second run on the same file is refused."""
    path = tmp_path / "cluster.key"
    done = _run("keygen", "-o", str(path))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = cluster_key.read_file(str(path))
    assert len(key.secret) == len(key.public) == 40
    again = _run("keygen", "-o", str(path))
    assert again.returncode == 1 and "exists already" in again.stderr
    assert cluster_key.read_file(str(path)) == key


def _config(tmp_path, key_file=None) -> str:
    layout = Cluster(tmp_path, workers=1)
    text = layout.config_path.read_text()
    if key_file:
        text = text.replace("access: {}", f"access: {{cluster_key_file: {key_file}}}")
    layout.config_path.write_text(text)
    return str(layout.config_path)


@pytest.mark.parametrize("command", [["coordinator"], ["node"]])
def test_coordinator_and_node_refuse_to_start_without_a_private_key_file(command, tmp_path):
    """`meshgate coordinator` and `meshgate node` exit 2 without a key file, or with one group or others can read."""
    missing = _run(*command, "-c", _config(tmp_path))
    assert missing.returncode == 2 and "access.cluster_key_file: required" in missing.stderr
    path = tmp_path / "shared.key"
    cluster_key.write_file(str(path), cluster_key.generate())
    os.chmod(path, 0o640)
    readable = _run(*command, "-c", _config(tmp_path, path))
    assert readable.returncode == 2 and "readable by group or others" in readable.stderr
    (tmp_path / "broken.key").write_text("curve-secret-key = \"not a key\"\n")
    os.chmod(tmp_path / "broken.key", 0o600)
    broken = _run(*command, "-c", _config(tmp_path, tmp_path / "broken.key"))
    assert broken.returncode == 2 and "curve-secret-key" in broken.stderr


def test_start_without_a_key_file_makes_a_fresh_key_per_run(tmp_path, context):
    """`meshgate start` with no key file works with no set-up; a key of another run does not get in."""
    first = Cluster(tmp_path, workers=1)
    first.start()
    try:
        other = dealer(context, f"tcp://127.0.0.1:{first.registry_port}", cluster_key.generate(), 1.0)
        _try(other, _register())
        with pytest.raises(zmq.Again):
            other.recv_multipart()
    finally:
        assert first.stop() == 0


def test_node_ids_go_only_to_the_process_that_holds_their_lease(cluster, context):
    """With the key, asking for an id not held (no lease) or held by another is refused; after a coordinator
    restart each node gets its own id back with its lease."""
    before = {n["node_id"]: n["pid"] for n in cluster.status()["nodes"]}
    keyed = dealer(context, f"tcp://127.0.0.1:{cluster.registry_port}", cluster.key)
    for node_id, reason in ((1000, "lease"), (min(before), "held by")):
        keyed.send_multipart(_register(node_id))
        reply = mesh.read_control(keyed.recv_multipart(), mesh.FROM_COORDINATOR)
        assert isinstance(reply, mesh.Refused) and not reply.retry and reason in reply.reason
    supervisor = psutil.Process(cluster.process.pid)
    [coordinator] = [p for p in supervisor.children() if "coordinator" in p.cmdline()]
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait(timeout=WAIT)

    def back():
        try:
            return {n["node_id"]: n["pid"] for n in cluster.status()["nodes"]} == before
        except OSError:   # the coordinator is not back yet
            return False
    wait_until(back, timeout=WAIT * 2, what="every node to re-register with its own id")
