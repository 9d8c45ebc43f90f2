"""At-least-once queue consumers (docs/protocol.md, Queue acknowledgements), on real 3-node clusters.

The clients' entry pushes each text message to the topic named in the
client's query string (`/?t=TOPIC`), so that every test has topics of its
own; it tells each client its id and node when it opens. Clients are spread
over every node process, so that events come from origins both on the
consumer's node and on others.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import WAIT, Cluster, assert_error, live_api, wait_until

ENTRY = textwrap.dedent('''
    import json

    from node.entry import QueueFull, queue

    def on_handshake(conn, request):
        conn.set_context_value("topic", request.args.get("t", "default"))
        return True

    def on_open(conn):
        conn.send(json.dumps({"c": str(conn.client_id), "n": conn.node_id}))

    def on_message(conn, frame):
        try:
            queue.push(conn.context_value("topic"), frame["data"])
        except QueueFull:
            pass   # counted as a drop by the node
''')
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _cluster(tmp_path_factory, name: str, **overrides) -> Cluster:
    folder = tmp_path_factory.mktemp(name)
    (folder / "topics.py").write_text(ENTRY)
    return Cluster(folder, workers=3, server={"entry": "topics.py"}, **overrides)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    instance = _cluster(tmp_path_factory, "acks")
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Four events per topic and node, waiting or held."""
    instance = _cluster(tmp_path_factory, "acks-small", queue={"topic_size": 4, "max_topics": 10})
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def crash(tmp_path_factory):
    instance = _cluster(tmp_path_factory, "acks-crash", node_timeout=1, forward_timeout=1)
    instance.start()
    yield instance
    instance.stop()


def new_topic() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def connect(cluster, topic: str):
    client = cluster.client(f"/?t={topic}")
    hello = json.loads(client.recv())
    client.client_id, client.node = hello["c"], hello["n"]
    return client


def spread(cluster, topic: str, count: int = 3) -> list:
    """At least `count` clients of `topic`, more until every node process holds one (bounded)."""
    clients = []
    for _ in range(count + 60):
        clients.append(connect(cluster, topic))
        if len(clients) >= count and len({c.node for c in clients}) == cluster.workers:
            return clients
    raise AssertionError(f"{len(clients)} clients landed on nodes {sorted({c.node for c in clients})} only")


def pop(api, topic: str, **options) -> None:
    reply = api.request("queue.pop", {"t": [topic], **options})
    assert reply["E"] is None and reply["r"] == {"s": True}, reply


def ack(api, keys: list) -> int:
    reply = api.request("queue.ack", {"k": keys})
    assert reply["E"] is None and set(reply["r"]) == {"s", "n"} and reply["r"]["s"] is True, reply
    return reply["r"]["n"]


def events(api, count: int, timeout: float = WAIT) -> list:
    deadline = time.monotonic() + timeout
    return [api.event(max(deadline - time.monotonic(), 0.001)) for _ in range(count)]


def figure(cluster, node_id: int, name: str):
    return next(n[name] for n in cluster.status()["nodes"] if n["node_id"] == node_id)


def test_what_a_closed_consumer_left_unacknowledged_goes_to_the_next_once(cluster):
    """1,000 messages from clients on every node: the first consumer acks half and closes; the second
    receives exactly the other half, each once, with a = 2; nothing is lost."""
    topic = new_topic()
    first = cluster.api()
    pop(first, topic, ack=True, window=1000)
    clients = spread(cluster, topic)
    sent = [f"m{index}" for index in range(1000)]
    for index, data in enumerate(sent):
        clients[index % len(clients)].ws.send(data)
    got = events(first, 1000)
    assert sorted(event["p"]["d"] for event in got) == sorted(sent)
    assert {event["p"]["a"] for event in got} == {1}
    assert all(isinstance(event["p"]["k"], str) for event in got)
    assert len({event["p"]["k"] for event in got}) == 1000, "every delivery has its own id"
    assert {event["p"]["n"] for event in got} == {c.node for c in clients}, "origins: every node"
    done, left = got[::2], got[1::2]
    assert sum(ack(first, [e["p"]["k"] for e in done[start:start + 100]]) for start in range(0, 500, 100)) == 500
    assert ack(first, [e["p"]["k"] for e in done[:10]]) == 0, "already acknowledged"
    second = cluster.api()
    pop(second, topic, ack=True, window=1000)
    first.ws.close()
    again = events(second, 500)
    assert sorted(event["p"]["d"] for event in again) == sorted(event["p"]["d"] for event in left)
    assert {event["p"]["a"] for event in again} == {2}
    by_data = {event["p"]["d"]: event["p"] for event in left}
    for event in again:
        earlier = by_data[event["p"]["d"]]
        assert (event["p"]["c"], event["p"]["n"], event["p"]["t"]) == (earlier["c"], earlier["n"], topic)
    assert ack(second, [e["p"]["k"] for e in again]) == 500
    assert second.no_event_for(0.5), "nothing is delivered a third time"
    wait_until(lambda: all(n["queue_depth"] == 0 for n in cluster.status()["nodes"]), what="nothing waits")


def test_window_bounds_what_is_unacknowledged_and_acks_let_the_rest_flow(cluster):
    """Never more than `window` events unacknowledged; acks let more come at once (the consumer's node tells
    the origins it refused that there is room: no waiting for their probe, a second); each client's order
    holds."""
    topic, window = new_topic(), 4
    consumer = cluster.api()
    pop(consumer, topic, ack=True, window=window)
    clients = spread(cluster, topic)
    sent = defaultdict(list)
    for index in range(24):
        client = clients[index % len(clients)]
        sent[client.client_id].append(f"w{index}")
        client.ws.send(f"w{index}")
    received, outstanding, total, rounds, refills = defaultdict(list), [], 0, 0, []
    while total < 24:
        acked_at = time.monotonic()
        arrived = events(consumer, min(window - len(outstanding), 24 - total))
        if rounds:
            refills.append(time.monotonic() - acked_at)
        for event in arrived:
            received[event["p"]["c"]].append(event["p"]["d"])
            assert event["p"]["a"] == 1
        outstanding += arrived
        total += len(arrived)
        if len(outstanding) == window:
            assert consumer.no_event_for(0.2), f"more than {window} unacknowledged"
        # One ack, then all that is outstanding: the window opens by one event, then by all of it.
        count = 1 if rounds % 2 == 0 else len(outstanding)
        assert ack(consumer, [event["p"]["k"] for event in outstanding[:count]]) == count
        outstanding, rounds = outstanding[count:], rounds + 1
    assert dict(received) == dict(sent), "each client's messages in the order it sent them"
    assert ack(consumer, [event["p"]["k"] for event in outstanding]) == len(outstanding)
    assert consumer.no_event_for(0.2)
    assert sorted(refills)[len(refills) // 2] < 0.5, f"refills took {refills} s"


def test_an_event_not_acknowledged_in_time_comes_again(cluster):
    """With ack_timeout 1 s, an unacknowledged event comes again with a = 2 and a new k; another
    connection cannot acknowledge it; the old k counts 0 and nothing comes a third time."""
    topic = new_topic()
    consumer, other = cluster.api(), cluster.api()
    pop(consumer, topic, ack=True, ack_timeout=1)
    clients = spread(cluster, topic)
    for client in clients:
        client.ws.send(f"late-{client.client_id}")
    first = {event["p"]["c"]: event["p"] for event in events(consumer, len(clients))}
    assert {p["a"] for p in first.values()} == {1}
    assert ack(other, [p["k"] for p in first.values()]) == 0, "ids are the consumer's own"
    started = time.monotonic()
    again = {event["p"]["c"]: event["p"] for event in events(consumer, len(clients), timeout=WAIT + 1)}
    assert time.monotonic() - started > 0.5
    assert set(again) == set(first)
    for client_id, payload in again.items():
        assert payload["a"] == 2 and payload["k"] != first[client_id]["k"]
        assert payload["d"] == first[client_id]["d"] and payload["n"] == first[client_id]["n"]
    assert ack(consumer, [p["k"] for p in first.values()]) == 0, "the first delivery was taken back"
    assert ack(consumer, [p["k"] for p in again.values()]) == len(clients)
    assert consumer.no_event_for(1.5)


def test_unpop_delivers_what_was_unacknowledged_to_another_consumer(cluster):
    """queue.unpop of the topic hands its unacknowledged events to another consumer with a = 2; other
    topics of the connection keep theirs."""
    topic, kept = new_topic(), new_topic()
    first, second = cluster.api(), cluster.api()
    pop(first, topic, ack=True)
    pop(first, kept, ack=True)
    clients = spread(cluster, topic)
    for index, client in enumerate(clients):
        client.ws.send(f"u{index}")
    keeper = connect(cluster, kept)
    keeper.ws.send("kept")
    got = events(first, len(clients) + 1)
    [held] = [event for event in got if event["p"]["t"] == kept]
    got = [event for event in got if event["p"]["t"] == topic]
    assert ack(first, [got[0]["p"]["k"]]) == 1
    pop(second, topic, ack=True)
    assert first.request("queue.unpop", {"t": [topic]})["E"] is None
    again = events(second, len(got) - 1)
    assert sorted(e["p"]["d"] for e in again) == sorted(e["p"]["d"] for e in got[1:])
    assert {e["p"]["a"] for e in again} == {2}
    assert ack(first, [e["p"]["k"] for e in got[1:]]) == 0
    assert ack(first, [held["p"]["k"]]) == 1, "the other topic's event stayed with its consumer"
    assert ack(second, [e["p"]["k"] for e in again]) == len(again)
    assert second.no_event_for(0.3) and first.no_event_for(0.1)


def test_what_a_killed_consumers_node_had_goes_to_another_consumer(crash):
    """kill -9 of the node of an at-least-once consumer: the origins deliver what it had to another consumer,
    with a = 2, once the coordinator says that node is gone (not after ack_timeout)."""
    topic = new_topic()
    first = crash.api()
    pop(first, topic, ack=True, ack_timeout=3600)
    victim = wait_until(lambda: [n["node_id"] for n in crash.status()["nodes"] if n["consumers"]], what="its node")
    [victim] = victim
    clients = [c for c in spread(crash, topic) if c.node != victim]
    sent = [f"k{index}" for index in range(30)]
    for index, data in enumerate(sent):
        clients[index % len(clients)].ws.send(data)
    assert sorted(e["p"]["d"] for e in events(first, len(sent))) == sorted(sent)
    os.kill(next(n["pid"] for n in crash.status()["nodes"] if n["node_id"] == victim), signal.SIGKILL)
    second = live_api(crash)   # a connection the kernel queued on the killed node's socket is reset: another
    pop(second, topic, ack=True)
    again = events(second, len(sent), timeout=WAIT)
    assert sorted(e["p"]["d"] for e in again) == sorted(sent) and {e["p"]["a"] for e in again} == {2}
    assert ack(second, [e["p"]["k"] for e in again]) == len(sent)
    assert second.no_event_for(0.3)


def test_held_events_count_against_the_topic_bounds(small):
    """topic_size 4, window 2: two held and two waiting fill the topic; more is dropped and counted until
    acks make room."""
    topic = new_topic()
    consumer = small.api()
    pop(consumer, topic, ack=True, window=2)
    client = connect(small, topic)
    dropped = figure(small, client.node, "queue_dropped")
    for index in range(6):
        client.ws.send(f"b{index}")
    first = events(consumer, 2)
    assert [e["p"]["d"] for e in first] == ["b0", "b1"]
    wait_until(lambda: figure(small, client.node, "queue_dropped") == dropped + 2, what="two drops")
    assert consumer.no_event_for(0.3)
    assert ack(consumer, [e["p"]["k"] for e in first]) == 2
    second = events(consumer, 2)
    assert [e["p"]["d"] for e in second] == ["b2", "b3"]
    client.ws.send("b6")
    client.ws.send("b7")
    client.ws.send("b8")   # two held, two waiting: this one is dropped
    wait_until(lambda: figure(small, client.node, "queue_dropped") == dropped + 3, what="the third drop")
    assert ack(consumer, [e["p"]["k"] for e in second]) == 2
    third = events(consumer, 2)
    assert [e["p"]["d"] for e in third] == ["b6", "b7"]
    assert ack(consumer, [e["p"]["k"] for e in third]) == 2
    wait_until(lambda: figure(small, client.node, "queue_depth") == 0, what="nothing waits")


def test_at_most_once_consumers_are_unchanged(cluster):
    """Without ack an event is byte for byte what it was (no k, no a); queue.ack there is harmless; one
    connection may consume one topic at most once and another at least once."""
    plain, acked = new_topic(), new_topic()
    consumer = cluster.api()
    assert ack(consumer, ["1", "a"]) == 0, "nothing consumed yet"
    pop(consumer, plain)
    pop(consumer, acked, ack=True)
    client, other = connect(cluster, plain), connect(cluster, acked)
    client.ws.send("as before")
    consumer.ws.settimeout(WAIT)
    raw = consumer.ws.recv()
    assert raw == ('{"e":"queue.pop","p":{"n":%d,"c":"%s","t":"%s","d":"as before"},"i":null}'
                   % (client.node, client.client_id, plain))
    assert ack(consumer, ["1", "2"]) == 0
    other.ws.send("acknowledged")
    [event] = events(consumer, 1)
    assert list(event["p"]) == ["k", "a", "n", "c", "t", "d"] and event["p"]["t"] == acked
    assert ack(consumer, [event["p"]["k"]]) == 1
    assert_error(consumer.request("queue.pop", {"t": [plain], "ack": True}, req_id="twice"), 202, "p.t", "twice")
    assert_error(consumer.request("queue.pop", {"t": [acked]}, req_id="twice"), 202, "p.t", "twice")


@pytest.mark.parametrize("method, params, field", [
    ("queue.pop", {"t": ["x"], "ack": "yes"}, "p.ack"),
    ("queue.pop", {"t": ["x"], "ack": True, "window": 0}, "p.window"),
    ("queue.pop", {"t": ["x"], "ack": True, "window": 10001}, "p.window"),
    ("queue.pop", {"t": ["x"], "ack": True, "window": 2.5}, "p.window"),
    ("queue.pop", {"t": ["x"], "ack": True, "ack_timeout": 0}, "p.ack_timeout"),
    ("queue.pop", {"t": ["x"], "ack": True, "ack_timeout": 3601}, "p.ack_timeout"),
    ("queue.pop", {"t": ["x"], "ack": True, "ack_timeout": "30"}, "p.ack_timeout"),
    ("queue.ack", {}, "p.k"),
    ("queue.ack", {"k": "1"}, "p.k"),
    ("queue.ack", {"k": ["1", 2]}, "p.k[1]"),
    ("queue.ack", {"k": ["1"] * 10001}, "p.k"),
])
def test_bad_parameters_are_101_naming_the_field(cluster, method, params, field):
    """Bad new fields of queue.pop and bad queue.ack parameters are 101 naming the field; the connection
    keeps answering."""
    api = cluster.api()
    assert_error(api.request(method, params, req_id="bad"), 101, field, "bad")
    assert ack(api, []) == 0


def test_a_later_pop_keeps_the_connections_window_and_timeout(cluster):
    """A connection's second at-least-once queue.pop may repeat or omit window and ack_timeout, not change them."""
    api = cluster.api()
    pop(api, new_topic(), ack=True, window=7, ack_timeout=5)
    pop(api, new_topic(), ack=True)
    pop(api, new_topic(), ack=True, window=7, ack_timeout=5)
    assert_error(api.request("queue.pop", {"t": [new_topic()], "ack": True, "window": 8}, req_id=1), 101,
                 "p.window", 1)
    assert_error(api.request("queue.pop", {"t": [new_topic()], "ack": True, "ack_timeout": 6}, req_id=2), 101,
                 "p.ack_timeout", 2)


def unacked(cluster) -> float:
    """meshgate_queue_unacked summed over the nodes, from the coordinator's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.coordinator_port}/metrics", timeout=WAIT) as response:
        text = response.read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("meshgate_queue_unacked{"))


def test_example_consumer_acknowledges_what_it_prints(cluster):
    """examples/consumer.py --ack prints each event and acknowledges it: nothing stays held, nothing comes again."""
    topic = new_topic()
    process = subprocess.Popen([sys.executable, str(EXAMPLES / "consumer.py"), "--ack", "--topic", topic,
                                "--api", f"ws://127.0.0.1:{cluster.api_port}/ws/v1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert "at least once" in process.stderr.readline()
        client = connect(cluster, topic)
        for index in range(3):
            client.ws.send(f"x{index}")
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
        printed = [json.loads(lines.get(timeout=WAIT))["p"] for _ in range(3)]
        assert [(p["d"], p["a"]) for p in printed] == [("x0", 1), ("x1", 1), ("x2", 1)]
        wait_until(lambda: unacked(cluster) == 0, what="the example's acknowledgements")
    finally:
        process.terminate()
        process.wait(WAIT)
    after = cluster.api()   # unacknowledged events would come to it at once
    pop(after, topic, ack=True)
    assert after.no_event_for(0.5)
