"""channel.presence and channel.count (docs/protocol.md, Presence): mesh-wide, exact, bounded by the forward
timeout, over HTTP, /ws/v1 and the entry API."""

import http.client
import json
import os
import signal
import textwrap
import time

import pytest

from conftest import WAIT, Cluster, assert_error, channel, running, wait_until

PRESENCE_ENTRY = textwrap.dedent('''
    import json

    async def on_message(conn, frame):
        ask = json.loads(frame["data"])
        if ask["op"] == "presence":
            conn.send(json.dumps(await mesh.presence(ask["c"], context=ask.get("context", False),
                                                     limit=ask.get("limit", 10000))))
        elif ask["op"] == "count":
            conn.send(json.dumps(await mesh.count(ask["c"])))
        elif ask["op"] == "whoami":
            conn.send(str(conn.client_id))
        elif ask["op"] == "bad":
            try:
                await mesh.presence(ask["c"], limit=-1)
            except ValueError as exc:
                conn.send("ValueError: " + str(exc))
''')


def subscribe_all(api, clients, name: str) -> None:
    for client in clients:
        assert api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": [name]})["E"] is None


def entries(result: dict) -> dict:
    return {entry["c"]: entry for entry in result["clients"]}


def test_presence_lists_every_subscriber_of_every_node(cluster):
    """Subscribers held by three nodes: every one listed once with its node, over /ws/v1 and HTTP."""
    clients = cluster.clients(6, nodes=3)
    api, room = cluster.api(), channel()
    subscribe_all(api, clients, room)
    expected = {client.client_id: client.node for client in clients}
    reply = api.request("channel.presence", {"c": room})
    assert reply["E"] is None and reply["r"]["s"] is True and reply["r"]["count"] == len(clients)
    assert {c: e["n"] for c, e in entries(reply["r"]).items()} == expected and "missing" not in reply["r"]
    assert all(set(entry) == {"c", "n"} for entry in reply["r"]["clients"])
    status, body = cluster.http("/v1/channel/presence", {"c": room})
    assert status == 200 and body["E"] is None and body["r"]["count"] == len(clients)
    assert {c: e["n"] for c, e in entries(body["r"]).items()} == expected
    assert api.request("channel.count", {"c": room})["r"] == {"s": True, "count": len(clients)}
    assert cluster.http("/v1/channel/count", {"c": room}) == (200, {"E": None, "r": {"s": True, "count": len(clients)}})
    assert api.request("conn.call", {"c": clients[0].client_id, "f": "unsubscribe", "a": [room]})["E"] is None
    assert api.request("channel.count", {"c": room})["r"]["count"] == len(clients) - 1
    clients[1].ws.close()
    wait_until(lambda: api.request("channel.count", {"c": room})["r"]["count"] == len(clients) - 2,
               what="a closed client to leave the channel")
    assert api.request("channel.presence", {"c": channel()})["r"] == {"s": True, "count": 0, "clients": []}


def test_presence_with_context_and_a_limit_under_the_count(cluster):
    clients = cluster.clients(4, nodes=2)
    api, room = cluster.api(), channel()
    subscribe_all(api, clients, room)
    for index, client in enumerate(clients):
        assert api.request("conn.call", {"c": client.client_id, "f": "set_context", "a": [{"seat": index}]})["E"] is None
    reply = api.request("channel.presence", {"c": room, "context": True})["r"]
    assert {c: e["x"] for c, e in entries(reply).items()} == {c.client_id: {"seat": i} for i, c in enumerate(clients)}
    limited = api.request("channel.presence", {"c": room, "limit": 2})["r"]
    assert limited["count"] == len(clients) and len(limited["clients"]) == 2   # clients(4, nodes=2) may hold more
    assert set(entries(limited)) <= {client.client_id for client in clients}
    none = api.request("channel.presence", {"c": room, "limit": 0})["r"]
    assert none == {"s": True, "count": len(clients), "clients": []}


@pytest.mark.parametrize("params, field", [
    (["a"], "p"), (None, "p.c"), ({}, "p.c"), ({"c": 5}, "p.c"), ({"c": ""}, "p.c"), ({"c": "a b"}, "p.c"),
    ({"c": ["a", "b"]}, "p.c"), ({"c": "a", "context": "yes"}, "p.context"), ({"c": "a", "context": 1}, "p.context"),
    ({"c": "a", "limit": -1}, "p.limit"), ({"c": "a", "limit": 100001}, "p.limit"), ({"c": "a", "limit": "5"}, "p.limit"),
    ({"c": "a", "limit": True}, "p.limit"), ({"c": "a", "limit": 1.5}, "p.limit"),
])
def test_bad_presence_params_are_101_naming_the_field(cluster, params, field):
    assert_error(cluster.api().request("channel.presence", params, req_id=7), 101, field, req_id=7)


@pytest.mark.parametrize("params, field", [({}, "c"), ({"c": 5}, "c"), ({"c": "x" * 256}, "c")])
def test_bad_count_params_over_http_are_400_and_101(cluster, params, field):
    assert_error(cluster.http("/v1/channel/count", params), 101, field)


def _http_on_another_node(cluster, avoid: int) -> http.client.HTTPConnection:
    """A keep-alive API connection held by a node other than `avoid` (the answer's X-Meshgate-Node says)."""
    for _ in range(50):
        connection = http.client.HTTPConnection("127.0.0.1", cluster.api_port, timeout=WAIT)
        connection.request("POST", "/v1/channel/count", body=b'{"c": "probe"}',
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        if int(response.headers["X-Meshgate-Node"]) != avoid:
            return connection
        connection.close()
    raise AssertionError(f"every API connection landed on node {avoid}")


def test_a_stopped_node_is_listed_missing_within_the_forward_timeout(cluster):
    """SIGSTOP the node holding some subscribers: the answer comes within forward_timeout + 0.5 s, lists it in
    `missing`, and counts only the others."""
    clients = cluster.clients(6, nodes=3)
    room = channel()
    subscribe_all(cluster.api(), clients, room)
    victim = clients[0].node
    others = [client for client in clients if client.node != victim]
    pid = next(n["pid"] for n in cluster.status()["nodes"] if n["node_id"] == victim)
    connection = _http_on_another_node(cluster, victim)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        connection.request("POST", "/v1/channel/presence", body=json.dumps({"c": room}).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        took = time.monotonic() - started
        result = json.loads(response.read())["r"]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert response.status == 200 and took <= 2 + 0.5, took
    assert result["missing"] == [victim] and result["count"] == len(others)
    assert set(entries(result)) == {client.client_id for client in others}


@pytest.fixture(scope="module")
def presence_entry(tmp_path_factory):
    folder = tmp_path_factory.mktemp("presence-entry")
    (folder / "presence_entry.py").write_text(PRESENCE_ENTRY)
    with running(Cluster(folder, workers=2, server={"entry": "presence_entry.py"})) as instance:
        yield instance


def test_entries_await_presence_and_count(presence_entry):
    clients = [presence_entry.client() for _ in range(4)]
    api, room = presence_entry.api(), channel()
    for client in clients:
        client.ws.send(json.dumps({"op": "presence", "c": channel()}))   # a channel nobody is in
        assert json.loads(client.recv()) == {"s": True, "count": 0, "clients": []}
        client.ws.send(json.dumps({"op": "whoami"}))
        client.client_id = client.recv()
    subscribe_all(api, clients, room)
    clients[0].ws.send(json.dumps({"op": "presence", "c": room, "context": True, "limit": 3}))
    answer = json.loads(clients[0].recv())
    assert answer["count"] == 4 and len(answer["clients"]) == 3 and all(e["x"] == {} for e in answer["clients"])
    clients[1].ws.send(json.dumps({"op": "count", "c": room}))
    assert json.loads(clients[1].recv()) == {"s": True, "count": 4}
    clients[2].ws.send(json.dumps({"op": "bad", "c": room}))
    assert clients[2].recv().startswith("ValueError: limit: must be an integer from 0 to 100000")
