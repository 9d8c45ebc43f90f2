"""docs/entries.md, promise by promise, through a real 2-process cluster and real WebSocket clients.

Complements tests/test_entries.py and tests/test_shipped_entries.py: what they
already check is not checked again here.
"""

import base64
import json
import os
import re
import signal
import socket
import textwrap
import time
import urllib.error
import urllib.request
import uuid

import pytest
import websocket

from cluster.ids import node_id_of
from conftest import WAIT, Cluster, free_port, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEW_WAITING = 20   # node.servers[].max_pending of a second server of the main entry, at /few-waiting

# The main entry: `mesh` and `queue` are used as the module globals the node provides (no import).
SPEC_ENTRY = textwrap.dedent('''
    import asyncio
    import json
    import time
    from urllib.parse import parse_qs

    from node.entry import ConnectionGone, ContextTimeout, Refuse

    CONNS = {}          # client_id -> conn, this process only
    JOBS = []           # client ids whose module job should run


    def _tick():
        """A job of the module, run by a timer: outside any hook."""
        try:
            while JOBS:
                client_id = JOBS.pop(0)
                try:
                    queue.push("spec-outside", {"job": "without client_id"})
                except ValueError:
                    without = "ValueError"
                except Exception as exc:
                    without = type(exc).__name__
                else:
                    without = "pushed"
                queue.push("spec-outside", {"job": "with client_id"}, client_id=client_id)
                conn = CONNS.get(client_id)
                if conn is not None:
                    conn.send({"outside": without})
        finally:
            asyncio.get_running_loop().call_later(0.05, _tick)


    asyncio.get_running_loop().call_later(0.05, _tick)


    async def on_handshake(conn, request):
        await asyncio.sleep(0.01)
        if request.headers.get("X-Deny") == "yes":
            return False
        verdict = request.args.get("hs")
        if verdict == "refuse":
            raise Refuse()
        if verdict == "fail":
            raise RuntimeError("handshake failure on purpose")
        if request.args.get("report"):
            conn.set_context_value("close_topic", request.args["report"])
        conn.set_context_value("handshake", {
            "path": request.path, "query": request.query, "args": dict(request.args),
            "probe": request.headers.get("X-Probe"), "addr": request.remote_addr})
        return True


    def on_open(conn):
        CONNS[conn.client_id] = conn
        wanted = parse_qs(conn.query).get("open", [""])[-1]
        if wanted == "close":
            conn.close(4100, "not today")
            return
        if wanted == "fail":
            raise RuntimeError("on_open failure on purpose")
        conn.send({"hello": str(conn.client_id), "id_type": type(conn.client_id).__name__,
                   "node": conn.node_id, "topic": conn.topic, "context": conn.context})


    async def on_message(conn, frame):
        if frame["type"] == "binary":
            conn.send({"echo": frame})
            return
        try:
            msg = json.loads(frame["data"])
        except ValueError:
            conn.send({"echo": frame})
            return
        op = msg["op"]
        if op == "kinds":
            returns = [conn.send(b"bytes-as-text"), conn.send(b"\\x00\\xff\\x10", type="binary"),
                       conn.send("text-as-binary", type="binary"), conn.send({"a": 1, "b": [1, 2], "c": "x"}),
                       conn.send([1, "two", None]), conn.send("plain")]
            conn.send({"returns": returns})
        elif op == "sub":
            await conn.subscribe(*msg["channels"])
            conn.send({"joined": sorted(conn.channels)})
        elif op == "sub_now":
            future = conn.subscribe(*msg["channels"])
            now = sorted(conn.channels)
            await future
            conn.send({"now": now})
        elif op == "unsub":
            conn.unsubscribe(*msg["channels"])
            conn.send({"left": sorted(conn.channels)})
        elif op == "bad":
            results = []
            for name in msg["names"]:
                row = []
                for action in ("subscribe", "unsubscribe", "publish"):
                    try:
                        if action == "subscribe":
                            await conn.subscribe(name)
                        elif action == "unsubscribe":
                            conn.unsubscribe(name)
                        else:
                            await mesh.publish(name, "probe")
                    except ValueError:
                        row.append("ValueError")
                    except Exception as exc:
                        row.append(type(exc).__name__)
                    else:
                        row.append("ok")
                results.append(row)
            conn.send({"results": results, "channels": sorted(conn.channels)})
        elif op == "wait":
            started = time.monotonic()
            try:
                value = await conn.wait_context_value(msg["key"], msg["timeout"])
            except TimeoutError as exc:
                conn.send({"timeout": type(exc).__name__, "is_context_timeout": isinstance(exc, ContextTimeout)})
            except ConnectionGone:
                queue.push(msg["report"], {"gone": msg["key"]})
            else:
                conn.send({"value": value, "after": time.monotonic() - started})
        elif op == "n":
            conn.send({"n": msg["n"]})
        elif op == "setctx":
            conn.set_context(msg["context"])
            conn.send({"context": conn.context})
        elif op == "setval":
            conn.set_context_value(msg["key"], msg["value"])
            conn.send({"context": conn.context})
        elif op == "ctx":
            conn.send({"context": conn.context, "value": conn.context_value(msg["key"], "fallback")})
        elif op == "poke":
            target = CONNS.get(int(msg["target"]))
            if target is not None:
                target.set_context_value(msg["key"], msg["value"])
            conn.send({"poked": target is not None})
        elif op == "publish":
            if msg.get("type") == "binary":
                s, f = await mesh.publish(msg["channels"], bytes.fromhex(msg["hex"]), type="binary")
            else:
                s, f = await mesh.publish(msg["channels"], msg["data"])
            conn.send({"s": s, "f": f})
        elif op == "send_binary":
            ok = await mesh.send(msg["target"], bytes.fromhex(msg["hex"]), type="binary")
            conn.send({"sent": ok})
        elif op == "sleep":
            conn.send({"sleeping": msg["seconds"]})
            await asyncio.sleep(msg["seconds"])
            queue.push(msg["report"], {"slept": msg["seconds"]})
        elif op == "later":
            JOBS.append(conn.client_id)
            conn.send({"queued": True})
        elif op == "close":
            conn.close()
        elif op == "block_async":
            await asyncio.sleep(0)
            time.sleep(0.15)
            conn.send("blocked")


    def on_close(conn, code, reason):
        CONNS.pop(conn.client_id, None)
        sent = conn.send("too late")
        topic = conn.context_value("close_topic")
        if topic:
            queue.push(topic, {"code": code, "reason": reason, "send_returned": sent})
        farewell = conn.context_value("farewell")
        if farewell:
            mesh.publish(farewell, {"left": str(conn.client_id)})   # a plain hook: not awaited
''')

ONLY_OPEN_ENTRY = textwrap.dedent('''
    def on_open(conn):
        conn.send(str(conn.client_id))
''')

SLOW_HANDSHAKE_ENTRY = textwrap.dedent('''
    import asyncio

    async def on_handshake(conn, request):
        await asyncio.sleep(float(request.args.get("delay", "0")))
        return True

    def on_open(conn):
        conn.send("open")
''')

RELOAD_V1 = textwrap.dedent('''
    COUNT = {"n": 0}

    async def on_message(conn, frame):
        COUNT["n"] += 1
        word, _, rest = frame["data"].partition(" ")
        if word == "join":
            await conn.subscribe(rest)
            conn.set_context_value("kept", "yes")
        conn.send("v1 %d %d" % (COUNT["n"], conn.node_id))
''')

RELOAD_V2 = textwrap.dedent('''
    import json

    COUNT = {"n": 0}

    def on_open(conn):
        conn.send("opened v2")

    def on_message(conn, frame):
        COUNT["n"] += 1
        conn.send(json.dumps({"v": 2, "n": COUNT["n"], "node": conn.node_id, "kept": conn.context_value("kept"),
                              "channels": sorted(conn.channels)}))
''')


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec")
    (folder / "spec_hooks.py").write_text(SPEC_ENTRY)
    (folder / "only_open.py").write_text(ONLY_OPEN_ENTRY)
    (folder / "slow_handshake.py").write_text(SLOW_HANDSHAKE_ENTRY)
    absolute = folder / "elsewhere" / "reloading.py"
    absolute.parent.mkdir()
    absolute.write_text(RELOAD_V1)
    slow_port, no_demo_port, null_demo_port = free_port(), free_port(), free_port()
    instance = Cluster(folder, workers=2, server={"entry": "spec_hooks.py", "topic": "spec-topic"},
                       extra_servers=[
                           {"path": "/nomsg", "topic": "nomsg-topic", "entry": "only_open.py"},
                           {"path": "/reload", "entry": str(absolute), "reload": True},
                           {"path": "/chat", "entry": os.path.join(ROOT, "conf", "entries", "chat.py"),
                            "demo": "/demo"},
                           {"port": slow_port, "path": "/", "entry": "slow_handshake.py", "read_timeout": 1},
                           {"port": no_demo_port, "path": "/chat"},
                           {"port": null_demo_port, "path": "/chat", "demo": None},
                           {"path": "/few-waiting", "entry": "spec_hooks.py", "topic": "spec-topic",
                            "max_pending": FEW_WAITING},
                       ])
    instance.reload_path = absolute
    instance.slow_port = slow_port
    instance.no_demo_port = no_demo_port
    instance.null_demo_port = null_demo_port
    instance.start()
    yield instance
    instance.stop()


# --- helpers -------------------------------------------------------------------

def connect(cluster, query="", headers=None, path="/"):
    """A client of the main entry and its hello (sent by on_open)."""
    client = cluster.client(f"{path}?{query}" if query else path, header=headers or {})
    hello = json.loads(client.recv())
    client.client_id = hello["hello"]
    client.node = hello["node"]
    return client, hello


def spread(cluster, count):
    """`count` clients of the main entry, with both node processes represented."""
    clients = []
    for _ in range(40):
        clients.append(connect(cluster)[0])
        if len(clients) >= count and len({c.node for c in clients}) == 2:
            break
    assert len({c.node for c in clients}) == 2, "the clients all landed on one node process"
    return clients


def ask(client, **message):
    client.ws.send(json.dumps(message))
    return json.loads(client.recv())


def frame_of(client):
    """`(opcode, bytes)` of the next data message."""
    opcode, data = client.recv_frame()
    return opcode, data.encode() if isinstance(data, str) else data


def consumer_of(cluster, topic):
    consumer = cluster.api()
    assert consumer.request("queue.pop", [topic])["E"] is None
    return consumer


def topic_name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def full_log(cluster):
    return cluster.log_path.read_text(errors="replace")


def hook_errors(cluster):
    return cluster.status()["totals"]["hook_errors"]


def hook_errors_by_node(cluster):
    return {node["node_id"]: node["hook_errors"] for node in cluster.status()["nodes"]}


def failed_handshakes(cluster, log_start=0):
    """Client ids of the on_handshake failures logged after `log_start` (characters of the log)."""
    return [int(found) for found in re.findall(r"on_handshake failed for client (\d+)", full_log(cluster)[log_start:])]


def http_get(port, path):
    """`(status, content type, body)` of a plain GET on a client port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read().decode(errors="replace")


# --- handshake and conn members ------------------------------------------------------

def test_async_handshake_sees_request_fields_and_conn_members(spec):
    """An async on_handshake reads path, query, last-value args, headers and remote_addr; conn has topic and an int id."""
    client, hello = connect(spec, "a=1&a=2&b=x", headers={"X-Probe": "probe-1"})
    assert hello["context"] == {"handshake": {"path": "/", "query": "a=1&a=2&b=x", "args": {"a": "2", "b": "x"},
                                              "probe": "probe-1", "addr": "127.0.0.1"}}
    assert hello["id_type"] == "int" and hello["topic"] == "spec-topic"
    assert hello["node"] == node_id_of(int(client.client_id))
    client.ws.close()


def test_async_handshake_returning_false_refuses_with_403(spec):
    """An async on_handshake whose awaitable gives False refuses the upgrade with HTTP 403."""
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://127.0.0.1:{spec.client_port}/", timeout=WAIT,
                                    header={"X-Deny": "yes"})
    assert refused.value.status_code == 403


def test_refuse_is_quiet_and_other_handshake_errors_are_counted(spec):
    """Refuse is neither logged nor counted; each other exception in on_handshake is logged and counted once."""
    before = hook_errors_by_node(spec)
    log_start = len(full_log(spec))
    for _ in range(4):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(f"ws://127.0.0.1:{spec.client_port}/?hs=refuse", timeout=WAIT)
        assert refused.value.status_code == 403
    # Then failing handshakes until every node process has had one (its log line names the client, whose id
    # names the node). A node's figures cover all it did before, so once each node reports its failures,
    # a counted refusal would show.
    failures, deadline = {}, time.monotonic() + WAIT
    for _ in range(40):
        with pytest.raises(websocket.WebSocketBadStatusException) as failed:
            websocket.create_connection(f"ws://127.0.0.1:{spec.client_port}/?hs=fail", timeout=WAIT)
        assert failed.value.status_code == 403
        seen = sum(failures.values())
        logged = wait_until(lambda: failed_handshakes(spec, log_start)[seen:], what="the failing handshake's log")
        assert len(logged) == 1, logged
        node = node_id_of(logged[0])
        failures[node] = failures.get(node, 0) + 1
        if failures.keys() == before.keys() or time.monotonic() > deadline:
            break
    assert failures.keys() == before.keys(), f"the failing handshakes all landed on node(s) {sorted(failures)}"
    expected = {node: count + failures.get(node, 0) for node, count in before.items()}
    wait_until(lambda: all(hook_errors_by_node(spec)[node] >= count for node, count in expected.items()),
               what="every node to report its failing handshakes")
    assert hook_errors_by_node(spec) == expected
    assert len(failed_handshakes(spec, log_start)) == sum(failures.values()), "a Refuse was logged as a failure"
    assert "RuntimeError: handshake failure on purpose" in full_log(spec)[log_start:]


def test_async_handshake_is_refused_after_read_timeout(spec):
    """An async on_handshake that has not decided within read_timeout (1 s here) is refused with 403 and logged."""
    ok = websocket.create_connection(f"ws://127.0.0.1:{spec.slow_port}/?delay=0.3", timeout=WAIT)
    ok.settimeout(WAIT)
    assert ok.recv() == "open"
    ok.close()
    mentions = full_log(spec).count("on_handshake")
    started = time.monotonic()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://127.0.0.1:{spec.slow_port}/?delay=30", timeout=WAIT)
    elapsed = time.monotonic() - started
    assert refused.value.status_code == 403
    assert 0.8 <= elapsed < 5, elapsed
    wait_until(lambda: full_log(spec).count("on_handshake") > mentions, what="the slow handshake to be logged")


def test_exception_in_on_open_keeps_the_connection_and_is_counted(spec):
    """on_open raising: the connection stays open and serves messages; hook_errors grows (status and /metrics)."""
    before = hook_errors(spec)
    client = spec.client("/?open=fail")
    assert ask(client, op="n", n=7) == {"n": 7}
    wait_until(lambda: hook_errors(spec) > before, what="hook_errors to count the on_open failure")
    log = full_log(spec)
    assert "on_open failed for client" in log and "RuntimeError: on_open failure on purpose" in log

    def counted() -> float:   # each node's metrics reach the coordinator once a second
        with urllib.request.urlopen(f"http://127.0.0.1:{spec.coordinator_port}/metrics", timeout=WAIT) as response:
            metrics = response.read().decode()
        return sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("meshgate_hook_errors_total{"))

    wait_until(lambda: counted() >= before + 1, what="meshgate_hook_errors_total to count it")
    client.ws.close()


# --- conn.send and frames ----------------------------------------------------------------------

def test_conn_send_accepts_str_bytes_dict_list_and_binary_type(spec):
    """conn.send: bytes as text, type="binary" for bytes and str, dict/list as compact JSON text; returns True."""
    client, _ = connect(spec)
    client.ws.send(json.dumps({"op": "kinds"}))
    text, binary = websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY
    assert frame_of(client) == (text, b"bytes-as-text")
    assert frame_of(client) == (binary, b"\x00\xff\x10")
    assert frame_of(client) == (binary, b"text-as-binary")
    opcode, raw = frame_of(client)
    assert opcode == text and json.loads(raw) == {"a": 1, "b": [1, 2], "c": "x"} and b" " not in raw
    opcode, raw = frame_of(client)
    assert opcode == text and json.loads(raw) == [1, "two", None] and b" " not in raw
    assert frame_of(client) == (text, b"plain")
    assert json.loads(client.recv()) == {"returns": [True] * 6}
    client.ws.close()


def test_on_message_frames_for_text_and_binary(spec):
    """on_message gets {"type","data","finish"}: text as str, binary as standard base64."""
    client, _ = connect(spec)
    client.ws.send("héllo wörld")
    assert json.loads(client.recv()) == {"echo": {"type": "text", "data": "héllo wörld", "finish": True}}
    payload = bytes(range(256)) + b"\xfb\xff"
    client.ws.send_binary(payload)
    assert json.loads(client.recv()) == {"echo": {"type": "binary", "data": base64.b64encode(payload).decode(),
                                                  "finish": True}}
    client.ws.close()


# --- channels ---------------------------------------------------------------------------

def test_subscribe_is_immediate_in_conn_channels_and_unsubscribe_updates_it(spec):
    """conn.channels has the channels right after subscribe() (before awaiting it), and loses them on unsubscribe."""
    client, _ = connect(spec)
    a, b = topic_name("now-a"), topic_name("now-b")
    assert ask(client, op="sub_now", channels=[a, b]) == {"now": sorted([a, b])}
    assert ask(client, op="unsub", channels=[a]) == {"left": [b]}
    assert ask(client, op="unsub", channels=[b]) == {"left": []}
    client.ws.close()


def test_unsubscribe_of_unknown_channels_is_fine_and_stops_delivery(spec):
    """Unsubscribing channels never joined raises nothing; after unsubscribing, publishes no longer reach the client."""
    client, _ = connect(spec)
    kept, dropped = topic_name("kept"), topic_name("dropped")
    assert ask(client, op="sub", channels=[kept, dropped]) == {"joined": sorted([kept, dropped])}
    assert ask(client, op="unsub", channels=["never-joined", topic_name("other"), dropped]) == {"left": [kept]}
    wait_until(lambda: spec.http("/v1/mesh/publish", {"c": dropped, "d": "gone"})[1]["r"] == {"s": 0, "f": 0},
               what="the unsubscribed channel to reach nobody")
    assert spec.http("/v1/mesh/publish", {"c": kept, "d": "still here"})[1]["r"] == {"s": 1, "f": 0}
    assert client.recv() == "still here"
    assert client.nothing_for(0.2)
    client.ws.close()


def test_awaited_subscribe_guarantees_a_later_publish_from_any_node(spec):
    """Once the awaited subscribe completed, a publish from another API connection (any node) reaches the client; many rounds."""
    clients = spread(spec, 6)
    for round_ in range(30):
        client = clients[round_ % len(clients)]
        channel = topic_name(f"guarantee-{round_}")
        assert ask(client, op="sub", channels=[channel])["joined"] == [channel]
        status, body = spec.http("/v1/mesh/publish", {"c": channel, "d": f"round {round_}"})
        assert body["r"] == {"s": 1, "f": 0}, (round_, client.node, body)
        assert client.recv() == f"round {round_}"
        assert ask(client, op="unsub", channels=[channel]) == {"left": []}
    api = spec.api()
    for round_ in range(10):
        client = clients[round_ % len(clients)]
        channel = topic_name(f"guarantee-ws-{round_}")
        assert ask(client, op="sub", channels=[channel])["joined"] == [channel]
        reply = api.request("mesh.publish", {"c": channel, "d": f"ws round {round_}"})
        assert reply["r"] == {"s": 1, "f": 0}, (round_, reply)
        assert client.recv() == f"ws round {round_}"
        assert ask(client, op="unsub", channels=[channel]) == {"left": []}
    api.ws.close()
    for client in clients:
        client.ws.close()


def test_bad_channel_names_raise_value_error_in_the_entry(spec):
    """Empty, over 255 bytes, whitespace or control characters: subscribe, unsubscribe and mesh.publish raise ValueError."""
    client, _ = connect(spec)
    bad = ["", "has space", "tab\there", "new\nline", "ctl\x01", "x" * 256, "é" * 128]
    good = ["x" * 255, "é" * 127 + "x", "ünïcode:ok"]
    answer = ask(client, op="bad", names=bad + good)
    assert answer["results"] == [["ValueError"] * 3] * len(bad) + [["ok"] * 3] * len(good)
    assert answer["channels"] == []
    client.ws.close()


# --- close -------------------------------------------------------------------------------

def test_conn_close_from_on_open_with_code_and_reason(spec):
    """conn.close(4100, "not today") in on_open: the client gets that code and reason; on_close is told the same."""
    report = topic_name("closes")
    consumer = consumer_of(spec, report)
    client = spec.client(f"/?open=close&report={report}")
    assert (client.close_code(), client.close_reason) == (4100, "not today")
    event = consumer.event()
    assert event["p"]["d"] == {"code": 4100, "reason": "not today", "send_returned": False}
    consumer.ws.close()


def test_conn_close_defaults_to_1000(spec):
    """conn.close() with no arguments closes with 1000 and an empty reason."""
    report = topic_name("closes")
    consumer = consumer_of(spec, report)
    client, _ = connect(spec, f"report={report}")
    client.ws.send(json.dumps({"op": "close"}))
    assert (client.close_code(), client.close_reason) == (1000, "")
    assert consumer.event()["p"]["d"] == {"code": 1000, "reason": "", "send_returned": False}
    consumer.ws.close()


def test_on_close_gets_1006_when_the_connection_drops(spec):
    """A connection that drops without a close frame: on_close is told 1006."""
    report = topic_name("closes")
    consumer = consumer_of(spec, report)
    dropped, _ = connect(spec, f"report={report}")
    dropped.ws.sock.shutdown(socket.SHUT_RDWR)
    dropped.ws.sock.close()
    event = consumer.event()
    assert event["p"]["c"] == dropped.client_id and event["p"]["d"]["code"] == 1006
    consumer.ws.close()


def test_plain_on_close_can_publish_without_awaiting(spec):
    """A plain hook (on_close) calls mesh.publish without awaiting it; the message is still delivered mesh-wide."""
    clients = spread(spec, 2)
    leaving = clients[0]
    watcher = next(c for c in clients if c.node != leaving.node)
    channel = topic_name("farewell")
    assert ask(watcher, op="sub", channels=[channel]) == {"joined": [channel]}
    assert ask(leaving, op="setval", key="farewell", value=channel)["context"]["farewell"] == channel
    leaving.ws.close()
    assert json.loads(watcher.recv()) == {"left": leaving.client_id}
    for client in clients:
        client.ws.close()


# --- context -------------------------------------------------------------------------------

def test_set_context_replaces_everything(spec):
    """conn.set_context drops every key it does not name, for the entry and for backends."""
    client, hello = connect(spec)
    assert "handshake" in hello["context"]
    assert ask(client, op="setval", key="extra", value=[1, 2])["context"]["extra"] == [1, 2]
    assert ask(client, op="setctx", context={"fresh": {"n": 1}}) == {"context": {"fresh": {"n": 1}}}
    assert ask(client, op="ctx", key="handshake") == {"context": {"fresh": {"n": 1}}, "value": "fallback"}
    api = spec.api()
    assert api.request("conn.call", {"c": client.client_id, "f": "get_context"})["r"]["d"] == {"fresh": {"n": 1}}
    api.ws.close()
    client.ws.close()


def test_none_or_null_removes_a_context_key(spec):
    """set_context_value(key, None) in the entry, and a backend's set_context_value with null, remove the key."""
    client, _ = connect(spec)
    ask(client, op="setctx", context={"a": 1, "b": 2, "c": 3})
    assert ask(client, op="setval", key="a", value=None) == {"context": {"b": 2, "c": 3}}
    api = spec.api()
    assert api.request("conn.call", {"c": client.client_id, "f": "set_context_value", "a": ["b", None]})["E"] is None
    assert ask(client, op="ctx", key="b") == {"context": {"c": 3}, "value": "fallback"}
    assert api.request("conn.call", {"c": client.client_id, "f": "get_context"})["r"]["d"] == {"c": 3}
    api.ws.close()
    client.ws.close()


def test_wait_context_value_returns_at_once_when_the_key_is_set(spec):
    """wait_context_value returns the value at once when the key is already in the context."""
    client, _ = connect(spec)
    ask(client, op="setval", key="ready", value={"uid": 7})
    answer = ask(client, op="wait", key="ready", timeout=5)
    assert answer["value"] == {"uid": 7} and answer["after"] < 0.5
    client.ws.close()


def test_context_timeout_is_a_timeout_error(spec):
    """The wait's timeout raises ContextTimeout, which `except TimeoutError` catches."""
    client, _ = connect(spec)
    assert ask(client, op="wait", key="never", timeout=0.2) == {"timeout": "ContextTimeout",
                                                                 "is_context_timeout": True}
    client.ws.close()


def test_a_hook_of_another_connection_wakes_a_waiter(spec):
    """wait_context_value is also woken when a hook (here another connection's) sets the key."""
    clients = [connect(spec)[0] for _ in range(3)]
    by_node = {}
    for client in clients:
        by_node.setdefault(client.node, []).append(client)
    waiter, poker = next(group for group in by_node.values() if len(group) >= 2)[:2]
    waiter.ws.send(json.dumps({"op": "wait", "key": "token", "timeout": 10}))
    assert waiter.nothing_for(0.2)
    assert ask(poker, op="poke", target=waiter.client_id, key="token", value="from-a-hook") == {"poked": True}
    assert json.loads(waiter.recv())["value"] == "from-a-hook"
    for client in clients:
        client.ws.close()


def test_connection_gone_ends_the_wait_then_on_close_runs(spec):
    """A client leaving during wait_context_value raises ConnectionGone in the hook (long before the timeout); on_close follows."""
    report = topic_name("gone")
    consumer = consumer_of(spec, report)
    client, _ = connect(spec, f"report={report}")
    client.ws.send(json.dumps({"op": "wait", "key": "never", "timeout": 60, "report": report}))
    assert client.nothing_for(0.2)
    started = time.monotonic()
    client.ws.close()
    first, second = consumer.event(), consumer.event()
    assert time.monotonic() - started < 5
    assert first["p"]["d"] == {"gone": "never"} and first["p"]["c"] == client.client_id
    assert second["p"]["d"]["code"] == 1000
    consumer.ws.close()


# --- order ---------------------------------------------------------------------------------

def test_on_close_runs_after_the_running_hook_finished(spec):
    """A client leaves while its async on_message sleeps: on_close starts only after that hook is done."""
    report = topic_name("order")
    consumer = consumer_of(spec, report)
    client, _ = connect(spec, f"report={report}")
    assert ask(client, op="sleep", seconds=0.5, report=report) == {"sleeping": 0.5}
    client.ws.close()
    first, second = consumer.event(), consumer.event()
    assert first["p"]["d"] == {"slept": 0.5}
    assert second["p"]["d"]["code"] == 1000
    consumer.ws.close()


def test_max_pending_waiting_messages_are_kept_one_more_closes_1008(spec):
    """max_pending messages (20 here) may wait behind a hook (all run, in order); one more closes with 1008."""
    report = topic_name("flood")
    consumer = consumer_of(spec, report)
    client, _ = connect(spec, f"report={report}", path="/few-waiting")
    client.ws.send(json.dumps({"op": "wait", "key": "go", "timeout": 30, "report": report}))
    for n in range(FEW_WAITING):
        client.ws.send(json.dumps({"op": "n", "n": n}))
    assert client.nothing_for(0.5)
    api = spec.api()
    assert api.request("conn.call", {"c": client.client_id, "f": "set_context_value", "a": ["go", 1]})["E"] is None
    assert json.loads(client.recv())["value"] == 1
    assert [json.loads(client.recv())["n"] for _ in range(FEW_WAITING)] == list(range(FEW_WAITING))
    client.ws.send(json.dumps({"op": "wait", "key": "go-again", "timeout": 30, "report": report}))
    try:
        for n in range(FEW_WAITING + 1):
            client.ws.send(json.dumps({"op": "n", "n": n}))
    except (websocket.WebSocketConnectionClosedException, ConnectionError):
        pass
    assert client.close_code() in (1008, None)
    first, second = consumer.event(), consumer.event()
    assert first["p"]["d"] == {"gone": "go-again"}
    assert second["p"]["d"]["code"] == 1008
    api.ws.close()
    consumer.ws.close()


def test_slow_step_of_an_async_hook_is_warned_about(spec):
    """A step of an async hook that holds the loop over 100 ms is logged as a warning."""
    client, _ = connect(spec)
    client.ws.send(json.dumps({"op": "block_async"}))
    assert client.recv() == "blocked"
    wait_until(lambda: f"on_message for client {client.client_id} held the event loop for" in full_log(spec),
               what="the slow-step warning")
    client.ws.close()


# --- mesh and queue ----------------------------------------------------------------------

def test_mesh_publish_to_a_list_of_channels_and_binary(spec):
    """mesh.publish to a list reaches each subscriber once, across nodes; type="binary" for publish and mesh.send."""
    clients = spread(spec, 4)
    a, b, both, publisher = clients[:4]
    one, two = topic_name("list-1"), topic_name("list-2")
    ask(a, op="sub", channels=[one])
    ask(b, op="sub", channels=[two])
    ask(both, op="sub", channels=[one, two])
    assert ask(publisher, op="publish", channels=[one, two], data="to both") == {"s": 3, "f": 0}
    for client in (a, b, both):
        assert client.recv() == "to both"
    assert both.nothing_for(0.2)
    assert ask(publisher, op="publish", channels=[one, two], type="binary", hex="00ff01") == {"s": 3, "f": 0}
    for client in (a, b, both):
        assert frame_of(client) == (websocket.ABNF.OPCODE_BINARY, b"\x00\xff\x01")
    target = next((c for c in (a, b, both) if c.node != publisher.node), a)
    assert ask(publisher, op="send_binary", target=target.client_id, hex="cafe") == {"sent": True}
    assert frame_of(target) == (websocket.ABNF.OPCODE_BINARY, b"\xca\xfe")
    for client in clients:
        client.ws.close()


def test_queue_push_outside_a_hook_needs_client_id(spec):
    """From a module timer (no hook running) queue.push without client_id raises ValueError; with client_id it is attributed."""
    consumer = consumer_of(spec, "spec-outside")
    client, _ = connect(spec)
    assert ask(client, op="later") == {"queued": True}
    assert json.loads(client.recv()) == {"outside": "ValueError"}
    event = consumer.event()
    assert event["p"]["d"] == {"job": "with client_id"} and event["p"]["c"] == client.client_id
    assert consumer.no_event_for(0.3)
    consumer.ws.close()
    client.ws.close()


def test_entry_without_on_message_keeps_the_default_behaviour(spec):
    """An entry with only on_open: text and binary messages are pushed as {"frame": frame} to the server's topic."""
    consumer = consumer_of(spec, "nomsg-topic")
    client = spec.client("/nomsg")
    client_id = client.recv()
    client.ws.send("plain text")
    client.ws.send_binary(b"\x01\x02\x03")
    first, second = consumer.event(), consumer.event()
    assert first["p"]["t"] == "nomsg-topic" and first["p"]["c"] == client_id
    assert first["p"]["d"] == {"frame": {"type": "text", "data": "plain text", "finish": True}}
    assert second["p"]["d"] == {"frame": {"type": "binary", "data": base64.b64encode(b"\x01\x02\x03").decode(),
                                          "finish": True}}
    consumer.ws.close()
    client.ws.close()


# --- reload ----------------------------------------------------------------------------------

def test_reload_adds_hooks_keeps_context_and_channels_and_resets_module_state(spec):
    """An absolute-path entry reloaded: a new on_open runs; old connections keep context and channels; module state resets."""
    channel = topic_name("reload-room")
    olds = []
    for _ in range(40):
        client = spec.client("/reload")
        client.ws.send(f"join {channel}")
        word, count, node = client.recv().split()
        assert word == "v1"
        client.node = int(node)
        if sum(1 for c in olds if c.node == client.node) >= 2:
            client.ws.close()
            continue
        olds.append(client)
        if len(olds) == 4:
            break
    assert len({c.node for c in olds}) == 2
    for client in olds:
        client.ws.send("more")
        assert client.recv().startswith("v1 ")
    path = spec.reload_path
    path.write_text(RELOAD_V2)
    stamp = time.time() + 2
    os.utime(path, (stamp, stamp))
    replies = []
    for client in olds:
        def on_v2(client=client):
            client.ws.send("probe")
            answer = client.recv()
            return None if answer.startswith("v1 ") else json.loads(answer)
        replies.append(wait_until(on_v2, interval=0.2, what="the reloaded entry"))
    for reply in replies:
        assert reply["kept"] == "yes" and reply["channels"] == [channel]
    for node in {r["node"] for r in replies}:
        counts = sorted(r["n"] for r in replies if r["node"] == node)
        assert counts == list(range(1, len(counts) + 1)), counts   # module state started again from zero
    assert spec.http("/v1/mesh/publish", {"c": channel, "d": "after reload"})[1]["r"] == {"s": len(olds), "f": 0}
    for client in olds:
        assert client.recv() == "after reload"
    fresh = [spec.client("/reload") for _ in range(4)]
    for client in fresh:
        assert client.recv() == "opened v2"
    path.write_text(RELOAD_V2 + "\nraise RuntimeError('import-time failure on purpose')\n")
    stamp += 2
    os.utime(path, (stamp, stamp))
    wait_until(lambda: full_log(spec).count("not reloaded, the previous version keeps running") >= 2, interval=0.2,
               what="both processes to refuse the broken version")
    assert "import-time failure on purpose" in full_log(spec)
    for client in olds + fresh:
        client.ws.send("still")
        assert json.loads(client.recv())["v"] == 2
        client.ws.close()


# --- demo page ------------------------------------------------------------------------------

def test_demo_page_is_served_where_configured(spec):
    """demo: /demo serves one self-contained HTML page pointed at that server's WebSocket path."""
    status, content_type, body = http_get(spec.client_port, "/demo")
    assert status == 200 and content_type.startswith("text/html")
    assert "<html" in body.lower() and '"/chat"' in body
    assert "__MESHGATE_WS_PATH__" not in body
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", body), "the page loads something from elsewhere"


@pytest.mark.parametrize("port_name", ["no_demo_port", "null_demo_port"])
def test_demo_page_is_off_unless_configured(spec, port_name):
    """A server whose demo is unset (or null) answers 404 to GET /demo, while its WebSocket path works."""
    port = getattr(spec, port_name)
    status, _, body = http_get(port, "/demo")
    assert status == 404 and "WebSocket(" not in body
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/chat", timeout=WAIT)
    ws.close()


SUBSCRIBE_TIMING_ENTRY = textwrap.dedent('''
    import time

    def on_open(conn):
        conn.send(str(conn.node_id))

    async def on_message(conn, frame):
        started = time.monotonic()
        await conn.subscribe(frame["data"])
        conn.send("%.3f" % (time.monotonic() - started))
''')


def test_subscribe_waits_at_most_half_forward_timeout_for_a_silent_node(tmp_path):
    """With a frozen peer, an awaited conn.subscribe completes within about forward_timeout / 2, not forever."""
    (tmp_path / "timing.py").write_text(SUBSCRIBE_TIMING_ENTRY)
    cluster = Cluster(tmp_path, workers=2, forward_timeout=4, node_timeout=30, server={"entry": "timing.py"})
    cluster.start()
    frozen_pid = None
    try:
        clients = []
        for _ in range(40):
            client = cluster.client("/")
            client.node = int(client.recv())
            clients.append(client)
            if len({c.node for c in clients}) == 2:
                break
        live = clients[0]
        frozen = next(n for n in cluster.status()["nodes"] if n["node_id"] != live.node)
        live.ws.send("warm-up")
        assert float(live.recv()) < 2
        frozen_pid = frozen["pid"]
        os.kill(frozen_pid, signal.SIGSTOP)
        started = time.monotonic()
        live.ws.send("while-a-peer-is-frozen")
        reported = float(live.recv(timeout=WAIT))
        elapsed = time.monotonic() - started
        assert reported < 3.0 and elapsed < 3.5, (reported, elapsed)   # forward_timeout is 4 s: at most ~2 s
    finally:
        if frozen_pid is not None:
            os.kill(frozen_pid, signal.SIGCONT)
        cluster.stop()


def test_on_close_gets_the_clients_close_code_and_reason(spec):
    """When the client closes first, on_close sees the client's own close code and reason."""
    report = topic_name("closes")
    consumer = consumer_of(spec, report)
    client, _ = connect(spec, f"report={report}")
    client.ws.close(status=4321, reason=b"client bye")
    event = consumer.event()
    assert event["p"]["c"] == client.client_id
    assert event["p"]["d"] == {"code": 4321, "reason": "client bye", "send_returned": False}
    consumer.ws.close()
