"""/metrics (docs/operations.md, Metrics): every node in one scrape of the coordinator, named and typed as
Prometheus expects, counting what really happened; what a node sends is checked before it is shown."""

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from cluster import mesh
from conftest import WAIT, dealer, wait_until
from coordinator.metrics import BadMetrics, node_families
from node.metrics import BUCKETS, TOP_TOPICS, Timings, top
from node.queues import Buffers, QueueFull

# The cluster tests share one cluster with a key file: the rogue registration below needs the key.
keyed = pytest.mark.parametrize("cluster", [{"key_file": True}], indirect=True)


def scrape(cluster) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{cluster.coordinator_port}/metrics")
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def families(cluster) -> dict:
    return {family.name: family for family in text_string_to_metric_families(scrape(cluster))}


def samples(found: dict, family: str) -> list:
    return found[family].samples if family in found else []


def value(found: dict, name: str, **labels) -> float:
    """The sum of the samples `name` whose labels include `labels` (0 when there are none)."""
    family = next((found[name.removesuffix(suffix)] for suffix in ("_total", "_count", "_sum", "")
                   if name.removesuffix(suffix) in found), None)
    if family is None:
        return 0.0
    return sum(sample.value for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def context():
    instance = zmq.Context()
    yield instance
    instance.destroy(linger=0)


@keyed
def test_every_node_is_in_one_scrape_with_help_type_and_units(cluster):
    """Each node shows up with node_id and host; every family has HELP and TYPE; counters end in _total."""
    node_ids = {str(n["node_id"]) for n in cluster.status()["nodes"]}
    wait_until(lambda: {s.labels["node_id"] for s in samples(families(cluster), "meshgate_node_info")} == node_ids,
               what="every node's metrics")
    found = families(cluster)
    assert value(found, "meshgate_nodes") == cluster.workers
    for family in found.values():
        assert family.name.startswith("meshgate_") and family.documentation, family.name
        assert family.type in ("counter", "gauge", "histogram"), family.name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
            if family.name.startswith("meshgate_coordinator") or family.name == "meshgate_nodes":
                assert "node_id" not in sample.labels
            else:
                assert sample.labels["node_id"] in node_ids and sample.labels["host"], sample
    for name in ("meshgate_node_process_cpu_seconds", "meshgate_node_process_resident_memory_bytes",
                 "meshgate_node_process_open_fds", "meshgate_node_process_start_time_seconds",
                 "meshgate_api_request_duration_seconds", "meshgate_forward_round_trip_seconds",
                 "meshgate_publish_fanout_duration_seconds", "meshgate_hook_duration_seconds"):
        assert name in found, name
    assert found["meshgate_api_request_duration_seconds"].type == "histogram"


@keyed
@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian's prometheus package has it)")
def test_promtool_finds_nothing_to_complain_about(cluster, clients):
    clients(2)
    cluster.http("/v1/mesh/publish", {"c": "promtool", "d": "x"})
    wait_until(lambda: "meshgate_api_requests_total" in scrape(cluster), what="a request in the metrics")
    checked = subprocess.run(["promtool", "check", "metrics"], input=scrape(cluster).encode(), capture_output=True,
                             timeout=30)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked


@keyed
def test_metrics_count_requests_messages_and_latencies(cluster, clients):
    """Sends to clients on two nodes (one of them not the API connection's), a publish to both, a bad
    request, connections and subscriptions: each moves the figures that say so."""
    found = cluster.clients(2, nodes=2)
    a = found[0]
    b = next(c for c in found if c.node != a.node)
    before = families(cluster)
    api = cluster.api()
    for client in (a, b):
        assert api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": ["metrics"]})["E"] is None
        assert api.request("mesh.send", {"c": client.client_id, "d": "hello"})["E"] is None
        assert client.recv() == "hello"
    assert api.request("mesh.publish", {"c": "metrics", "d": "to both"})["r"] == {"s": 2, "f": 0}
    assert a.recv() == "to both" and b.recv() == "to both"
    assert cluster.http("/v1/mesh/send", {"c": "not a number", "d": "x"})[0] == 400

    def moved(name, by=1, **labels):
        return lambda: value(families(cluster), name, **labels) >= value(before, name, **labels) + by

    wait_until(moved("meshgate_api_requests_total", 2, method="mesh.send", transport="ws", result="ok"),
               what="the sends counted")
    wait_until(moved("meshgate_api_requests_total", method="mesh.send", transport="http", result="101"),
               what="the bad send counted with its code")
    wait_until(moved("meshgate_api_requests_total", method="mesh.publish", transport="ws", result="ok"),
               what="the publish counted")
    wait_until(moved("meshgate_api_request_duration_seconds_count", method="mesh.send", route="forwarded"),
               what="the send to the other node timed as forwarded")
    wait_until(moved("meshgate_api_request_duration_seconds_count", method="mesh.send", route="local"),
               what="the send to the API connection's node timed as local")
    wait_until(moved("meshgate_forward_round_trip_seconds_count", 2), what="round trips to a peer timed")
    wait_until(moved("meshgate_messages_total", 2, kind="publish"), what="a fan-out on each node")
    wait_until(moved("meshgate_messages_total", 2, kind="send"), what="the sends written")
    wait_until(moved("meshgate_publish_fanout_duration_seconds_count", 2), what="the fan-outs timed")
    wait_until(moved("meshgate_frames_written_total", 4), what="frames written")
    now = families(cluster)
    assert value(now, "meshgate_connections", server="/") >= 2
    assert value(now, "meshgate_subscriptions") >= 2 and value(now, "meshgate_channels") >= 2
    assert value(now, "meshgate_api_connections") >= 1


@keyed
def test_what_a_node_sends_is_checked_before_it_is_shown(cluster, context):
    """A registered process with the key sends metrics: another node's id is ignored, its own labels cannot
    claim another node, and text that is not meshgate's is left out and counted."""
    registry = dealer(context, f"tcp://127.0.0.1:{cluster.registry_port}", cluster.key)
    registry.send_multipart(mesh.encode_control(mesh.Register(0, "rogue", 1, "127.0.0.1:1", "tcp://127.0.0.1:1",
                                                              0.0, mesh.NodeState())))
    welcome = mesh.read_control(registry.recv_multipart(), mesh.FROM_COORDINATOR)
    assert isinstance(welcome, mesh.Welcome)
    rogue = welcome.node_id
    victim = next(n["node_id"] for n in cluster.status()["nodes"] if n["node_id"] != rogue)
    forged = "# HELP meshgate_channels x\n# TYPE meshgate_channels gauge\nmeshgate_channels{node_id=\"%d\"} 7777\n"
    registry.send_multipart(mesh.encode_control(mesh.Metrics(victim, forged % victim)))   # not its id: ignored
    registry.send_multipart(mesh.encode_control(mesh.Metrics(rogue, forged % victim)))    # its id, a forged label
    wait_until(lambda: any(s.value == 7777 for s in samples(families(cluster), "meshgate_channels")),
               what="the rogue's own figure")
    shown = [s for s in samples(families(cluster), "meshgate_channels") if s.value == 7777]
    assert [s.labels["node_id"] for s in shown] == [str(rogue)] and shown[0].labels["host"] == "rogue"
    unreadable = value(families(cluster), "meshgate_coordinator_node_metrics_unreadable_total")
    for text in ("python_gc_objects 1\n", "meshgate_x{ 1\n", "# TYPE meshgate_y counter\nmeshgate_z_total 1\n"):
        registry.send_multipart(mesh.encode_control(mesh.Metrics(rogue, text)))
        wait_until(lambda: value(families(cluster), "meshgate_coordinator_node_metrics_unreadable_total")
                   > unreadable, what=f"{text!r} left out and counted")
        unreadable = value(families(cluster), "meshgate_coordinator_node_metrics_unreadable_total")
        assert 7777 not in {s.value for s in samples(families(cluster), "meshgate_channels")}
    refused = cluster.status()["coordinator"]["control_refused"]
    registry.send_multipart([b"MT", b'{"node_id": %d, "text": "a\\u0000b"}' % rogue])
    wait_until(lambda: cluster.status()["coordinator"]["control_refused"] > refused, what="a control character refused")
    registry.send_multipart(mesh.encode_control(mesh.Bye(rogue)))


# --- the pure parts ---------------------------------------------------------------------------------


def test_timings_put_a_duration_equal_to_a_bound_in_its_bucket():
    timings = Timings()
    for seconds in (0.0, BUCKETS[0], BUCKETS[0] * 1.01, BUCKETS[-1], BUCKETS[-1] * 2):
        timings.observe(("x",), seconds)
    metric = timings.family("meshgate_t_seconds", "t", ("l",))
    buckets = {s.labels["le"]: s.value for s in metric.samples if s.name.endswith("_bucket")}
    assert buckets["0.0005"] == 2 and buckets["0.001"] == 3 and buckets["10.0"] == 4 and buckets["+Inf"] == 5
    assert [s.value for s in metric.samples if s.name.endswith("_count")] == [5]


def test_top_topics_keep_the_largest_and_sum_the_rest():
    figures = {f"t{i}": i for i in range(TOP_TOPICS + 5)}
    rows = top(figures)
    assert len(rows) == TOP_TOPICS + 1 and rows[0] == (f"t{TOP_TOPICS + 4}", TOP_TOPICS + 4)
    assert rows[-1] == ("other", sum(range(5)))
    assert top({"a": 1}) == [("a", 1)] and top({}) == []


def test_queue_drops_are_counted_per_topic_within_a_bound():
    buffers = Buffers(topic_size=1, max_topics=2000)
    for index in range(1005):
        buffers.push(f"t{index}", (index,))
        with pytest.raises(QueueFull):
            buffers.push(f"t{index}", (index,))
    assert buffers.dropped == 1005 and len(buffers.dropped_by) == 1001 and buffers.dropped_by["other"] == 5


@pytest.mark.parametrize("text, problem", [
    ("up 1\n", "not one of meshgate's"),
    ("# TYPE meshgate_a summary\nmeshgate_a_count 1\n", "not one of meshgate's"),
    ("# TYPE meshgate_a gauge\nmeshgate_b 1\n", "'meshgate_b' of type 'unknown'"),
    ("# TYPE meshgate_a gauge\nmeshgate_a abc\n", "unreadable"),
])
def test_node_families_refuse_what_is_not_meshgates(text, problem):
    with pytest.raises(BadMetrics, match=problem):
        node_families(text)


def test_the_metrics_message_is_read_strictly():
    good = mesh.encode_control(mesh.Metrics(3, "meshgate_a 1\n"))
    assert mesh.read_control(good, mesh.FROM_NODE) == mesh.Metrics(3, "meshgate_a 1\n")
    for body in (b'{"node_id": 3}', b'{"node_id": 0, "text": ""}', b'{"node_id": 3, "text": 5}',
                 b'{"node_id": 3, "text": "\\u0007"}',
                 b'{"node_id": 3, "text": "%s"}' % (b"x" * (mesh.MAX_METRICS_BYTES + 1))):
        with pytest.raises(mesh.FrameError):
            mesh.read_control([b"MT", body], mesh.FROM_NODE)
    with pytest.raises(mesh.FrameError):
        mesh.read_control(good, mesh.FROM_COORDINATOR)


@keyed
def test_the_grafana_dashboard_reads_only_metrics_that_exist(cluster):
    """docs/grafana-dashboard.json: every metric its queries name is one /metrics has."""
    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    named = set(re.findall(r"meshgate_[a-z_]+", " ".join(exprs)))
    wait_until(lambda: "meshgate_node_info" in families(cluster), what="the nodes' metrics")
    shown = {sample.name for family in families(cluster).values() for sample in family.samples}
    shown |= {name for name in families(cluster)}   # families with no sample yet (no queue has waited)
    shown |= {f"{name}_bucket" for name in families(cluster)} | {f"{name}_total" for name in families(cluster)}
    assert len(exprs) >= 10 and named and not named - shown, named - shown
