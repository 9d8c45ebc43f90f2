"""What an idle client connection costs a node process, and the reading and writing that keep it small.

Between frames a connection waits on its stream's read Future without a
coroutine (node/client_protocol.py), and its IOStream's queues exist only
while something is queued (`OnDemandDeque`). The frames a client sends must
still arrive whole and in order however the bytes come: many frames in one
segment, one frame byte by byte, more than Tornado's yield threshold at once.
"""

import asyncio
import collections
import os
import socket
import struct
import time

import psutil
import pytest
from hypothesis import given, settings, strategies as st
from tornado.iostream import IOStream, StreamClosedError

from conftest import WAIT, Cluster, raw_upgrade, running
from node.client_protocol import OnDemandDeque, slim_stream


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (RFC 6455, section 5.2)."""
    length = len(payload)
    if length < 126:
        header = bytes([0x80 | opcode, 0x80 | length])
    elif length < 65536:
        header = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", length)
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", length)
    key = os.urandom(4)
    masked = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    return header + key + masked


def upgrade(port: int) -> socket.socket:
    """A client connection that did the WebSocket handshake by hand and sends nothing more."""
    return raw_upgrade(port)[0]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    with running(Cluster(tmp_path_factory.mktemp("memory"), workers=1)) as cluster:
        yield cluster


def test_idle_connections_cost_a_node_little_memory(one_node):
    """500 idle connections grow the node's RSS by well under Nchan's 10.4 KiB each (meshgate: about 3)."""
    count = 500
    node = psutil.Process(one_node.status()["nodes"][0]["pid"])
    before = node.memory_info().rss
    socks = [upgrade(one_node.client_port) for _ in range(count)]
    try:
        time.sleep(1.0)
        per_connection = (node.memory_info().rss - before) / count
        assert per_connection < 6 * 1024, f"{per_connection / 1024:.1f} KiB per idle connection"
        assert one_node.status()["nodes"][0]["pid"] == node.pid
    finally:
        for sock in socks:
            sock.close()


def test_frames_arrive_whole_and_in_order_however_the_bytes_come(one_node):
    """Frames in one segment, a frame byte by byte, and over 256 KiB at once (where Tornado's loop yields)."""
    consumer = one_node.api()
    assert consumer.request("queue.pop", ["default"])["E"] is None
    sock = upgrade(one_node.client_port)
    try:
        sock.sendall(b"".join(frame(f"burst {n}".encode()) for n in range(40)))
        slow = frame(b"byte by byte")
        for index in range(len(slow)):
            sock.sendall(slow[index:index + 1])
            time.sleep(0.005)
        big = [frame(bytes([65 + n]) * 100_000) for n in range(4)]
        sock.sendall(b"".join(big) + frame(b"after the big ones"))
        time.sleep(0.3)   # idle again: the next frame is waited for without a coroutine
        sock.sendall(frame(b"after a pause"))
        expected = [f"burst {n}" for n in range(40)] + ["byte by byte"]
        expected += [chr(65 + n) * 100_000 for n in range(4)] + ["after the big ones", "after a pause"]
        got = [consumer.event()["p"]["d"]["frame"]["data"] for _ in expected]
        assert got == expected
        sock.sendall(frame(struct.pack("!H", 1000), opcode=0x8))
        sock.settimeout(WAIT)
        reply = sock.recv(16)
        assert reply[:1] == b"\x88" and struct.unpack("!H", reply[2:4])[0] == 1000
    finally:
        sock.close()
        consumer.ws.close()


# --- OnDemandDeque, on its own and under a real IOStream ----------------------------------------

operations = st.lists(st.one_of(st.tuples(st.just("append"), st.integers()), st.just(("popleft",)),
                                st.just(("first",)), st.just(("last",)), st.just(("clear",))), max_size=60)


@settings(max_examples=200, deadline=None, database=None)
@given(operations)
def test_on_demand_deque_does_what_a_deque_does(ops):
    """Every operation IOStream uses gives what collections.deque gives, IndexError included."""
    lean, real = OnDemandDeque(), collections.deque()

    def outcome(target, op):
        try:
            if op[0] == "append":
                return target.append(op[1])
            if op[0] == "popleft":
                return target.popleft()
            if op[0] == "first":
                return target[0]
            if op[0] == "last":
                return target[-1]
            return target.clear()
        except IndexError:
            return IndexError

    for op in ops:
        assert outcome(lean, op) == outcome(real, op)
        assert list(lean) == list(real) and len(lean) == len(real) and bool(lean) == bool(real)
    if not real:
        assert lean._items is None   # the deque went with the last item


def test_stream_with_on_demand_deques_writes_a_backlog_in_order_and_fails_it_on_close():
    """A peer that does not read gets everything once it reads; a close fails what was still queued."""

    async def main():
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        theirs.setblocking(False)
        stream = IOStream(ours)
        slim_stream(stream)
        assert isinstance(stream._write_futures, OnDemandDeque)
        assert isinstance(stream._write_buffer._buffers, OnDemandDeque)
        chunks = [bytes([n % 251]) * (100 if n % 3 else 5000) for n in range(300)]   # merged and large writes
        futures = [stream.write(chunk) for chunk in chunks]
        assert len(stream._write_buffer) > 0   # a backlog
        received = bytearray()
        while len(received) < sum(map(len, chunks)):
            try:
                received += theirs.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await asyncio.wait_for(asyncio.gather(*futures), WAIT)
        assert bytes(received) == b"".join(chunks)
        assert stream._write_futures._items is None and stream._write_buffer._buffers._items is None

        queued = [future for future in [stream.write(b"x" * 5000) for _ in range(50)] if not future.done()]
        assert queued and stream._write_futures
        stream.close()
        for future in queued:
            with pytest.raises(StreamClosedError):
                await future
        assert not stream._write_futures
        theirs.close()

    asyncio.run(main())
