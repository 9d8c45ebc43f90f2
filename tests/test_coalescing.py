"""Write coalescing (node/clients.py, node/mesh_point.py): frames produced close together leave together.

What it must never change: every frame arrives, once, in order, per
connection; a close comes after what was sent before it; a reader that does
not read is still closed at its write_buffer_limit while the others get
everything. Pipelined requests on one /ws/v1 connection put many frames for
the same clients (and the same peer) into one turn.
"""

import asyncio
import json
import socket
import time
import uuid

import pytest
import tornado.iostream

from cluster import protocol
from conftest import WAIT, Cluster, StreamConn, loop_factory, raw_api, read_available, running, wait_until
from node import clients

COUNT = 400


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two node processes, so that half the traffic crosses the mesh."""
    with running(Cluster(tmp_path_factory.mktemp("coalescing"), workers=2,
                         server={"write_buffer_limit": 65536})) as cluster:
        yield cluster


@pytest.fixture
def spread(pair):
    made = pair.clients(4, nodes=2)
    yield made
    for client in made:
        client.ws.close()


def _pipeline(api, requests: list) -> dict:
    """Sends every request before reading any reply; returns `{i: reply}`."""
    for req_id, (method, params) in enumerate(requests, 1):
        api.ws.send(json.dumps({"m": method, "p": params, "i": req_id}))
    return {req_id: api.reply_to(req_id) for req_id in range(1, len(requests) + 1)}


def _subscribe(api, clients: list, name: str) -> None:
    for client in clients:
        reply = api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": [name]})
        assert reply["E"] is None, reply


def test_pipelined_publishes_arrive_complete_and_in_order(pair, spread):
    """400 pipelined publishes: every subscriber, on either node, gets all of them once, in order."""
    api = pair.api()
    name = f"burst-{uuid.uuid4().hex[:8]}"
    _subscribe(api, spread, name)
    replies = _pipeline(api, [("mesh.publish", {"c": name, "d": f"m{n}"}) for n in range(COUNT)])
    assert all(reply["E"] is None and reply["r"] == {"s": len(spread), "f": 0} for reply in replies.values()), \
        [reply for reply in replies.values() if reply["r"] != {"s": len(spread), "f": 0}][:3]
    for client in spread:
        assert [client.recv() for _ in range(COUNT)] == [f"m{n}" for n in range(COUNT)]
        assert client.nothing_for(0.2)


def test_sends_and_publishes_to_one_client_keep_the_request_order(pair, spread):
    """mesh.send and mesh.publish interleaved in one pipeline reach a local and a remote client in that order."""
    api = pair.api()
    name = f"mixed-{uuid.uuid4().hex[:8]}"
    _subscribe(api, spread, name)
    requests = []
    for n in range(COUNT // 2):
        requests.append(("mesh.publish", {"c": name, "d": f"p{n}"}))
        requests += [("mesh.send", {"c": client.client_id, "d": f"s{n}-{client.client_id}"}) for client in spread]
    replies = _pipeline(api, requests)
    assert all(reply["E"] is None for reply in replies.values())
    for client in spread:
        expected = [text for n in range(COUNT // 2) for text in (f"p{n}", f"s{n}-{client.client_id}")]
        assert [client.recv() for _ in range(len(expected))] == expected


def test_what_is_sent_before_a_close_arrives_before_the_close_frame(pair, spread):
    """mesh.send then conn.call close in one pipeline: the message, then close 4000 with its reason."""
    api = pair.api()
    requests = []
    for client in spread:
        requests += [("mesh.send", {"c": client.client_id, "d": f"bye-{n}"}) for n in range(3)]
        requests.append(("conn.call", {"c": client.client_id, "f": "close", "a": [4000, "done"]}))
    replies = _pipeline(api, requests)
    assert all(reply["E"] is None for reply in replies.values()), replies
    for client in spread:
        assert [client.recv() for _ in range(3)] == ["bye-0", "bye-1", "bye-2"]
        assert client.close_code() == 4000 and client.close_reason == "done"


def test_pipelined_replies_all_arrive_once(pair, spread):
    """2,000 pipelined requests on one connection, half to a remote node: 2,000 replies, each `i` once."""
    api = pair.api()
    requests = [("mesh.send", {"c": spread[n % len(spread)].client_id, "d": "x"}) for n in range(2000)]
    for req_id, (method, params) in enumerate(requests, 1):
        api.ws.send(json.dumps({"m": method, "p": params, "i": req_id}))
    seen = []
    while len(seen) < len(requests):
        message = api.read()
        assert message["E"] is None, message
        seen.append(message["i"])
    assert sorted(seen) == list(range(1, len(requests) + 1))
    for client in spread:
        assert [client.recv() for _ in range(2000 // len(spread))] == ["x"] * (2000 // len(spread))


def test_a_reader_that_stops_is_closed_at_its_limit_and_the_others_lose_nothing(pair, spread):
    """Bursts of publishes to a client that does not read: closed 1008 at its limit; the readers get every frame."""
    api = pair.api()
    slow = pair.client(sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    [slow_id] = _learn_ids(pair, [slow])
    name = f"slow-{uuid.uuid4().hex[:8]}"
    _subscribe(api, spread, name)
    assert api.request("conn.call", {"c": slow_id, "f": "subscribe", "a": [name]})["E"] is None
    payload = "y" * 20000   # a few of them pass CORK_BYTES: corked and at-once writes both happen
    sent, burst = 0, 50
    for _ in range(16):   # 1 MB bursts until the slow client is refused (the kernel's buffers fill first)
        replies = _pipeline(api, [("mesh.publish", {"c": name, "d": f"{sent + n}:{payload}"}) for n in range(burst)])
        sent += burst
        for client in spread:
            assert [client.recv().split(":")[0] for _ in range(burst)] == [str(n) for n in range(sent - burst, sent)]
        if any(reply["r"]["f"] for reply in replies.values()):
            break
    assert any(reply["r"]["f"] == 1 for reply in replies.values()), "the slow reader was never refused"
    # Its close frame waits behind megabytes it does not read: it may be cut off before it sees it.
    assert slow.close_code() in (1008, None)
    wait_until(lambda: pair.status()["totals"].get("slow_closed", 0) >= 1, what="slow_closed in status")


def _learn_ids(cluster, clients) -> list:
    consumer = cluster.api()
    assert consumer.request("queue.pop", {"t": ["default"]})["E"] is None
    ids = []
    for client in clients:
        marker = f"who-{uuid.uuid4().hex[:8]}"
        client.ws.send(marker)
        while True:
            event = consumer.event(WAIT)
            if event["p"]["d"]["frame"]["data"] == marker:
                ids.append(event["p"]["c"])
                break
    consumer.ws.close()
    return ids


def test_frames_split_anywhere_are_read_whole(pair):
    """Pipelined /ws/v1 frames (7-, 16- and 64-bit lengths) sent in pieces cut anywhere: every request is read whole."""
    import random
    import time

    import websocket
    sizes = [10, 125, 126, 127, 5000, 65535, 65536, 70000] * 5
    wire = b"".join(websocket.ABNF.create_frame(json.dumps(
        {"m": "mesh.publish", "p": {"c": "split-" + "x" * 8, "d": "y" * size}, "i": n}), websocket.ABNF.OPCODE_TEXT
    ).format() for n, size in enumerate(sizes))
    sock, rest = raw_api(pair)
    cut = random.Random(7)
    at = 0
    while at < len(wire):
        step = cut.choice([1, 2, 3, 7, 64, 1000, 40000])
        sock.sendall(wire[at:at + step])
        at += step
        if cut.random() < 0.05:
            time.sleep(0.002)   # let the node read what came so far: the next piece lands in a new read
    got, data = set(), rest
    while len(got) < len(sizes):
        while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F if data[1] & 0x7F < 126 else 0):
            data += sock.recv(65536)
        length = data[1] & 0x7F
        assert length < 126, "replies are short"
        reply = json.loads(data[2:2 + length])
        data = data[2 + length:]
        assert reply["E"] is None and reply["r"] == {"s": 0, "f": 0}, reply
        got.add(reply["i"])
    assert got == set(range(len(sizes)))
    sock.close()


# --- when corked frames leave: in one process, on real sockets (node/clients.py) -------------------------------

def _turn_by_turn(loop_name: str, first, later=None, turns: int = 12) -> list:
    """Runs `first(conns)` in one loop turn, then `later(turn, conns)` in each of the next `turns`
    turns, after which each peer is read; returns, per turn, what each peer had received by then."""
    async def body():
        pairs = [socket.socketpair() for _ in range(2)]
        conns = []
        for mine, peer in pairs:
            mine.setblocking(False)
            peer.setblocking(False)
            conns.append(StreamConn(tornado.iostream.IOStream(mine)))
        seen, done = [], asyncio.get_running_loop().create_future()

        def probe(turn):
            if later is not None:
                later(turn, conns)
            seen.append([read_available(peer) for _, peer in pairs])
            if turn == turns:
                done.set_result(None)
            else:
                asyncio.get_running_loop().call_soon(probe, turn + 1)

        def start():
            first(conns)
            asyncio.get_running_loop().call_soon(probe, 1)

        asyncio.get_running_loop().call_soon(start)
        await done
        for conn in conns:
            conn.stream.close()
        for _, peer in pairs:
            peer.close()
        return seen
    with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
        return runner.run(body())


def _first_turn(seen: list, index: int) -> int:
    return next(turn for turn, got in enumerate(seen, 1) if got[index])


FRAMES = [protocol.encode_ws_frame(b"frame %d" % n) for n in range(4)]
COUNTERS = clients.Counters()


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_frames_of_the_next_turns_leave_with_the_first_in_one_send(loop_name):
    """A frame corked now waits FLUSH_TURNS turns; what those turns cork for the same connection joins it."""
    def later(turn, conns):
        if turn == 1:
            clients.write_frame(conns[0], FRAMES[1], COUNTERS)
        elif turn == clients.FLUSH_TURNS - 1:
            clients.write_frame(conns[0], FRAMES[2], COUNTERS)

    seen = _turn_by_turn(loop_name, lambda conns: clients.write_frame(conns[0], FRAMES[0], COUNTERS), later)
    turn = _first_turn(seen, 0)
    assert clients.FLUSH_TURNS <= turn <= clients.FLUSH_TURNS + 1, seen
    assert seen[turn - 1][0] == FRAMES[0] + FRAMES[1] + FRAMES[2], seen   # one write, in order
    assert not any(got[0] for got in seen[turn:])


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_a_frame_a_backend_waits_on_takes_everything_corked_out_at_the_end_of_the_turn(loop_name):
    def first(conns):
        clients.write_frame(conns[0], FRAMES[0], COUNTERS)
        clients.write_to_backend(conns[1], FRAMES[1], COUNTERS)

    seen = _turn_by_turn(loop_name, first)
    assert seen[0] == [FRAMES[0], FRAMES[1]], seen


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_frames_that_waited_flush_wait_s_leave_at_the_end_of_the_turn(loop_name, monkeypatch):
    """The loop held up past FLUSH_WAIT_S: the corked frames do not wait for more turns."""
    monkeypatch.setattr(clients, "FLUSH_WAIT_S", 0.002)

    def first(conns):
        clients.write_frame(conns[0], FRAMES[0], COUNTERS)
        time.sleep(0.004)

    seen = _turn_by_turn(loop_name, first)
    assert seen[0] == [FRAMES[0], b""], seen


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_a_loop_held_up_turn_after_turn_still_flushes_within_flush_wait_s(loop_name, monkeypatch):
    """Turns of 2 ms each and FLUSH_WAIT_S of 3: the frame leaves after the second or third turn, not the fifth."""
    monkeypatch.setattr(clients, "FLUSH_WAIT_S", 0.003)
    seen = _turn_by_turn(loop_name, lambda conns: clients.write_frame(conns[0], FRAMES[0], COUNTERS),
                         lambda turn, conns: time.sleep(0.002))
    assert 2 <= _first_turn(seen, 0) <= 3 < clients.FLUSH_TURNS + 1, seen
