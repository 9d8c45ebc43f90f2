"""Local links (node/local_links.py; docs/operations.md, The mesh): peers of one host carry their mesh
messages over a Unix socket once each has shown the other the cluster key; a stranger, or a process
squatting on a node's socket name, gets no mesh message and breaks nothing."""

import asyncio
import os
import signal
import socket
import time
import uuid

import pytest
import zmq

from conftest import WAIT, Cluster, free_port, running, wait_until
from test_dead_nodes import SLOW_FORWARD, check_fast_failures, coordinator_of, pid_of, spread_and_subscribe
from cluster import cluster_key
from node import local_links
from node.local_links import MAGIC, LocalLink, LocalListener, key_material, socket_name
from test_metrics import families, value

pytestmark = pytest.mark.timeout(120)

LOCAL = {"local_links": True}


def local_peers(cluster) -> dict:
    found = families(cluster)
    return {int(sample.labels["node_id"]): sample.value for sample in found["meshgate_local_peers"].samples}


def refused(cluster) -> int:
    return sum(node["mesh_handshakes_refused"] for node in cluster.status()["nodes"])


def send_to_every_node(cluster, nodes: int) -> None:
    """Sends to clients on `nodes` node processes through one API connection, and publishes to them all."""
    clients = cluster.clients(6, nodes=nodes)
    api = cluster.api()
    channel = f"local-{uuid.uuid4().hex[:6]}"
    for client in clients:
        assert api.request("mesh.send", {"c": client.client_id, "d": "hi"})["E"] is None
        assert client.recv() == "hi"
        assert api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": [channel]})["E"] is None
    wait_until(lambda: api.request("mesh.publish", {"c": channel, "d": "w"})["r"]["s"] == len(clients),
               what="every subscriber counted")
    for client in clients:
        while client.recv() != "w":
            pass
    for client in clients:
        client.ws.close()


def stranger(cluster) -> socket.socket:
    """A connection to the local socket of the first node, as any process of the host may open."""
    node = cluster.status()["nodes"][0]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(socket_name(node["mesh_point"]))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """What the node writes until it closes the connection."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


local_cluster = pytest.mark.parametrize("cluster", [{"mesh": LOCAL}], indirect=True)


@local_cluster
def test_peers_of_one_host_use_local_links(cluster):
    wait_until(lambda: local_peers(cluster) == {node_id: cluster.workers - 1 for node_id in local_peers(cluster)}
               and len(local_peers(cluster)) == cluster.workers, what="every peer linked locally")
    assert set(local_peers(cluster).values()) == {cluster.workers - 1}
    send_to_every_node(cluster, nodes=2)


@local_cluster
def test_a_stranger_without_the_key_gets_nothing_and_is_counted(cluster):
    before = refused(cluster)
    sock = stranger(cluster)
    greeting = sock.recv(len(MAGIC) + 16, socket.MSG_WAITALL)
    assert greeting.startswith(MAGIC) and len(greeting) == len(MAGIC) + 16
    sock.sendall(b"\0" * 48)   # a nonce and a proof made without the key
    assert read_all(sock) == b""
    sock.close()
    wait_until(lambda: refused(cluster) == before + 1, what="the refusal counted")


@local_cluster
def test_a_stranger_that_says_nothing_is_closed_after_the_handshake_time(cluster):
    before = refused(cluster)
    sock = stranger(cluster)
    started = time.monotonic()
    data = read_all(sock)
    took = time.monotonic() - started
    assert data.startswith(MAGIC) and len(data) == len(MAGIC) + 16   # the greeting, then the close
    assert local_links.HANDSHAKE_S - 0.05 <= took <= local_links.HANDSHAKE_S + 1.5
    sock.close()
    wait_until(lambda: refused(cluster) == before + 1, what="the refusal counted")


def test_by_default_peers_of_one_host_link_locally(tmp_path):
    with running(Cluster(tmp_path, workers=2)) as cluster:
        wait_until(lambda: local_peers(cluster) == {node["node_id"]: 1 for node in cluster.status()["nodes"]}
                   and len(local_peers(cluster)) == 2, what="both nodes linked locally")
        send_to_every_node(cluster, nodes=2)


def test_without_local_links_zeromq_carries_everything(tmp_path):
    with running(Cluster(tmp_path, workers=2, mesh={"local_links": False})) as cluster:
        wait_until(lambda: len(cluster.status()["nodes"]) == 2, what="both nodes")
        send_to_every_node(cluster, nodes=2)
        assert local_peers(cluster) == {node["node_id"]: 0 for node in cluster.status()["nodes"]}


def test_a_squatter_on_a_nodes_socket_name_learns_nothing_and_changes_nothing(tmp_path):
    """Worker 0's name is taken before the cluster starts: that node logs it and its peers reach it through
    ZeroMQ (the squatter cannot greet them as a node); the other peers still link locally."""
    base = free_port(3)
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(socket_name(f"tcp://127.0.0.1:{base}"))
    squatter.listen(16)
    squatter.settimeout(0.2)
    heard, accepted = [], []
    with running(Cluster(tmp_path, workers=3, mesh={"port": base, **LOCAL})) as cluster:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                conn, _ = squatter.accept()
            except socket.timeout:
                continue
            accepted.append(conn)
            conn.settimeout(0.5)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\nnothing to see here")
            try:
                heard.append(conn.recv(65536))
            except socket.timeout:
                heard.append(b"")
        send_to_every_node(cluster, nodes=3)
        assert "no local mesh socket for tcp://127.0.0.1:%d" % base in cluster.logs()
        squatted = next(node["node_id"] for node in cluster.status()["nodes"]
                        if node["mesh_point"] == f"tcp://127.0.0.1:{base}")
        wait_until(lambda: local_peers(cluster) == {node_id: (2 if node_id == squatted else 1)
                                                    for node_id in local_peers(cluster)}
                   and len(local_peers(cluster)) == 3, what="the others linked locally")
    assert accepted and all(data == b"" for data in heard)
    for conn in accepted:
        conn.close()
    squatter.close()


def test_a_killed_peer_is_noticed_at_once_over_a_local_link_with_the_coordinator_frozen(tmp_path):
    """kill -9 of a node while the coordinator is frozen: its local links end, and the peers alone answer 401
    and count its subscribers in f within 0.5 s (docs/operations.md, Failure behaviour)."""
    cluster = Cluster(tmp_path, workers=3, node_timeout=30, forward_timeout=SLOW_FORWARD, mesh=LOCAL)
    with running(cluster):
        wait_until(lambda: sorted(local_peers(cluster).values()) == [2, 2, 2], what="every peer linked locally")
        channel = f"local-dead-{uuid.uuid4().hex[:6]}"
        victim, doomed, survivors = spread_and_subscribe(cluster, channel)
        coordinator, victim_pid = coordinator_of(cluster), pid_of(cluster, victim)
        coordinator.suspend()
        try:
            os.kill(victim_pid, signal.SIGKILL)
            check_fast_failures(cluster, doomed, survivors, channel, failed=len(doomed))
            assert f"mesh link to node {victim} is down" in cluster.logs()
        finally:
            coordinator.resume()


def test_a_frozen_peer_goes_down_by_heartbeats_and_its_local_link_comes_back(tmp_path):
    """SIGSTOP: ZeroMQ's heartbeats put the peer down (its local link is closed with it); SIGCONT: the link is
    up again and messages go over a fresh local link."""
    cluster = Cluster(tmp_path, workers=2, node_timeout=60, forward_timeout=1, mesh=LOCAL)
    with running(cluster):
        wait_until(lambda: sorted(local_peers(cluster).values()) == [1, 1], what="both peers linked locally")
        clients = cluster.clients(6, nodes=2)
        victim = clients[0].node
        pid = pid_of(cluster, victim)
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: f"mesh link to node {victim} is down" in cluster.logs(), timeout=15,
                       what="the frozen peer's link to go down")
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: f"mesh link to node {victim} is up again" in cluster.logs(), timeout=15,
                   what="the link to come back")
        wait_until(lambda: sorted(local_peers(cluster).values()) == [1, 1], what="the local links open again")
        send_to_every_node(cluster, nodes=2)


# --- one process, real sockets: the link's framing and its ends -------------------------------------


def name() -> str:
    return f"\0meshgate-test {uuid.uuid4().hex}"


async def opened(link: LocalLink) -> None:
    for _ in range(200):
        if link.state != local_links.CONNECTING:
            return
        await asyncio.sleep(0.005)


def test_messages_arrive_whole_and_in_order_even_when_sent_before_the_link_opened():
    async def run():
        key = key_material(cluster_key.generate())
        got = []
        listener = LocalListener(address := name(), key, 8 * 1024 * 1024, got.append)
        replies = []
        link = LocalLink(address, key, 8 * 1024 * 1024, 64 * 1024 * 1024, replies.append, None)
        sizes = [0, 1, 3, 65536, 3 * 1024 * 1024 + 7, 10]
        for size in sizes:   # before the handshake finished: they wait, in order
            link.send([bytes([size % 251]) * size])
        await opened(link)
        assert link.state == local_links.OPEN
        for size in sizes:
            link.send([bytes([size % 251]) * size])
        for _ in range(400):
            if len(got) == 2 * len(sizes):
                break
            await asyncio.sleep(0.005)
        assert [len(payload) for _, payload in got] == sizes + sizes
        assert all(payload == bytes([len(payload) % 251]) * len(payload) for _, payload in got)
        peer = got[0][0]
        assert listener.send(peer, b"a reply") and not listener.send(b"local-nobody", b"x")
        for _ in range(200):
            if replies:
                break
            await asyncio.sleep(0.005)
        assert replies == [[b"a reply"]]
        link.close()
        listener.close()

    asyncio.run(run())


def test_a_listener_with_another_key_gets_nothing_and_the_waiting_messages_come_back():
    async def run():
        got, ended = [], []
        listener = LocalListener(address := name(), key_material(cluster_key.generate()), 1 << 20, got.append)
        link = LocalLink(address, key_material(cluster_key.generate()), 1 << 20, 1 << 20, None,
                         lambda *args: ended.append(args))
        link.send([b"first"])
        link.send([b"second"])
        await opened(link)
        assert link.state == local_links.FAILED and got == []
        [(_, was_open, _why, waiting)] = ended
        assert not was_open and waiting == [b"first", b"second"]   # for ZeroMQ to carry, in order
        assert listener.refused == 1
        listener.close()

    asyncio.run(run())


def test_a_message_over_the_bound_ends_the_connection_and_counts():
    async def run():
        key = key_material(cluster_key.generate())
        got, ended = [], []
        listener = LocalListener(address := name(), key, 1000, got.append)
        link = LocalLink(address, key, 1 << 20, 1 << 20, None, lambda *args: ended.append(args))
        await opened(link)
        link.send([b"x" * 1000])
        link.send([b"y" * 1001])
        for _ in range(200):
            if ended:
                break
            await asyncio.sleep(0.005)
        assert [len(payload) for _, payload in got] == [1000]
        assert ended and ended[0][1] is True and listener.refused == 1
        listener.close()

    asyncio.run(run())


def test_no_listener_means_no_link_at_once():
    async def run():
        link = LocalLink(name(), key_material(cluster_key.generate()), 1 << 20, 1 << 20, None, None)
        assert link.state == local_links.FAILED and "no local socket" in link.why

    asyncio.run(run())


def test_what_waits_is_bounded():
    async def run():
        key = key_material(cluster_key.generate())
        listener = LocalListener(address := name(), key, 1 << 20, lambda frames: None)
        link = LocalLink(address, key, 1 << 20, 100, None, None)
        link.send([b"x" * 500])   # nothing waits: any one message is taken
        with pytest.raises(zmq.Again):
            link.send([b"y"])
        link.close()
        listener.close()

    asyncio.run(run())
