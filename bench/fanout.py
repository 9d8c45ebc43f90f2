"""Fan-out benchmark: one publish to N connections, meshgate against a baseline in the same run.

Usage: .venv/bin/python bench/fanout.py [--clients 1000] [--messages 200] [--workers 2] [--size 64]

Starts a meshgate cluster (through the CLI, on free loopback ports) and a
baseline server, connects N WebSocket clients to each (one asyncio reader
process that only counts bytes, so the reader costs the same for both), sends
M publishes, and reports deliveries per second and the ratio meshgate/baseline.
The baseline is a hand-written `websockets` server (broadcast to every
connection) when that package is installed, else a plain Tornado server that
calls write_message per connection. Also reports meshgate's memory per idle
connection (RSS growth of the node processes / N). Loopback only; bounded.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import Cluster, free_port  # noqa: E402

BASELINE_SERVER = r'''
import asyncio, sys
port = int(sys.argv[1])
try:
    import websockets
    from websockets.asyncio.server import serve, broadcast
    CLIENTS = set()
    async def handler(ws):
        if ws.request.path == "/pub":
            async for message in ws:
                broadcast(CLIENTS, message)
                await ws.send("ok")
            return
        CLIENTS.add(ws)
        try:
            await ws.wait_closed()
        finally:
            CLIENTS.discard(ws)
    async def main():
        async with serve(handler, "127.0.0.1", port, compression=None, max_queue=None):
            print("ready websockets", flush=True)
            await asyncio.Future()
    asyncio.run(main())
except ImportError:
    import tornado.web, tornado.websocket, tornado.ioloop
    CLIENTS = set()
    class Sub(tornado.websocket.WebSocketHandler):
        def open(self): CLIENTS.add(self)
        def on_close(self): CLIENTS.discard(self)
    class Pub(tornado.websocket.WebSocketHandler):
        def on_message(self, message):
            for c in list(CLIENTS):
                c.write_message(message)
            self.write_message("ok")
    async def main():
        tornado.web.Application([(r"/", Sub), (r"/pub", Pub)]).listen(port, "127.0.0.1")
        print("ready tornado", flush=True)
        await asyncio.Future()
    asyncio.run(main())
'''

READER = r'''
import asyncio, base64, os, sys, time
host, port, path, count, expect_bytes = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
received = 0
done = asyncio.Event()
class Reader(asyncio.Protocol):
    def __init__(self, ready):
        self.ready, self.head, self.open = ready, b"", False
    def connection_made(self, transport):
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    def data_received(self, data):
        global received
        if not self.open:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.open, data = True, self.head[end + 4:]
            self.ready.set_result(None)
        received += len(data)
        if received >= expect_bytes:
            done.set()
async def main():
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(count):
        ready = loop.create_future()
        conns.append(await loop.create_connection(lambda: Reader(ready), host, port))
        await ready
    print("connected", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    started = time.monotonic()
    try:
        await asyncio.wait_for(done.wait(), 120)
    except asyncio.TimeoutError:
        pass
    print(f"done {received} {time.monotonic() - started:.4f}", flush=True)
asyncio.run(main())
'''


def _frame_size(payload: int) -> int:
    return payload + (2 if payload < 126 else 4 if payload <= 0xFFFF else 10)


def run_round(host_port: tuple, path: str, clients: int, messages: int, size: int, publish) -> float:
    """Connects the reader, runs `publish()` M times, returns deliveries per second."""
    expect = clients * messages * _frame_size(size)
    reader = subprocess.Popen([sys.executable, "-c", READER, host_port[0], str(host_port[1]), path,
                               str(clients), str(expect)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "connected"
    time.sleep(0.5)
    started = time.monotonic()
    reader.stdin.write("go\n")
    reader.stdin.flush()
    publish()
    line = reader.stdout.readline().split()
    reader.wait(timeout=30)
    received, elapsed = int(line[1]), time.monotonic() - started
    deliveries = received // _frame_size(size)
    if received < expect:
        print(f"  warning: {received}/{expect} bytes arrived")
    return deliveries / elapsed


def _ws_publisher(url: str, messages: list, build):
    import websocket
    ws = websocket.create_connection(url, timeout=30)
    # Pipelined: send everything, then read every reply.
    for message in messages:
        ws.send(build(message))
    for _ in messages:
        ws.recv()
    ws.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    payload = "m" * args.size
    messages = [payload] * args.messages

    port = free_port()
    baseline = subprocess.Popen([sys.executable, "-c", BASELINE_SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    kind = baseline.stdout.readline().split()[1]
    try:
        base_rate = run_round(("127.0.0.1", port), "/", args.clients, args.messages, args.size,
                              lambda: _ws_publisher(f"ws://127.0.0.1:{port}/pub", messages, lambda m: m))
    finally:
        baseline.terminate()
        baseline.wait()

    cluster = Cluster(Path(tempfile.mkdtemp()), workers=args.workers)
    cluster.start()
    try:
        rate, per_connection = run_round_meshgate(cluster, args, messages)
    finally:
        cluster.stop()
    print(f"baseline ({kind}): {base_rate:,.0f} deliveries/s")
    print(f"meshgate ({args.workers} workers): {rate:,.0f} deliveries/s")
    print(f"ratio meshgate/baseline: {rate / base_rate:.2f}")
    print(f"meshgate memory per idle connection: {per_connection / 1024:.1f} KiB")


def run_round_meshgate(cluster, args, messages) -> tuple:
    """Connects N clients, subscribes each (learning ids from queue events), measures the fan-out."""
    import websocket
    nodes = [psutil.Process(n["pid"]) for n in cluster.status()["nodes"]]
    rss_before = sum(p.memory_info().rss for p in nodes)
    expect = args.clients * args.messages * _frame_size(args.size)
    reader = subprocess.Popen([sys.executable, "-c", READER_SUBSCRIBING, "127.0.0.1", str(cluster.client_port),
                               str(args.clients), str(expect)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    api = websocket.create_connection(f"ws://127.0.0.1:{cluster.api_port}/ws/v1", timeout=30)
    api.send(json.dumps({"m": "queue.pop", "p": {"t": ["default"]}, "i": 0}))
    api.recv()
    assert reader.stdout.readline().strip() == "connected"
    rss_idle = sum(p.memory_info().rss for p in nodes)
    subscribed = 0
    while subscribed < args.clients:
        message = json.loads(api.recv())
        if message.get("e") == "queue.pop":
            api.send(json.dumps({"m": "conn.call", "i": 1,
                                 "p": {"c": message["p"]["c"], "f": "subscribe", "a": ["bench"]}}))
        elif message.get("i") == 1:
            subscribed += 1
    api.close()
    time.sleep(0.5)
    started = time.monotonic()
    reader.stdin.write("go\n")
    reader.stdin.flush()
    _ws_publisher(f"ws://127.0.0.1:{cluster.api_port}/ws/v1", messages,
                  lambda m: json.dumps({"m": "mesh.publish", "p": {"c": "bench", "d": m}}))
    line = reader.stdout.readline().split()
    reader.wait(timeout=30)
    received = int(line[1])
    elapsed = time.monotonic() - started
    if received < expect:
        print(f"  warning: {received}/{expect} bytes arrived")
    return received // _frame_size(args.size) / elapsed, (rss_idle - rss_before) / args.clients


READER_SUBSCRIBING = READER.replace(
    "host, port, path, count, expect_bytes = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])",
    "host, port, count, expect_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]); path = '/'",
).replace(
    "            self.ready.set_result(None)",
    "            self.ready.set_result(None)\n            transport = self.transport\n"
    "            mask = b'\\x00\\x00\\x00\\x00'\n            transport.write(b'\\x81\\x82' + mask + b'hi')",
).replace(
    "    def connection_made(self, transport):",
    "    def connection_made(self, transport):\n        self.transport = transport",
)

if __name__ == "__main__":
    main()
