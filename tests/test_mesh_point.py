"""MeshPoint's requests made with `then=` (a function, or an Outcome such as a Deferred: no Future),
in one process over real ZeroMQ sockets on loopback.

Each outcome, a reply, a bad reply, a timeout, a link that goes away, a
request refused at once, reaches `then` exactly once; a refusal never from
inside the `request` call itself; a `then` that raises does not stop the
replies after it.
"""

import asyncio
import socket
import time

import pytest
import zmq

from cluster import cluster_key, mesh
from cluster.zloop import ZapHandler
from conftest import loop_factory
from node.forward import Deferred
from node.mesh_point import BadReply, MeshPoint, PeerTimeout, PeerUnavailable, TooLarge

pytestmark = pytest.mark.timeout(30)
FRAME = b"\x81\x01x"
TIMEOUT = 0.3


class Pair:
    """Node 1 asks, node 2 serves with `serve(request)` (bytes, or None for no reply)."""

    def __init__(self, serve):
        self.context = zmq.Context()
        key = cluster_key.generate()
        self.zap = ZapHandler(self.context, key)
        max_bytes = mesh.max_mesh_bytes(65536, 65536)
        self.asker = MeshPoint(self.context, "tcp://127.0.0.1:0", TIMEOUT, 64 << 20, key, max_bytes)
        self.server = MeshPoint(self.context, "tcp://127.0.0.1:0", TIMEOUT, 64 << 20, key, max_bytes)
        self.server.handle_request = lambda peer, request: serve(request)
        self.asker.links.on_up = self.server.links.on_up = lambda node_id: None
        self.asker.connect(2, self.server.address, 1)

    def close(self):
        self.asker.close()
        self.server.close()
        self.zap.close()
        self.context.destroy(linger=0)


async def outcomes(pair, count: int, message=None, wait: float = 5.0) -> list:
    got = []
    done = asyncio.Event()

    def then(outcome):
        assert outcome.done()
        got.append(outcome.exception() or outcome.result())
        if len(got) >= count:
            done.set()

    for _ in range(count):
        pair.asker.request(2, message or mesh.publish_request(["c"], FRAME), then=then)
    await asyncio.wait_for(done.wait(), wait)
    await asyncio.sleep(0.05)   # anything called twice shows here
    return got


def run(serve, body, loop_factory=None):
    async def main():
        pair = Pair(serve)
        try:
            return await body(pair)
        finally:
            pair.close()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def test_replies_reach_then_once_each():
    got = run(lambda request: mesh.publish_result(3, 1), lambda pair: outcomes(pair, 200))
    assert got == [mesh.Delivered(3, 1)] * 200


def test_a_request_nobody_answers_times_out_once():
    async def body(pair):
        started = asyncio.get_running_loop().time()
        got = await outcomes(pair, 5)
        return got, asyncio.get_running_loop().time() - started
    got, took = run(lambda request: None, body)
    assert [type(error) for error in got] == [PeerTimeout] * 5
    assert TIMEOUT * 0.9 <= took < TIMEOUT + 2


def test_a_bad_reply_is_a_bad_reply():
    got = run(lambda request: b'{"nonsense": 1}', lambda pair: outcomes(pair, 3))
    assert [type(error) for error in got] == [BadReply] * 3


def test_refused_at_once_reaches_then_in_the_next_turn_not_inside_request():
    async def body(pair):
        called = []
        pair.asker.request(9, mesh.publish_request(["c"], FRAME), then=called.append)   # no such peer
        too_large = b"x" * (pair.asker.max_bytes + 1)
        pair.asker.request(2, mesh.publish_request(["c"], too_large), then=called.append)
        assert called == []
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return [type(outcome.exception()) for outcome in called]
    assert run(lambda request: None, body) == [PeerUnavailable, TooLarge]


def test_a_peer_that_leaves_fails_what_waits_for_it():
    async def body(pair):
        called = []
        for _ in range(10):
            pair.asker.request(2, mesh.publish_request(["c"], FRAME), then=called.append)
        pair.asker.disconnect(2)
        await asyncio.sleep(TIMEOUT * 2)   # and the sweep finds nothing left to time out
        return [type(outcome.exception()) for outcome in called]
    assert run(lambda request: None, body) == [PeerUnavailable] * 10


def test_a_then_that_raises_does_not_stop_the_other_replies(caplog):
    async def body(pair):
        got = []

        def then(outcome):
            got.append(outcome.result())
            if len(got) == 1:
                raise RuntimeError("a callback's own bug")

        for _ in range(20):
            pair.asker.request(2, mesh.publish_request(["c"], FRAME), then=then)
        for _ in range(100):
            if len(got) == 20:
                break
            await asyncio.sleep(0.02)
        return got
    assert run(lambda request: mesh.publish_result(1, 0), body) == [mesh.Delivered(1, 0)] * 20
    assert "callback failed" in caplog.text


def test_a_timeout_of_its_own_ends_on_its_own_deadline():
    """Requests with a timeout of their own (kept apart from the default ones) time out when theirs says."""
    async def body(pair):
        loop = asyncio.get_running_loop()
        started, ended = loop.time(), {}

        def then(name):
            return lambda outcome: ended.setdefault(name, (type(outcome.exception()), loop.time() - started))

        pair.asker.request(2, mesh.publish_request(["c"], FRAME), then=then("default"))
        pair.asker.request(2, mesh.publish_request(["c"], FRAME), timeout=TIMEOUT / 3, then=then("shorter"))
        pair.asker.request(2, mesh.publish_request(["c"], FRAME), timeout=TIMEOUT * 2, then=then("longer"))
        for _ in range(100):
            if len(ended) == 3:
                break
            await asyncio.sleep(0.02)
        return ended
    ended = run(lambda request: None, body)
    assert {name: error for name, (error, _) in ended.items()} == dict.fromkeys(("default", "shorter", "longer"),
                                                                               PeerTimeout)
    assert ended["shorter"][1] < ended["default"][1] < ended["longer"][1]
    assert ended["shorter"][1] < TIMEOUT * 0.9 and ended["longer"][1] >= TIMEOUT * 1.8


def test_a_full_link_fails_its_batch_in_the_next_turn_not_inside_request():
    """The request that fills a batch sends it from inside request(); when the link refuses it (zmq.Again,
    its queue full), every request of the batch fails with PeerUnavailable after the call, not in it.
    (Filling ZeroMQ's real queue takes 100,000 messages: the link's send is made to refuse instead.)"""
    class FullLink:
        def send(self, frames):
            raise zmq.Again()

    async def body(pair):
        pair.asker.links.usable = lambda node_id: FullLink()
        called = []
        for _ in range(mesh.MAX_BATCH):
            pair.asker.request(2, mesh.publish_request(["c"], FRAME), then=called.append)
            assert called == []
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return [type(outcome.exception()) for outcome in called]
    assert run(lambda request: None, body) == [PeerUnavailable] * mesh.MAX_BATCH


def test_an_outcome_made_first_is_filled_and_told_whenever_it_is_asked():
    """A Deferred is made before its request and told what follows later (`when_done`): before the
    reply (called with it), after the reply (called at once), or awaited (`future()`)."""
    async def body(pair):
        early, late, awaited = Deferred(), Deferred(), Deferred()
        for outcome in (early, late, awaited):
            assert pair.asker.request(2, mesh.publish_request(["c"], FRAME), then=outcome) is outcome
        called = []
        early.when_done(lambda outcome: called.append(("early", outcome.result())))
        await asyncio.wait_for(awaited.future(), 5)
        await asyncio.sleep(0.05)
        assert late.done() and called == [("early", mesh.Delivered(2, 0))]
        late.when_done(lambda outcome: called.append(("late", outcome.result())))
        assert called[-1] == ("late", mesh.Delivered(2, 0))
        refused = pair.asker.request(9, mesh.publish_request(["c"], FRAME), then=Deferred())   # no such peer
        await asyncio.wait_for(refused.future(), 5)
        return type(refused.exception()), awaited.result()
    assert run(lambda request: mesh.publish_result(2, 0), body) == (PeerUnavailable, mesh.Delivered(2, 0))


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_a_reply_that_came_while_the_loop_was_held_up_is_a_reply_not_a_timeout(loop_name):
    """A turn of the loop longer than the timeout (here a reader that sleeps, as a long fan-out holds the loop)
    while the peer's reply, sent in time, waits in the socket. uvloop runs its timers before it reads its
    sockets, so the sweep comes first after such a turn: it must not call that request timed out."""
    held, holder = socket.socketpair()
    held.setblocking(False)

    def hold_up():
        held.recv(16)
        time.sleep(TIMEOUT * 2)

    def serve(request):
        asyncio.get_running_loop().call_soon(holder.send, b"x")   # after this reply's flush: the hold-up begins
        return mesh.publish_result(1, 0)

    async def body(pair):
        asyncio.get_running_loop().add_reader(held.fileno(), hold_up)
        got = await outcomes(pair, 1)
        asyncio.get_running_loop().remove_reader(held.fileno())
        return got, pair.asker.timeouts
    try:
        got, timeouts = run(serve, body, loop_factory(loop_name))
    finally:
        held.close()
        holder.close()
    assert got == [mesh.Delivered(1, 0)] and timeouts == 0


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_a_loop_held_up_turn_after_turn_still_times_requests_out(loop_name):
    """Every turn longer than the sweep's period, and a peer that never answers: each request still ends
    as PeerTimeout, within a few turns of its deadline."""
    held, holder = socket.socketpair()
    held.setblocking(False)
    hold = TIMEOUT / 2

    def hold_up():
        held.recv(16)
        time.sleep(hold)
        holder.send(b"x")   # and the next turn again

    async def body(pair):
        loop = asyncio.get_running_loop()
        started, ended = loop.time(), []
        done = asyncio.Event()

        def then(outcome):
            ended.append((type(outcome.exception()), loop.time() - started))
            if len(ended) == 3:
                done.set()

        loop.add_reader(held.fileno(), hold_up)
        holder.send(b"x")
        for _ in range(3):
            pair.asker.request(2, mesh.publish_request(["c"], FRAME), then=then)
        await asyncio.wait_for(done.wait(), 10)
        loop.remove_reader(held.fileno())
        return ended
    try:
        ended = run(lambda request: None, body, loop_factory(loop_name))
    finally:
        held.close()
        holder.close()
    assert [error for error, _ in ended] == [PeerTimeout] * 3
    assert all(took < TIMEOUT + 4 * hold for _, took in ended), ended


def test_a_batchs_replies_leave_as_soon_as_it_is_served_not_at_the_end_of_the_turn():
    """Two batches of requests (10, then 1) reach the serving node in one read; serving the second holds its
    loop for a second (as a long fan-out does). The asking node, on a loop of its own in another thread,
    has the replies to the first batch while that second lasts: they left when their batch was served."""
    import threading

    key = cluster_key.generate()
    max_bytes = mesh.max_mesh_bytes(65536, 65536)
    hold, served, address, ready = 1.0, [0], [], threading.Event()
    held = {}

    def serve(request):
        served[0] += 1
        if served[0] == 11:   # the one request of the second batch
            held["from"] = time.monotonic()
            time.sleep(hold)
            held["to"] = time.monotonic()
        return mesh.publish_result(1, 0)

    async def serving(stop: threading.Event, wait: threading.Event):
        context = zmq.Context()
        zap = ZapHandler(context, key)
        server = MeshPoint(context, "tcp://127.0.0.1:0", 5.0, 64 << 20, key, max_bytes)
        server.handle_request = lambda peer, request: serve(request)
        server.links.on_up = lambda node_id: None
        address.append(server.address)
        ready.set()
        loop = asyncio.get_running_loop()
        while not wait.is_set():   # the asker connects and says when its requests are about to go
            await asyncio.sleep(0.01)
        loop.call_soon(time.sleep, 0.3)   # both batches arrive while this loop is busy: one read has them
        while not stop.is_set():
            await asyncio.sleep(0.01)
        server.close()
        zap.close()
        context.destroy(linger=0)

    stop, wait = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(serving(stop, wait)))
    thread.start()
    try:
        assert ready.wait(10)

        async def asking():
            context = zmq.Context()
            asker = MeshPoint(context, "tcp://127.0.0.1:0", 5.0, 64 << 20, key, max_bytes)
            asker.links.on_up = lambda node_id: None
            asker.connect(2, address[0], 1)
            got = []
            try:
                first = []
                asker.request(2, mesh.publish_request(["c"], FRAME), then=first.append)   # the link is up
                for _ in range(500):
                    if first:
                        break
                    await asyncio.sleep(0.01)
                served[0] = 0
                wait.set()
                await asyncio.sleep(0.1)   # the serving loop is in its 0.3 s now

                def then(outcome):
                    got.append((outcome.result(), time.monotonic()))
                for count in (10, 1):   # two batches: each turn's requests leave as one (fewer than 32)
                    for _ in range(count):
                        asker.request(2, mesh.publish_request(["c"], FRAME), then=then)
                    await asyncio.sleep(0.02)
                for _ in range(500):
                    if len(got) == 11:
                        break
                    await asyncio.sleep(0.01)
                return got
            finally:
                asker.close()
                context.destroy(linger=0)

        got = asyncio.run(asking())
    finally:
        stop.set()
        thread.join(10)
    assert [result for result, _ in got] == [mesh.Delivered(1, 0)] * 11
    assert held, "the second batch was served"
    early = [when for _, when in got if when < held["to"]]
    assert len(early) == 10, (len(early), held)
