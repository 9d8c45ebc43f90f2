"""The baseline: a broadcast server written by hand on the `websockets` library, one process.

    python bench/baseline_server.py WS_PORT HTTP_PORT

Subscribers connect to ws://127.0.0.1:WS_PORT/ (any path). A POST to
http://127.0.0.1:HTTP_PORT/ (any path, keep-alive) broadcasts its body as a
text message to every connection, with `websockets`' own `broadcast()`, and
answers `{"s": <connections>}`. The HTTP side is a few lines of asyncio in the
same process and event loop, because the `websockets` server answers only GET
upgrades: that way the baseline is published to exactly like meshgate and
Nchan, by the same HTTP publisher.

Idle subscribers are never pinged (`ping_interval=None`): the load generator's
receivers only listen, and pings would be traffic the other servers do not send.
"""

import asyncio
import sys

from websockets.asyncio.server import broadcast, serve

CLIENTS = set()


async def subscriber(ws) -> None:
    CLIENTS.add(ws)
    try:
        await ws.wait_closed()
    finally:
        CLIENTS.discard(ws)


async def publisher(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One keep-alive HTTP/1.1 connection: each request's body is broadcast, then answered."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            broadcast(CLIENTS, body.decode("utf-8", "replace"))
            reply = b'{"s":%d}' % len(CLIENTS)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(reply), reply))
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(ws_port: int, http_port: int) -> None:
    async with serve(subscriber, "127.0.0.1", ws_port, compression=None, ping_interval=None, backlog=1024):
        http = await asyncio.start_server(publisher, "127.0.0.1", http_port, backlog=1024)
        async with http:
            print("ready", flush=True)
            await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
