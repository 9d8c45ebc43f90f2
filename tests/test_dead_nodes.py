"""A node that dies or drops off the mesh (docs/operations.md, Failure behaviour): found in a fraction of a second.

The supervisor tells the coordinator the moment a node process exits; every
peer sees the node's mesh link close and stops waiting for it, with or without
a coordinator. The forward timeouts and node timeouts here are far longer than
the bounds the tests check, so only those two paths can meet them.
"""

import os
import signal
import subprocess
import time
import uuid

import psutil
import pytest
import zmq

from cluster import mesh
from conftest import MESHGATE, WAIT, Cluster, assert_error, dealer, live_api, stop_all, wait_until
from node.peer_links import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS

FAST = 0.5                    # seconds: the bound on every answer about a dead node
SLOW_FORWARD = 5              # node.forward_timeout: ten times FAST


@pytest.fixture
def stopped():
    """Processes a test froze (SIGSTOP); each is let go (SIGCONT) however the test ends."""
    frozen = []
    yield frozen
    for process in frozen:
        try:
            process.resume()
        except psutil.NoSuchProcess:
            pass


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def node_ids(cluster) -> set:
    return {n["node_id"] for n in cluster.status()["nodes"]}


def pid_of(cluster, node_id: int) -> int:
    return next(n["pid"] for n in cluster.status()["nodes"] if n["node_id"] == node_id)


def coordinator_of(cluster) -> psutil.Process:
    [process] = [p for p in psutil.Process(cluster.process.pid).children() if "coordinator" in p.cmdline()]
    return process


def spread_and_subscribe(cluster, channel: str) -> tuple:
    """Clients on at least two node processes, all subscribed to `channel`, and the victim's also to
    `channel`-theirs; returns (victim, its clients, the others)."""
    clients = cluster.clients(18, nodes=2)
    victim = clients[0].node
    api = cluster.api()
    for client in clients:
        channels = [channel, f"{channel}-theirs"] if client.node == victim else [channel]
        assert api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": channels})["E"] is None
    # Subscriber counts reach the peers through the coordinator. A marker channel, subscribed last, is in
    # the victim's last advert: once the coordinator lists it, it has relayed the counts before it too.
    known = cluster.status()["coordinator"]["channels"]
    marker = {"c": clients[0].client_id, "f": "subscribe", "a": [f"{channel}-marker"]}
    assert api.request("conn.call", marker)["E"] is None
    wait_until(lambda: cluster.status()["coordinator"]["channels"] > known, what="the counts to reach the peers")
    api.ws.close()
    return victim, [c for c in clients if c.node == victim], [c for c in clients if c.node != victim]


def check_fast_failures(cluster, doomed, survivors, channel: str, failed=None) -> None:
    """Each send to a client of the dead node is 401 within FAST; a publish answers within FAST.

    `failed`: what the publish must count in `f` (None: the node's subscribers, or none once it is dropped).
    """
    for client in doomed:
        reply, took = timed(lambda: cluster.http("/v1/mesh/send", {"c": client.client_id, "d": "lost"}))
        assert_error(reply, 401, http_status=200)
        assert took < FAST, f"a send to a dead node's client took {took:.3f} s"
    (status, body), took = timed(lambda: cluster.http("/v1/mesh/publish", {"c": channel, "d": "to the living"}))
    assert took < FAST, f"a publish took {took:.3f} s"
    assert body["r"]["s"] == len(survivors)
    assert body["r"]["f"] in ((0, len(doomed)) if failed is None else (failed,)), body
    for client in survivors:
        assert client.recv() == "to the living"


def pids(cluster) -> dict:
    return {n["pid"]: n["node_id"] for n in cluster.status()["nodes"]}


def check_replacement(cluster, before: dict) -> None:
    """The supervisor's new node process (a pid not in `before`) joins and serves its clients.

    Its node id is a new one, or the dead node's own when a restarted coordinator never knew that node.
    """
    cluster.wait_ready(cluster.workers)
    [replacement] = [node_id for pid, node_id in pids(cluster).items() if pid not in before]
    fresh = cluster.client_on({replacement})
    assert cluster.http("/v1/mesh/send", {"c": fresh.client_id, "d": "on the new node"})[1]["r"] == {"s": True}
    assert fresh.recv() == "on the new node"


def test_killed_node_fails_fast_and_is_dropped_at_once(tmp_path):
    """kill -9 of a node: 401s and publishes within 0.5 s, the coordinator drops it within 1 s, a new one joins."""
    cluster = Cluster(tmp_path, workers=3, node_timeout=30, forward_timeout=SLOW_FORWARD)
    cluster.start()
    try:
        channel = f"dead-{uuid.uuid4().hex[:6]}"
        victim, doomed, survivors = spread_and_subscribe(cluster, channel)
        before = pids(cluster)
        os.kill(pid_of(cluster, victim), signal.SIGKILL)
        killed = time.monotonic()
        check_fast_failures(cluster, doomed, survivors, channel)
        # node_timeout is 30 s: only the supervisor's notice can drop it this soon.
        wait_until(lambda: victim not in node_ids(cluster), timeout=1.0, what="the coordinator to drop the node")
        assert time.monotonic() - killed < 1.5
        assert "its supervisor says" in cluster.logs()
        check_fast_failures(cluster, doomed, survivors, channel, failed=0)
        check_replacement(cluster, before)
    finally:
        cluster.stop()


@pytest.mark.parametrize("how, node_timeout", [("stopped", 30), ("killed", 4)])
def test_killed_node_fails_fast_while_the_coordinator_is_down(tmp_path, stopped, how, node_timeout):
    """Coordinator frozen or killed first, then kill -9 of a node: the peers alone answer 401 and count f in 0.5 s."""
    cluster = Cluster(tmp_path, workers=3, node_timeout=node_timeout, forward_timeout=SLOW_FORWARD)
    cluster.start()
    try:
        channel = f"alone-{uuid.uuid4().hex[:6]}"
        victim, doomed, survivors = spread_and_subscribe(cluster, channel)
        before, victim_pid = pids(cluster), pid_of(cluster, victim)
        coordinator = coordinator_of(cluster)
        if how == "stopped":
            coordinator.suspend()
            stopped.append(coordinator)
        else:
            coordinator.kill()
            coordinator.wait(timeout=WAIT)
        os.kill(victim_pid, signal.SIGKILL)
        for _ in range(3):   # it holds: no coordinator removes the node's subscribers meanwhile
            check_fast_failures(cluster, doomed, survivors, channel, failed=len(doomed))
        if how == "stopped":
            coordinator.resume()
            stopped.remove(coordinator)
            # The notice waited for it: the node goes at once, long before node_timeout (30 s).
            wait_until(lambda: victim not in node_ids(cluster), timeout=1.0, what="the notice to drop the node")
        else:   # the restarted coordinator never knew it; the peers drop it once it does not come back
            theirs = {"c": f"{channel}-theirs", "d": "x"}
            wait_until(lambda: cluster.http("/v1/mesh/publish", theirs)[1]["r"] == {"s": 0, "f": 0},
                       timeout=2 * WAIT, interval=0.2, what="the peers to drop a node that did not come back")
        check_replacement(cluster, before)
        check_fast_failures(cluster, doomed, survivors, channel, failed=0)
    finally:
        cluster.stop()


def test_frozen_node_is_unreachable_then_back(tmp_path, stopped):
    """A node that stops answering (SIGSTOP) is passed over after the heartbeat timeout; let go, it serves again."""
    cluster = Cluster(tmp_path, workers=3, node_timeout=30, forward_timeout=SLOW_FORWARD)
    cluster.start()
    try:
        channel = f"frozen-{uuid.uuid4().hex[:6]}"
        victim, doomed, survivors = spread_and_subscribe(cluster, channel)
        process = psutil.Process(pid_of(cluster, victim))
        process.suspend()
        stopped.append(process)
        frozen_at = time.monotonic()
        api = live_api(cluster)

        def fails_fast():
            reply, took = timed(lambda: api.request("mesh.send", {"c": doomed[0].client_id, "d": "wait"},
                                                    req_id="probe", timeout=WAIT))
            return took < FAST and reply["E"] is not None and "unreachable" in reply["E"]["m"]
        wait_until(fails_fast, timeout=WAIT + SLOW_FORWARD, interval=0.05, what="the link to be put down")
        # Not before the heartbeats gave up: a peer is never declared gone for a short silence.
        assert time.monotonic() - frozen_at >= HEARTBEAT_TIMEOUT_MS / 1000 - 0.5
        for client in doomed:
            reply, took = timed(lambda: api.request("mesh.send", {"c": client.client_id, "d": "lost"}, req_id="s"))
            assert_error(reply, 401, req_id="s", mentions="unreachable")
            assert took < FAST
        reply, took = timed(lambda: api.request("mesh.publish", {"c": channel, "d": "to the living"}))
        assert took < FAST and reply["r"] == {"s": len(survivors), "f": len(doomed)}, reply
        assert victim in node_ids(cluster), "a link drop alone must not remove the node"

        process.resume()
        stopped.remove(process)
        wait_until(lambda: api.request("mesh.send", {"c": doomed[0].client_id, "d": "back"}).get("r") == {"s": True},
                   timeout=HEARTBEAT_IVL_MS / 1000 + WAIT, interval=0.05, what="the link to come back")
        reply = api.request("mesh.publish", {"c": channel, "d": "all again"})
        assert reply["r"] == {"s": len(doomed) + len(survivors), "f": 0}, reply
        for client in doomed:   # what was refused at once never arrives late (a probe sent before may)
            seen = []
            while not seen or seen[-1] != "all again":
                seen.append(client.recv())
            assert "lost" not in seen and ("back" in seen) == (client is doomed[0]), seen
        assert victim in node_ids(cluster)
    finally:
        cluster.stop()


BUSY_ENTRY = '''
import time
from node.entry import queue


def on_message(conn, frame):
    if frame["data"].startswith("busy "):
        end = time.monotonic() + float(frame["data"][5:])
        while time.monotonic() < end:   # holds the node's event loop (and the GIL) the whole time
            pass
    else:
        queue.push(conn.topic, {"frame": frame})
'''


def test_busy_node_is_not_taken_for_dead(tmp_path):
    """A node whose loop is held longer than the heartbeat timeout keeps its links: a send waits, then succeeds."""
    entry = tmp_path / "busy.py"
    entry.write_text(BUSY_ENTRY)
    hold = HEARTBEAT_TIMEOUT_MS / 1000 + 3
    cluster = Cluster(tmp_path, workers=2, node_timeout=30, forward_timeout=hold + WAIT, server={"entry": str(entry)})
    cluster.start()
    try:
        api = cluster.api()
        assert api.request("queue.pop", {"t": ["where-is-this-connection"]})["E"] is None
        api_node = wait_until(lambda: next((n["node_id"] for n in cluster.status()["nodes"] if n["consumers"]), None),
                              what="the API connection's node to report its consumer")
        busy = cluster.client_on(node_ids(cluster) - {api_node})
        busy.ws.send(f"busy {hold}")
        deadline = time.monotonic() + WAIT
        while True:   # sends answered at once until the node takes the frame and holds its loop
            reply, took = timed(lambda: api.request("mesh.send", {"c": busy.client_id, "d": "x"}, timeout=hold + WAIT))
            assert reply["r"] == {"s": True}, reply
            if took > HEARTBEAT_TIMEOUT_MS / 1000 + 1:
                break
            assert took < 1 and time.monotonic() < deadline, "the node did not hold its loop"
        assert f"mesh link to node {busy.node} is down" not in cluster.logs()
    finally:
        cluster.stop()


def test_exit_notices_that_do_not_fit_drop_nothing(tmp_path):
    """Stale, misaddressed, malformed or node-sent exit notices leave every live node in place; bad ones are counted."""
    cluster = Cluster(tmp_path, workers=2, node_timeout=30, key_file=True)
    cluster.start()
    context = zmq.Context()
    try:
        registry = f"tcp://127.0.0.1:{cluster.registry_port}"
        status = cluster.status()
        before = {n["node_id"] for n in status["nodes"]}
        node = status["nodes"][0]
        host, pid, started = node["host"], node["pid"], node["started_at"]
        no_node = next(p for p in range(2 ** 31 - 1, 1, -1) if p not in {n["pid"] for n in status["nodes"]})
        now = time.time()
        local = dealer(context, registry, cluster.key)
        for notice in [mesh.Exited(host, pid, started - 10, started - 1, -9),   # an earlier process of that pid
                       mesh.Exited(host, pid, started + 1, now + 1, -9),        # a later one
                       mesh.Exited(f"not-{host}"[:255], pid, started - 1, now, -9),
                       mesh.Exited(host, no_node, started - 1, now, -9)]:
            local.send_multipart(mesh.encode_control(notice))
        right = mesh.encode_control(mesh.Exited(host, pid, started - 1, now, -9))
        elsewhere = dealer(context, f"tcp://127.0.0.2:0;127.0.0.1:{cluster.registry_port}", cluster.key)
        elsewhere.send_multipart(right)   # all fits but the address: not from the node's machine
        fake = dealer(context, registry, cluster.key)   # a node (it registers) speaking of another node
        fake.send_multipart(mesh.encode_control(mesh.Register(0, host, 1, "127.0.0.1:1", "tcp://127.0.0.1:1", now,
                                                               mesh.NodeState())))
        welcome = mesh.read_control(fake.recv_multipart(), mesh.FROM_COORDINATOR)
        fake.send_multipart(right)
        fake.send_multipart(mesh.encode_control(mesh.Bye(welcome.node_id)))
        refused = status["coordinator"]["control_refused"]
        bad = [b"EXIT", b'{"host": "h", "pid": 0, "started_at": 1, "exited_at": 2, "code": 0}']
        for sender in (local, elsewhere, fake):   # after what each sent before: a marker to wait for
            sender.send_multipart(bad)
        wait_until(lambda: cluster.status()["coordinator"]["control_refused"] >= refused + 4,
                   what="every notice to be read")   # the node's EXIT and the three bad ones
        assert {n["node_id"] for n in cluster.status()["nodes"]} == before
        assert cluster.status()["coordinator"]["control_refused"] == refused + 4
        for sender in (local, elsewhere, fake):
            sender.close()
    finally:
        context.destroy(linger=0)
        cluster.stop()


def test_meshgate_node_supervisor_tells_the_coordinator(tmp_path):
    """Under `meshgate node` (coordinator apart), a node killed -9 is dropped within a second; its replacement joins."""
    layout = Cluster(tmp_path, workers=2, node_timeout=30, key_file=True)
    layout.process = None
    log = open(tmp_path / "apart.log", "wb")
    layout.log_path = tmp_path / "apart.log"
    config = str(layout.config_path)
    processes = [subprocess.Popen([MESHGATE, "coordinator", "-c", config, "--fresh"], stdout=log,
                                  stderr=subprocess.STDOUT)]   # --fresh: new nodes need not wait for old ones
    processes.append(subprocess.Popen([MESHGATE, "node", "-c", config], stdout=log, stderr=subprocess.STDOUT))

    def listed():
        try:
            return {n["node_id"]: n["pid"] for n in layout.status()["nodes"]}
        except OSError:
            return {}
    try:
        nodes = wait_until(lambda: len(listed()) == 2 and listed(), what="2 nodes of `meshgate node`")
        victim, pid = next(iter(nodes.items()))
        assert pid in {child.pid for child in psutil.Process(processes[1].pid).children()}
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: victim not in listed(), timeout=1.0, what="the coordinator to drop the node")
        assert time.monotonic() - killed < 1.5
        wait_until(lambda: len(listed()) == 2, what="the replacement to join")
        assert victim not in listed()
    finally:
        stop_all(processes)
        log.close()
