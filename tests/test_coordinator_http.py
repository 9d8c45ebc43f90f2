"""Coordinator HTTP (docs/protocol.md): /version, /v1/nodes, /v1/status, /metrics, and its errors."""

import json
import urllib.error
import urllib.request

from conftest import WAIT, assert_error, wait_until


def _get(cluster, path, method="GET"):
    request = urllib.request.Request(f"http://127.0.0.1:{cluster.coordinator_port}{path}", method=method,
                                     data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, response.headers.get("Content-Type"), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type"), error.read().decode()


def test_version(cluster):
    """/version names the API and the package version (connmix SDK compatible)."""
    status, _, body = _get(cluster, "/version")
    document = json.loads(body)
    assert status == 200 and document["apis"] == ["v1"] and document["version"]


def test_nodes_lists_live_nodes(cluster):
    """/v1/nodes lists every live node with its addresses, pid and client count."""
    clients = cluster.clients(6)
    wait_until(lambda: sum(n["clients"] for n in json.loads(_get(cluster, "/v1/nodes")[2])["nodes"]) >= 6,
               what="client counts")
    body = _get(cluster, "/v1/nodes")[2]
    assert "\\/" not in body and '"tcp://' in body   # docs/protocol.md: JSON without escaped slashes
    nodes = json.loads(body)["nodes"]
    assert len(nodes) == cluster.workers
    for node in nodes:
        assert set(node) == {"node_id", "host", "pid", "api_server", "mesh_point", "clients", "started_at"}
        assert 1 <= node["node_id"] <= 1023 and node["mesh_point"].startswith("tcp://")
        assert node["api_server"].endswith(f":{cluster.api_port}")
    for client in clients:
        client.ws.close()


def test_status_totals_add_up(cluster):
    """/v1/status totals are the sums of the per-node figures."""
    document = json.loads(_get(cluster, "/v1/status")[2])
    assert document["totals"]["nodes"] == len(document["nodes"]) == cluster.workers
    for name in ("clients", "channels", "consumers", "queue_depth", "out_total"):
        assert document["totals"][name] == sum(node[name] for node in document["nodes"])


def test_metrics_prometheus_text(cluster):
    """/metrics is Prometheus text with a series per node (tests/test_metrics.py has the rest)."""
    node_ids = {n["node_id"] for n in cluster.status()["nodes"]}
    wait_until(lambda: all(f'node_id="{node_id}"' in _get(cluster, "/metrics")[2] for node_id in node_ids),
               what="every node in /metrics")
    status, content_type, body = _get(cluster, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert "# TYPE meshgate_frames_written_total counter" in body
    assert "# TYPE meshgate_connections gauge" in body
    assert f"meshgate_nodes {float(len(node_ids))}" in body


def test_unknown_path_and_wrong_method_are_envelopes(cluster):
    """404 and 405 on the coordinator carry a JSON error envelope, not HTML."""
    status, content_type, body = _get(cluster, "/nope")
    assert_error((status, json.loads(body)), 101, http_status=404, mentions="/nope")
    status, content_type, body = _get(cluster, "/v1/status", method="POST")
    assert content_type.startswith("application/json")
    assert_error((status, json.loads(body)), 101, http_status=405)


def test_ws_endpoint_without_upgrade_is_an_envelope(cluster):
    """A plain GET of /ws/v1 gets a 400 envelope naming what is needed."""
    request = urllib.request.Request(f"http://127.0.0.1:{cluster.api_port}/ws/v1")
    try:
        urllib.request.urlopen(request, timeout=WAIT)
        raise AssertionError("a plain GET of /ws/v1 succeeded")
    except urllib.error.HTTPError as error:
        assert "upgrade" in assert_error((error.code, json.loads(error.read())), 101).lower()
