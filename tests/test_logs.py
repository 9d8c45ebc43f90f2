"""Logs for operators (docs/operations.md, Logs): the optional access log of the backend API."""

import http.client
import re

import pytest

from conftest import Cluster, WAIT, running, wait_until

USERS = [{"username": "ops", "password": "secret-ops", "roles": ["read", "write"], "host": "*"}]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Two workers with the access log on and one API user."""
    with running(Cluster(tmp_path_factory.mktemp("logged"), workers=2, api={"access_log": True},
                         access={"users": USERS}, credentials=("ops", "secret-ops"))) as instance:
        yield instance


def _lines(cluster, pattern: str) -> list:
    return [line for line in cluster.log_path.read_text(errors="replace").splitlines()
            if "meshgate.access.requests" in line and re.search(pattern, line)]


def test_every_api_request_is_one_line_with_who_what_result_and_time(logged):
    """HTTP and /ws/v1, answered and refused: method, user, peer, result code and duration on one line."""
    assert logged.http("/v1/mesh/publish", {"c": "logged", "d": "x"})[0] == 200
    assert logged.http("/v1/mesh/send", {"c": "nope", "d": "x"})[0] == 400
    assert logged.http("/v1/mesh/send", raw=b"{not json")[0] == 400
    api = logged.api()
    assert api.request("mesh.publish", {"c": "logged", "d": "y"})["E"] is None
    assert api.request("queue.pop", {"t": []})["E"]["c"] == 101
    wait_until(lambda: len(_lines(logged, r" INFO meshgate\.access\.requests: ")) >= 5, what="five access lines")
    assert _lines(logged, r": http mesh\.publish user=ops from=127\.0\.0\.1 result=ok \d+\.\d\d ms$")
    assert _lines(logged, r": http mesh\.send user=ops from=127\.0\.0\.1 result=101 \d+\.\d\d ms$")
    assert _lines(logged, r": http mesh\.send user=ops from=127\.0\.0\.1 result=101$")   # refused before it ran
    assert _lines(logged, r": ws mesh\.publish user=ops from=127\.0\.0\.1 result=ok \d+\.\d\d ms$")
    assert _lines(logged, r": ws queue\.pop user=ops from=127\.0\.0\.1 result=101 ")


def test_refused_credentials_are_logged_with_102(logged):
    connection = http.client.HTTPConnection("127.0.0.1", logged.api_port, timeout=WAIT)
    connection.request("POST", "/v1/mesh/send", body=b'{"c": "1", "d": "x"}',
                       headers={"Content-Type": "application/json", "Authorization": "Basic b3BzOndyb25n"})
    assert connection.getresponse().status == 401
    wait_until(lambda: _lines(logged, r": http mesh\.send user=- from=127\.0\.0\.1 result=102$"),
               what="the refused request in the access log")


def test_the_access_log_is_off_by_default(cluster):
    assert cluster.http("/v1/mesh/publish", {"c": "quiet", "d": "x"})[0] == 200
    assert cluster.api().request("mesh.publish", {"c": "quiet", "d": "y"})["E"] is None
    assert not _lines(cluster, "")


def test_a_requested_stop_logs_its_removals_at_info(tmp_path):
    """`meshgate start` stopped with SIGTERM: each node says goodbye, and that is not a warning."""
    instance = Cluster(tmp_path, workers=2)
    with running(instance):
        pass
    removals = [line for line in instance.log_path.read_text(errors="replace").splitlines()
                if "removed: said goodbye" in line]
    assert len(removals) == 2 and all(" INFO meshgate.coordinator: " in line for line in removals), removals


def test_node_lines_name_the_node_id_once_it_is_known(logged):
    """Before registration a node's lines say `node-wN`; from then on `node<id>-wN`, whichever worker it is."""
    text = logged.log_path.read_text(errors="replace")
    for node in logged.status()["nodes"]:
        ready = re.search(r" node%d-w(\d)\[%d\] INFO meshgate\.node: node %d ready" % (node["node_id"], node["pid"],
                                                                                         node["node_id"]), text)
        assert ready, f"node {node['node_id']} (pid {node['pid']}) is not named in its lines"
        assert re.search(r" node-w%s\[%d\] " % (ready.group(1), node["pid"]), text)   # its first lines
