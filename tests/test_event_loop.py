"""node.event_loop: the node processes run on uvloop when it is installed, on asyncio's loop when asked."""

import pytest
import yaml

from conftest import Cluster, channel, running, wait_until


def _with_loop(cluster: Cluster, choice) -> Cluster:
    config = yaml.safe_load(cluster.config_path.read_text())
    if choice is not None:
        config["node"]["event_loop"] = choice
    cluster.config_path.write_text(yaml.safe_dump(config))
    return cluster


@pytest.mark.parametrize("choice, expected", [(None, "uvloop"), ("asyncio", "asyncio")])
def test_nodes_run_on_the_chosen_loop_and_serve(tmp_path, choice, expected):
    pytest.importorskip("uvloop", reason="uvloop is not installed here; auto means asyncio")
    with running(_with_loop(Cluster(tmp_path, workers=2), choice)) as cluster:
        wait_until(lambda: cluster.logs().count(f", {expected}, ") == 2, what=f"both nodes ready on {expected}")
        [client] = cluster.clients(1)
        api = cluster.api()
        name = channel()
        assert api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": [name]})["E"] is None
        status, body = cluster.http("/v1/mesh/publish", {"c": name, "d": "on " + expected})
        assert (status, body["r"]) == (200, {"s": 1, "f": 0})
        assert client.recv() == "on " + expected
