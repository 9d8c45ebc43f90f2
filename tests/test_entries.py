"""Entry hooks through a real multi-process cluster: the conn API, order, waits, errors, reload."""

import json
import os
import subprocess
import textwrap
import time

import pytest
import websocket

from conftest import MESHGATE, WAIT, Cluster, assert_error, wait_until

SMALL_BACKLOG = 65536   # node.servers[].max_pending_bytes of the server at /small-backlog

ENTRY = textwrap.dedent('''
    import asyncio
    import json
    import time

    from node.entry import ContextTimeout, QueueFull, Refuse, mesh, queue

    VERSION = "v1"

    def on_handshake(conn, request):
        if request.args.get("token") == "bad":
            raise Refuse()
        if request.args.get("token") == "false":
            return False
        if request.args.get("token") == "boom":
            raise RuntimeError("handshake bug")
        conn.set_context_value("token", request.args.get("token"))
        return True

    def on_open(conn):
        conn.send(json.dumps({"hello": str(conn.client_id), "node": conn.node_id, "path": conn.path,
                              "query": conn.query, "agent": conn.headers.get("User-Agent"),
                              "addr": conn.remote_addr, "token": conn.context_value("token")}))

    async def on_message(conn, frame):
        text = frame["data"]
        word, _, rest = text.partition(" ")
        if word == "echo":
            conn.send(VERSION + ":" + rest)
        elif word == "sleep":   # replies must keep the order of the messages
            await asyncio.sleep(float(rest.split()[0]))
            conn.send("slept " + rest)
        elif word == "login":
            try:
                uid = await conn.wait_context_value("uid", float(rest))
            except ContextTimeout as exc:
                conn.send("timeout: " + str(exc))
            else:
                conn.send("welcome " + str(uid))
        elif word == "fail":
            raise ValueError("hook bug on purpose")
        elif word == "block":
            time.sleep(0.15)
            conn.send("blocked")
        elif word == "whisper":
            target, _, words = rest.partition(" ")
            ok = await mesh.send(target, words)
            conn.send("whispered " + str(ok))
        elif word == "shout":
            channel, _, words = rest.partition(" ")
            s, f = await mesh.publish(channel, {"from": str(conn.client_id), "text": words})
            conn.send("shouted %d %d" % (s, f))
        elif word == "join":
            await conn.subscribe(*rest.split())
            conn.send("joined " + ",".join(sorted(conn.channels)))
        elif word == "leave":
            conn.unsubscribe(*rest.split())
            conn.send("left " + ",".join(sorted(conn.channels)))
        elif word == "push":
            try:
                queue.push("entry-topic", {"said": rest})
                conn.send("pushed")
            except QueueFull:
                conn.send("full")
        elif word == "ctx":
            conn.send(json.dumps(conn.context, sort_keys=True))
        elif word == "badctx":
            odd = {"set": {1, 2}, "surrogate": chr(0xD800), "nan": float("nan")}
            conn.set_context_value("odd", odd[rest or "set"])
            conn.send("stored a set")
        elif word == "bye":
            conn.close(4000, "asked to leave")
        else:
            queue.push(conn.topic, {"frame": frame})

    def on_close(conn, code, reason):
        queue.push("closes", {"code": code, "reason": reason})
''')


@pytest.fixture(scope="module")
def entry_cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("entries")
    entry = folder / "hooks.py"
    entry.write_text(ENTRY)
    instance = Cluster(folder, workers=2, queue={"topic_size": 3, "max_topics": 10},
                       server={"entry": "hooks.py", "reload": True},
                       extra_servers=[{"path": "/small-backlog", "entry": "hooks.py",
                                       "max_pending_bytes": SMALL_BACKLOG}])
    instance.entry_path = entry
    instance.start()
    yield instance
    instance.stop()


def connect(cluster, query="token=ok", path="/"):
    client = cluster.client(f"{path}?{query}", header={"User-Agent": "entry-test/1"})
    hello = json.loads(client.recv())
    client.client_id = hello["hello"]
    client.node = hello["node"]
    return client, hello


def spread_clients(cluster, count=8):
    """At least `count` clients, more until every node process holds one (the kernel picks each one's process)."""
    clients = []
    deadline = time.monotonic() + WAIT
    for _ in range(count + 40):
        clients.append(connect(cluster)[0])
        if len(clients) >= count and len({c.node for c in clients}) == cluster.workers:
            break
        if time.monotonic() > deadline:
            break
    held = {c.node for c in clients}
    assert len(held) == cluster.workers, f"{len(clients)} clients landed on nodes {sorted(held)} only"
    return clients


def test_handshake_sees_the_request_and_open_sees_the_conn(entry_cluster):
    """on_handshake reads query args; on_open sees client_id, node_id, path, query, headers, remote address."""
    client, hello = connect(entry_cluster, "token=ok&x=1")
    assert hello["path"] == "/" and hello["query"] == "token=ok&x=1"
    assert hello["agent"] == "entry-test/1" and hello["addr"] == "127.0.0.1"
    assert hello["token"] == "ok" and hello["node"] in (1, 2, 3)
    assert int(hello["hello"]) > 0


@pytest.mark.parametrize("token", ["bad", "false", "boom"])
def test_handshake_can_refuse_with_403(entry_cluster, token):
    """Returning False, raising Refuse or failing in on_handshake refuses the connection with HTTP 403."""
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://127.0.0.1:{entry_cluster.client_port}/?token={token}", timeout=WAIT)
    assert refused.value.status_code == 403


def test_hooks_of_one_connection_run_in_order(entry_cluster):
    """Message N+1's hook starts after message N's finished, even when N sleeps longer."""
    client, _ = connect(entry_cluster)
    delays = [0.2, 0.01, 0.1, 0.0, 0.05]
    for index, delay in enumerate(delays):
        client.ws.send(f"sleep {delay} #{index}")
    assert [client.recv() for _ in delays] == [f"slept {d} #{i}" for i, d in enumerate(delays)]


def test_wait_context_value_pauses_only_that_connection(entry_cluster):
    """A hook waiting for a context key holds that connection's next messages; others go on; conn.call wakes it."""
    waiting, _ = connect(entry_cluster)
    other, _ = connect(entry_cluster)
    waiting.ws.send("login 5")
    waiting.ws.send("echo after-login")
    other.ws.send("echo meanwhile")
    assert other.recv() == "v1:meanwhile"
    assert waiting.nothing_for(0.2)
    api = entry_cluster.api()
    reply = api.request("conn.call", {"c": waiting.client_id, "f": "set_context_value", "a": ["uid", 42]})
    assert reply["E"] is None
    assert waiting.recv() == "welcome 42"
    assert waiting.recv() == "v1:after-login"


def test_wait_context_value_times_out_with_a_clear_error(entry_cluster):
    """Without a backend answer the wait raises ContextTimeout, which the entry can catch."""
    client, _ = connect(entry_cluster)
    started = time.monotonic()
    client.ws.send("login 0.3")
    assert client.recv() == "timeout: context key 'uid' was not set within 0.3 s"
    # The node's timer counts from its loop's clock, which uvloop reads once per
    # loop turn: it may fire a fraction of a millisecond before 0.3 s of wall time.
    assert time.monotonic() - started >= 0.29


def test_set_context_wakes_a_waiter_too(entry_cluster):
    """set_context (the whole context) also wakes a hook waiting for one of its keys."""
    client, _ = connect(entry_cluster)
    client.ws.send("login 5")
    api = entry_cluster.api()
    assert api.request("conn.call", {"c": client.client_id, "f": "set_context", "a": [{"uid": "u7"}]})["E"] is None
    assert client.recv() == "welcome u7"
    client.ws.send("ctx")
    assert json.loads(client.recv()) == {"uid": "u7"}


def test_exception_in_a_hook_is_logged_counted_and_keeps_the_connection(entry_cluster):
    """A hook that raises: traceback, client id and entry name in the log, hook_errors counted, connection open."""
    client, _ = connect(entry_cluster)
    before = entry_cluster.status()["totals"]["hook_errors"]
    client.ws.send("fail")
    client.ws.send("echo still-open")
    assert client.recv() == "v1:still-open"
    wait_until(lambda: entry_cluster.status()["totals"]["hook_errors"] > before, what="hook_errors counted")
    log = entry_cluster.logs()
    assert f"entry hooks.py: on_message failed for client {client.client_id}" in log
    assert "ValueError: hook bug on purpose" in log and "Traceback" in log


def test_blocking_hook_is_warned_about(entry_cluster):
    """A hook that holds the event loop over 100 ms gets a warning in the log."""
    client, _ = connect(entry_cluster)
    client.ws.send("block")
    assert client.recv() == "blocked"
    wait_until(lambda: f"on_message for client {client.client_id} held the event loop" in entry_cluster.logs(),
               what="slow hook warning")


def test_mesh_send_and_publish_from_an_entry(entry_cluster):
    """mesh.send reaches a client on another node; mesh.publish returns (s, f) mesh-wide."""
    clients = spread_clients(entry_cluster)
    sender = clients[0]
    target = next(c for c in clients if c.node != sender.node)
    sender.ws.send(f"whisper {target.client_id} psst")
    assert target.recv() == "psst"
    assert sender.recv() == "whispered True"
    sender.ws.send("whisper 12345 nobody")
    assert sender.recv() == "whispered False"
    for client in clients:
        client.ws.send("join lobby extra")
        assert client.recv() == "joined extra,lobby"
    sender.ws.send("shout lobby hi all")
    for client in clients:
        message = client.recv()
        if client is sender and message.startswith("shouted"):
            message, shouted = client.recv(), message
        elif client is sender:
            shouted = client.recv()
        assert json.loads(message) == {"from": sender.client_id, "text": "hi all"}
    assert shouted == f"shouted {len(clients)} 0"
    for client in clients:
        client.ws.send("leave lobby")
        assert client.recv() == "left extra"


def test_queue_push_from_an_entry_and_full_buffer(entry_cluster):
    """queue.push attributes the message to the hook's connection; a full buffer raises QueueFull."""
    client, _ = connect(entry_cluster)
    for _ in range(3):
        client.ws.send("push x")
        assert client.recv() == "pushed"
    client.ws.send("push overflow")
    assert client.recv() == "full"
    consumer = entry_cluster.api()
    assert consumer.request("queue.pop", ["entry-topic"])["E"] is None
    event = consumer.event()
    assert event["p"]["c"] == client.client_id and event["p"]["d"] == {"said": "x"}
    for _ in range(2):
        consumer.event()
    consumer.ws.close()


def test_default_behaviour_and_on_close(entry_cluster):
    """Unhandled text goes to the server's topic; on_close runs with the close code and can push."""
    consumer = entry_cluster.api()
    assert consumer.request("queue.pop", ["default", "closes"])["E"] is None
    client, _ = connect(entry_cluster)
    client.ws.send("plain words")
    event = consumer.event()
    assert event["p"]["t"] == "default" and event["p"]["d"]["frame"]["data"] == "plain words"
    client.ws.send("bye")
    assert client.close_code() == 4000
    event = consumer.event()
    assert event["p"]["t"] == "closes" and event["p"]["c"] == client.client_id
    assert event["p"]["d"] == {"code": 4000, "reason": "asked to leave"}
    consumer.ws.close()


def test_reload_uses_new_code_without_dropping_connections(entry_cluster):
    """Editing the entry file: new messages use the new code; a broken edit keeps the previous version."""
    client, _ = connect(entry_cluster)
    client.ws.send("echo before")
    assert client.recv() == "v1:before"
    path = entry_cluster.entry_path
    original = path.read_text()
    try:
        path.write_text(original.replace('VERSION = "v1"', 'VERSION = "v2"'))
        bump = time.time() + 2
        os.utime(path, (bump, bump))

        def reloaded():
            client.ws.send("echo probe")
            return client.recv() == "v2:probe"
        wait_until(reloaded, interval=0.2, what="the new entry version")
        path.write_text(original.replace('VERSION = "v1"', 'VERSION = "v3"') + "\ndef broken(:\n")
        bump += 2
        os.utime(path, (bump, bump))
        wait_until(lambda: "not reloaded, the previous version keeps running" in entry_cluster.logs(),
                   interval=0.2, what="the broken reload to be refused")
        client.ws.send("echo still")
        assert client.recv() == "v2:still"
    finally:
        path.write_text(original)
        os.utime(path, (time.time() + 10, time.time() + 10))
    wait_until(lambda: (client.ws.send("echo back"), client.recv())[1] == "v1:back", interval=0.2,
               what="the original version again")


def test_entry_with_a_syntax_error_refuses_to_start(tmp_path):
    """meshgate start with a broken entry file exits 2 naming the file and line."""
    (tmp_path / "broken.py").write_text("def on_message(conn, frame):\n    return (\n")
    cluster = Cluster(tmp_path, workers=1, server={"entry": "broken.py"})
    result = subprocess.run([MESHGATE, "start", "-c", str(cluster.config_path)], capture_output=True, text=True,
                            timeout=WAIT)
    assert result.returncode == 2
    assert "node.servers[0].entry" in result.stderr and "broken.py:" in result.stderr
    assert "syntax error" in result.stderr


def test_entry_that_fails_to_import_stops_the_cluster(tmp_path):
    """An entry that compiles but raises on import: the node refuses to start and the cluster stops (exit 2)."""
    (tmp_path / "raises.py").write_text("raise RuntimeError('cannot start here')\n")
    cluster = Cluster(tmp_path, workers=1, server={"entry": "raises.py"})
    result = subprocess.run([MESHGATE, "start", "-c", str(cluster.config_path)], capture_output=True, text=True,
                            timeout=WAIT * 2)
    assert result.returncode == 2
    assert "cannot start here" in result.stderr


def test_messages_queued_behind_a_hook_die_with_the_connection(entry_cluster):
    """Close while a hook waits: the queued messages are dropped, on_close runs, nothing is counted as an error."""
    consumer = entry_cluster.api()
    assert consumer.request("queue.pop", ["closes"])["E"] is None
    before = entry_cluster.status()["totals"]
    client, _ = connect(entry_cluster)
    client.ws.send("login 0.5")
    for _ in range(5):
        client.ws.send("push queued")
    client.ws.close()
    event = consumer.event()
    assert event["p"]["c"] == client.client_id and event["p"]["t"] == "closes"
    after = entry_cluster.status()["totals"]
    assert after["hook_errors"] == before["hook_errors"]
    other = entry_cluster.api()
    assert other.request("queue.pop", ["entry-topic"])["E"] is None
    assert other.no_event_for(0.5), "a message queued behind the hook ran after the close"
    consumer.ws.close()
    other.ws.close()


def test_on_close_reports_the_code_tornado_closed_with(entry_cluster):
    """A message over max_message_size closes with 1009, and on_close is told 1009."""
    consumer = entry_cluster.api()
    assert consumer.request("queue.pop", ["closes"])["E"] is None
    client, _ = connect(entry_cluster)
    client.ws.send("x" * (1048576 + 1))
    assert client.close_code() in (1009, None)   # None: the socket went before the client read the close frame
    event = consumer.event()
    assert event["p"]["c"] == client.client_id and event["p"]["d"]["code"] == 1009
    consumer.ws.close()


@pytest.mark.parametrize("odd", ["set", "surrogate", "nan"])
def test_context_that_is_not_json_is_a_clear_301(entry_cluster, odd):
    """get_context of a context holding a set, a lone surrogate or NaN answers 301 at once, locally and across
    nodes, and the API connection goes on serving."""
    clients = spread_clients(entry_cluster, 6)
    for client in clients:
        client.ws.send(f"badctx {odd}")
        assert client.recv() == "stored a set"
    api = entry_cluster.api()
    for client in clients:
        started = time.monotonic()
        reply = api.request("conn.call", {"c": client.client_id, "f": "get_context"}, req_id="ctx")
        assert_error(reply, 301, req_id="ctx", mentions="not JSON")
        assert time.monotonic() - started < 1.0
    assert api.request("mesh.publish", {"c": "after-odd-context", "d": "x"})["E"] is None


def test_waiting_client_data_is_bounded_in_bytes(entry_cluster):
    """A client that floods while its hook waits is closed 1008 past max_pending_bytes (64 KiB here) of waiting data."""
    client, _ = connect(entry_cluster, path="/small-backlog")
    client.ws.send("login 5")
    chunk = "z" * (SMALL_BACKLOG // 8)
    try:
        for _ in range(12):
            client.ws.send(chunk)
    except (websocket.WebSocketConnectionClosedException, ConnectionError):
        pass
    assert client.close_code() in (1008, None)
    wait_until(lambda: "messages (" in entry_cluster.logs() and "wait for entry hooks.py; closing"
               in entry_cluster.logs(), what="the flood to be refused")


MODULE_ENTRY = textwrap.dedent('''
    COUNTER = {"n": 0}
    VERSION = "m1"

    def on_message(conn, frame):
        COUNTER["n"] += 1
        conn.send("%s %d" % (VERSION, COUNTER["n"]))
''')


def test_module_entry_reload_that_fails_half_way_keeps_the_running_version(tmp_path):
    """A dotted-module entry: a new version that raises while loading leaves the old module and its state alone."""
    package = tmp_path / "pkg"
    package.mkdir()
    module = package / "module_entry.py"
    module.write_text(MODULE_ENTRY)
    cluster = Cluster(tmp_path, workers=1, server={"entry": "module_entry", "reload": True})
    cluster.start_options = {"env": {**os.environ, "PYTHONPATH": str(package)}}
    cluster.start()
    try:
        client = cluster.client()
        client.ws.send("a")
        assert client.recv() == "m1 1"
        module.write_text(MODULE_ENTRY.replace('"m1"', '"m2"') + "\nraise RuntimeError('half way')\n")
        stamp = time.time() + 5
        os.utime(module, (stamp, stamp))
        wait_until(lambda: "entry module_entry not reloaded" in cluster.logs(), interval=0.2, what="refusal")
        client.ws.send("b")
        assert client.recv() == "m1 2"
    finally:
        cluster.stop()
