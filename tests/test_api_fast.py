"""The API port's own HTTP/1.1 reader (node/api_fast.py) on its own: its time limits and its bound on what a
pipelining client may leave waiting. The rest of its behaviour is tested through the running cluster in
test_api_http.py; here a server of one process, on a real socket, answers with an executor that only
echoes, so that the limits can be shortened to fractions of a second."""

import asyncio
import json
import socket
import time

import pytest
from tornado.web import Application

from node.api_fast import ApiServer

pytestmark = pytest.mark.timeout(60)


class _Echo:
    """The executor's interface as node/api_fast.py uses it: every call answers its params back, or waits."""

    class node:
        node_id = 7

        class access:
            @staticmethod
            def check_now(request):
                class User:
                    roles, name = frozenset({"read", "write"}), ""
                return User

    def __init__(self):
        self.waiting = []
        self.hold = False

    def execute(self, method, params, caller, req_id, reply):
        if self.hold:
            self.waiting.append((reply, params))
            return
        reply(None, json.dumps({"E": None, "r": params}).encode())

    def refused(self, method, caller, code):
        pass


def request(body: bytes) -> bytes:
    return b"POST /v1/mesh/send HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def serve(api, idle: float, body: float, max_body: int = 1024):
    server = ApiServer(Application(), api=api, max_body=max_body, idle_connection_timeout=idle, body_timeout=body)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    server.add_sockets([sock])
    return server, sock.getsockname()[1]


async def closed_after(reader, limit: float) -> float:
    """Seconds until the server closes the connection (reading whatever it sends)."""
    started = time.monotonic()
    while await asyncio.wait_for(reader.read(65536), limit):
        pass
    return time.monotonic() - started


def test_a_head_that_never_ends_and_an_idle_connection_are_closed_in_time():
    async def run():
        server, port = await serve(_Echo(), idle=0.5, body=5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/mesh/send HTTP/1.1\r\nHost: x\r\n")
        assert 0.4 <= await closed_after(reader, 5) <= 2.0
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(b'{"c":"1"}'))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK\r\n")
        assert 0.4 <= await closed_after(reader, 5) <= 2.0   # kept alive, then idle too long
        server.stop()

    asyncio.run(run())


def test_a_body_that_never_ends_is_closed_after_the_body_time_however_it_trickles():
    async def run():
        server, port = await serve(_Echo(), idle=30, body=0.6)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/mesh/send HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")

        async def trickle():
            for _ in range(40):
                await asyncio.sleep(0.1)
                writer.write(b" ")
        dripping = asyncio.ensure_future(trickle())
        assert 0.5 <= await closed_after(reader, 5) <= 2.0
        dripping.cancel()
        server.stop()

    asyncio.run(run())


def test_a_pipelining_client_is_not_read_past_the_bound_while_an_answer_waits_and_nothing_is_lost():
    async def run():
        api = _Echo()
        api.hold = True
        server, port = await serve(api, idle=30, body=30, max_body=1024)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        count = 3000
        writer.write(b"".join(request(b'{"n":%d}' % n) for n in range(count)))   # about 150 KB
        for _ in range(100):
            if api.waiting:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        [conn] = server.fast
        assert conn.paused and len(conn.buffer) - conn.pos <= 65536 + 1024 + 65536
        api.hold = False
        [(reply, params)] = api.waiting
        reply(None, json.dumps({"E": None, "r": params}).encode())
        seen = []
        while len(seen) < count:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert b"X-Meshgate-Node: 7\r\n" in head
            seen.append(json.loads(await reader.readexactly(length))["r"]["n"])
        assert seen == list(range(count))
        writer.close()
        server.stop()

    asyncio.run(run())
