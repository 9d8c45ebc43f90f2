"""The shipped entries (conf/entries/) end to end through a 2-process cluster, with the example backend."""

import base64
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cluster.ids import node_id_of
from conftest import WAIT, Cluster

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = ROOT / "conf" / "entries"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    instance = Cluster(tmp_path_factory.mktemp("shipped"), workers=2,
                       server={"path": "/chat", "topic": "chat", "entry": str(ENTRIES / "chat.py")},
                       extra_servers=[
                           {"path": "/messages", "topic": "messages", "entry": str(ENTRIES / "message_center.py")},
                           {"path": "/queue", "topic": "plain", "entry": str(ENTRIES / "queue.py")},
                       ])
    instance.start()
    yield instance
    instance.stop()


def chat_clients(cluster, count):
    """At least `count` chat clients, more (bounded) until both node processes hold some (the kernel picks)."""
    clients = [cluster.client("/chat") for _ in range(count)]
    deadline = time.monotonic() + WAIT
    for _ in range(40):
        learn_client_ids(clients)
        if len({c.node for c in clients}) == 2 or time.monotonic() > deadline:
            break
        clients.append(cluster.client("/chat"))
    held = {c.node for c in clients}
    assert len(held) == 2, f"{len(clients)} chat clients landed on node {sorted(held)} only"
    return clients


def learn_client_ids(clients):
    """Each client learns its client_id (and node) from the room messages: every member gets each one once."""
    room = f"probe-{uuid.uuid4().hex[:6]}"
    for client in clients:
        client.ws.send(json.dumps({"op": "join", "room_id": room}))
        assert json.loads(client.recv()) == {"status": "success", "room": f"room:{room}"}
    for client in clients:
        marker = uuid.uuid4().hex
        client.ws.send(json.dumps({"op": "send", "msg": marker}))
        assert json.loads(client.recv()) == {"status": "success"}
        for other in clients:
            message = json.loads(other.recv())
            assert message["msg"] == marker
            if other is client:
                client.client_id = message["client_id"]
        client.node = node_id_of(int(client.client_id))
    for client in clients:
        client.ws.send(json.dumps({"op": "quit"}))
        assert json.loads(client.recv()) == {"status": "success"}


def test_chat_rooms_across_processes(shipped):
    """join/send/quit: room members on every process get each message once; other rooms do not."""
    clients = chat_clients(shipped, 8)
    alice = clients[0]
    bob = next(c for c in clients if c.node != alice.node)
    carol = next(c for c in clients if c is not alice and c is not bob)
    for client, room in ((alice, "42"), (bob, "42"), (carol, "7")):
        client.ws.send(json.dumps({"op": "join", "room_id": room}))
        assert json.loads(client.recv()) == {"status": "success", "room": f"room:{room}"}
    alice.ws.send(json.dumps({"op": "send", "msg": "hi room 42"}))
    assert json.loads(alice.recv()) == {"status": "success"}
    expected = {"client_id": alice.client_id, "msg": "hi room 42"}
    assert json.loads(alice.recv()) == expected
    assert json.loads(bob.recv()) == expected
    assert carol.nothing_for(0.2)
    # A backend publish to the room reaches its members.
    status, body = shipped.http("/v1/mesh/publish", {"c": "room:42", "d": {"notice": "server says hi"}})
    assert body["r"] == {"s": 2, "f": 0}
    assert json.loads(alice.recv()) == json.loads(bob.recv()) == {"notice": "server says hi"}
    # The room is in the context; joining another room leaves the first.
    api = shipped.api()
    assert api.request("conn.call", {"c": bob.client_id, "f": "get_context"})["r"]["d"] == {"room": "room:42"}
    bob.ws.send(json.dumps({"op": "join", "room_id": 7}))
    assert json.loads(bob.recv()) == {"status": "success", "room": "room:7"}
    assert shipped.http("/v1/mesh/publish", {"c": "room:42", "d": "only alice"})[1]["r"] == {"s": 1, "f": 0}
    assert alice.recv() == "only alice"
    alice.ws.send(json.dumps({"op": "quit"}))
    assert json.loads(alice.recv()) == {"status": "success"}
    assert shipped.http("/v1/mesh/publish", {"c": "room:42", "d": "nobody"})[1]["r"] == {"s": 0, "f": 0}


@pytest.mark.parametrize("sent, reply", [
    ("not json", {"status": "error", "msg": "invalid JSON"}),
    ("[1, 2]", {"status": "error", "msg": "expected a JSON object"}),
    ('{"op": "dance"}', {"status": "error", "msg": "unknown op 'dance'"}),
    ("{}", {"status": "error", "msg": "op: required"}),
    ('{"op": "send", "msg": "x"}', {"status": "error", "msg": "join a room first"}),
    ('{"op": "join"}', {"status": "error", "msg": "room_id: a non-empty string or number is required"}),
    ('{"op": "join", "room_id": "a b"}', None),
    ('{"op": "send"}', {"status": "error", "msg": "msg: a non-empty string is required"}),
])
def test_chat_bad_messages_get_an_error_reply_and_the_connection_stays(shipped, sent, reply):
    """Invalid JSON, unknown ops and missing fields are answered with an error, not a crash."""
    client = shipped.client("/chat")
    client.ws.send(sent)
    answer = json.loads(client.recv())
    assert answer["status"] == "error"
    if reply is not None:
        assert answer == reply
    client.ws.send(json.dumps({"op": "quit"}))
    assert json.loads(client.recv()) == {"status": "success"}


def test_chat_presence_members_and_notices(shipped):
    """join with presence: the room's members mesh-wide, then a notice per join and leave; `who` is exact;
    a client that did not ask gets no notices."""
    clients = chat_clients(shipped, 4)
    alice = clients[0]
    bob = next(c for c in clients if c.node != alice.node)
    room = f"presence-{uuid.uuid4().hex[:6]}"
    alice.ws.send(json.dumps({"op": "join", "room_id": room, "presence": True}))
    assert json.loads(alice.recv()) == {"presence": "join", "client_id": alice.client_id}   # its own notice first
    assert json.loads(alice.recv()) == {"status": "success", "room": f"room:{room}", "client_id": alice.client_id,
                                        "members": [alice.client_id]}
    bob.ws.send(json.dumps({"op": "join", "room_id": room}))
    assert json.loads(bob.recv()) == {"status": "success", "room": f"room:{room}"}
    assert json.loads(alice.recv()) == {"presence": "join", "client_id": bob.client_id}
    bob.ws.send(json.dumps({"op": "who"}))
    assert json.loads(bob.recv()) == {"status": "success", "members": sorted([alice.client_id, bob.client_id])}
    bob.ws.send(json.dumps({"op": "quit"}))
    assert json.loads(bob.recv()) == {"status": "success"}
    assert json.loads(alice.recv()) == {"presence": "leave", "client_id": bob.client_id}
    assert bob.nothing_for(0.2)
    bob.ws.send(json.dumps({"op": "who"}))
    assert json.loads(bob.recv()) == {"status": "error", "msg": "join a room first"}
    alice.ws.send(json.dumps({"op": "quit"}))
    assert json.loads(alice.recv()) == {"status": "success"}


def test_chat_binary_message_is_refused_politely(shipped):
    """A binary frame gets an error reply."""
    client = shipped.client("/chat")
    client.ws.send_binary(b"\x00\x01")
    assert json.loads(client.recv()) == {"status": "error", "msg": "send JSON text"}


def test_queue_entry_pushes_frames_to_the_topic(shipped):
    """conf/entries/queue.py: text and binary messages reach the server's topic as {"frame": ...}."""
    consumer = shipped.api()
    assert consumer.request("queue.pop", ["plain"])["E"] is None
    client = shipped.client("/queue")
    client.ws.send("text one")
    client.ws.send_binary(b"\xff\x00")
    first, second = consumer.event(), consumer.event()
    assert first["p"]["t"] == "plain"
    assert first["p"]["d"] == {"frame": {"type": "text", "data": "text one", "finish": True}}
    assert second["p"]["d"]["frame"] == {"type": "binary", "data": base64.b64encode(b"\xff\x00").decode(),
                                         "finish": True}
    consumer.ws.close()


@pytest.fixture
def backend(shipped):
    """examples/message_center_backend.py, running against the cluster's API."""
    process = subprocess.Popen([sys.executable, str(ROOT / "examples" / "message_center_backend.py"),
                                "--api", f"ws://127.0.0.1:{shipped.api_port}/ws/v1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert "consuming topic 'auth'" in process.stdout.readline()
    yield process
    process.terminate()
    process.wait(timeout=WAIT)


def test_message_center_login_through_the_backend(shipped, backend):
    """auth -> backend sets uid -> subscribe @user -> a publish to user:<uid> arrives; a bad token fails."""
    stranger = shipped.client("/messages")
    stranger.ws.send(json.dumps({"op": "auth", "token": "forged"}))
    client = shipped.client("/messages")
    client.ws.send(json.dumps({"op": "subscribe", "channel": "@user"}))
    assert json.loads(client.recv()) == {"code": 1, "msg": "Not Auth"}
    client.ws.send(json.dumps({"op": "auth", "token": "token-alice"}))
    assert json.loads(client.recv()) == {"code": 0, "msg": "ok", "uid": "alice"}
    client.ws.send(json.dumps({"op": "subscribe", "channel": "@user"}))
    assert json.loads(client.recv()) == {"code": 0, "msg": "ok", "channel": "user:alice"}
    status, body = shipped.http("/v1/mesh/publish", {"c": "user:alice", "d": {"mail": "you have 1 message"}})
    assert body["r"] == {"s": 1, "f": 0}
    assert json.loads(client.recv()) == {"mail": "you have 1 message"}
    assert json.loads(stranger.recv(timeout=WAIT)) == {"code": 1, "msg": "Auth failed"}
    stranger.ws.send(json.dumps({"op": "subscribe", "channel": "@user"}))
    assert json.loads(stranger.recv()) == {"code": 1, "msg": "Not Auth"}
