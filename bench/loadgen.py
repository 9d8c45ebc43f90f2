"""The load generator: the same client processes measure every server of a run.

    python bench/loadgen.py receive   --host H --port P --path /sub --count N --source 127.1.0.1
    python bench/loadgen.py publish   --host H --port P --path /pub --style raw --count M
    python bench/loadgen.py handshake --host H --port P --path / --count N --concurrency C
    python bench/loadgen.py wssend    --host H --port P        (meshgate's /ws/v1: pipelined mesh.send)
    python bench/loadgen.py consume   --host H --port P        (meshgate's /ws/v1: queue.pop)

Each mode is one process driven over its standard input and output, one JSON
object a line: it prints a "ready" line once its connections are open, then
answers the commands run.py writes to it (see each mode's `commands`). Times
are `time.monotonic()`, which on Linux is one clock for every process, so
the driver compares them across processes.

Everything here is raw asyncio on purpose: a hand-written upgrade and a
frame parser that costs the same whatever server it reads, and no client
library whose speed would differ between servers. Client frames carry a zero
mask (valid WebSocket framing; the mask key is not a secret on loopback).
Only the standard library is used, so this file needs nothing installed.
"""

import argparse
import asyncio
import base64
import json
import os
import re
import socket
import sys
import time

monotonic = time.monotonic
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CONNECT_TIMEOUT = 15.0   # one connection's TCP connect plus upgrade
REPORTED_FAILED = re.compile(rb'"f":(\d+)')
KIND = {"fanout": ord("f"), "warm": ord("w"), "probe": ord("l"), "send": ord("s"), "queue": ord("q")}


def emit(**fields) -> None:
    """One reply line for the driver."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def payload(kind: str, seq: int, size: int) -> bytes:
    """A message of exactly `size` ASCII bytes: its kind letter, a sequence number, padding.

    The kind letter is all a receiver needs to count it; the sequence number
    lets idle probes be told apart. ASCII keeps the bytes 0x81 (a text frame's
    first header byte) out of every payload, which the receivers' fast path
    relies on.
    """
    head = b"%c%09d:" % (KIND[kind], seq)
    return head + b"x" * (size - len(head))


def client_frame(data: bytes, opcode: int = 1) -> bytes:
    """A masked client frame (zero mask key, so the payload goes as it is)."""
    n = len(data)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n <= 0xFFFF:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + data


CLOSE_FRAME = client_frame(b"\x03\xe8", opcode=8)   # 1000, normal closure


def upgrade_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def parse_frames(data: bytes, on_frame) -> int:
    """Calls `on_frame(opcode, payload)` for each complete server frame; returns the bytes used.

    Server frames are never masked. Fragmented messages are not reassembled:
    no server here fragments a message of a few hundred bytes.
    """
    pos, end = 0, len(data)
    while end - pos >= 2:
        length = data[pos + 1] & 0x7F
        head = 2
        if length == 126:
            if end - pos < 4:
                break
            length, head = int.from_bytes(data[pos + 2:pos + 4], "big"), 4
        elif length == 127:
            if end - pos < 10:
                break
            length, head = int.from_bytes(data[pos + 2:pos + 10], "big"), 10
        if end - pos < head + length:
            break
        on_frame(data[pos] & 0x0F, data[pos + head:pos + head + length])
        pos += head + length
    return pos


async def open_connection(loop, factory, host: str, port: int, source: str):
    """A TCP connection from `source` (a loopback address of its own, so that 20,000 connections of
    several processes never run short of ephemeral ports); the port is chosen at connect time."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await loop.create_connection(factory, sock=sock)


async def stdin_lines():
    """The driver's commands, one per line, read without a thread."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        yield line.decode().split()


# --- receivers ----------------------------------------------------------------------------------


class Tally:
    """What one receiver process has seen, summed over its connections.

    `counts[k]` and `last[k]` are the number and the latest arrival time of
    data messages whose first byte is k (their kind letter); `probes` maps an
    idle probe's sequence number to [connections reached, latest arrival].
    """

    def __init__(self):
        self.counts = [0] * 256
        self.last = [0.0] * 256
        self.probes = {}
        self.ids = []          # [client_id, node_id] of connections that were told theirs (meshgate's hello)
        self.closed = 0        # connections the server closed or dropped
        self.pings = 0


class Receiver(asyncio.Protocol):
    """One subscriber: upgrade, then count what arrives by kind and note arrival times.

    The common case, a read holding only whole fan-out frames of the expected
    size, is counted with byte slicing (C speed) so that the receivers cost
    little next to the server; anything else goes through `parse_frames`.
    """

    def __init__(self, tally: Tally, request: bytes, ready, size: int):
        self.tally, self.request, self.ready = tally, request, ready
        self.head = b""
        self.pending = b""
        self.open = False
        self.transport = None
        self.stride = 2 + size if size < 126 else 0
        self.header = (0x81, size)

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc):
        if self.open:
            self.tally.closed += 1
        elif not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed during the upgrade: {exc}"))

    def data_received(self, data: bytes):
        if not self.open:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                self.ready.set_exception(ConnectionError(status.decode(errors="replace")))
                self.transport.close()
                return
            self.open, data = True, self.head[end + 4:]
            self.head = b""
            self.ready.set_result(None)
            if not data:
                return
        now = monotonic()
        if self.pending:
            data, self.pending = self.pending + data, b""
        used = self._fast(data, now) if self.stride else 0
        if used == len(data):
            return
        tally = self.tally

        def frame(opcode, body):
            if opcode in (1, 2) and body:
                kind = body[0]
                tally.counts[kind] += 1
                tally.last[kind] = now
                if kind == 0x6C:      # "l": an idle probe
                    probe = tally.probes.setdefault(int(body[1:10]), [0, 0.0])
                    probe[0] += 1
                    probe[1] = now
                elif kind == 0x68:    # "h <client_id> <node_id>": meshgate's bench entry
                    _, client_id, node_id = body.decode().split()
                    tally.ids.append([client_id, int(node_id)])
            elif opcode == 9:         # ping: answer it, as any client does
                tally.pings += 1
                self.transport.write(client_frame(body, opcode=10))
            elif opcode == 8:
                self.transport.close()

        used += parse_frames(data[used:] if used else data, frame)
        if used < len(data):
            self.pending = data[used:]

    def _fast(self, data: bytes, now: float) -> int:
        """Counts a prefix of whole fan-out frames by slicing; returns the bytes it took (0: none)."""
        stride = self.stride
        n = len(data) // stride
        if not n:
            return 0
        span = n * stride
        if data[0:span:stride].count(self.header[0]) != n or data[1:span:stride].count(self.header[1]) != n:
            return 0
        kinds = data[2:span:stride]
        fanout = kinds.count(0x66)
        if fanout != n:
            return 0
        self.tally.counts[0x66] += n
        self.tally.last[0x66] = now
        return span


async def connect_all(count: int, concurrency: int, connect_one) -> tuple:
    """Opens `count` connections, `concurrency` at a time; returns (connections, failures, first errors)."""
    made, errors = [], []
    next_index = 0

    async def worker():
        nonlocal next_index
        while next_index < count:
            next_index += 1
            try:
                made.append(await asyncio.wait_for(connect_one(), CONNECT_TIMEOUT))
            except (OSError, ConnectionError, asyncio.TimeoutError) as error:
                errors.append(repr(error))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return made, len(errors), errors[:5]


async def wait_for(predicate, timeout: float, stall: float, progress) -> None:
    """Waits until `predicate()`, for at most `timeout` s, or until `progress()` has not moved for `stall` s
    (a server that lost messages must not keep the run waiting for the whole timeout)."""
    deadline = monotonic() + timeout
    seen, moved = progress(), monotonic()
    while not predicate():
        now = monotonic()
        current = progress()
        if current != seen:
            seen, moved = current, now
        if now > deadline or now - moved > stall:
            return
        await asyncio.sleep(0.01)


async def receive(args) -> None:
    """Subscriber connections, opened on command (the driver samples the server's memory between this
    process's start and its connections); commands:

    - `connect`: open `--count` connections, `--concurrency` at a time; replies how many and how long.
    - `wait KIND TOTAL TIMEOUT STALL`: until TOTAL messages of KIND arrived (summed over the
      connections); replies the count and the latest arrival, then resets that count.
    - `probe SEQ TIMEOUT`: until idle probe SEQ reached every connection; replies how many and when
      the last one got it.
    - `ids N`: until N connections know their client id (meshgate's hello); replies them.
    - `send N`: every connection sends N text messages of kind "q" (client-to-server traffic).
    - `quit`: close everything and exit.
    """
    loop = asyncio.get_running_loop()
    tally = Tally()
    request = upgrade_request(args.host, args.port, args.path)

    async def connect_one():
        ready = loop.create_future()
        transport, protocol = await open_connection(
            loop, lambda: Receiver(tally, request, ready, args.size), args.host, args.port, args.source)
        try:
            await ready
        except BaseException:
            transport.close()
            raise
        return protocol

    conns = []
    emit(started=True)
    async for command in stdin_lines():
        name = command[0]
        if name == "connect":
            started = monotonic()
            conns, failed, errors = await connect_all(args.count, args.concurrency, connect_one)
            emit(ready=True, connected=len(conns), failed=failed, errors=errors,
                 seconds=round(monotonic() - started, 3))
        elif name == "wait":
            kind, total, timeout, stall = KIND[command[1]], int(command[2]), float(command[3]), float(command[4])
            await wait_for(lambda: tally.counts[kind] >= total, timeout, stall, lambda: tally.counts[kind])
            emit(count=tally.counts[kind], last=tally.last[kind], closed=tally.closed, pings=tally.pings)
            tally.counts[kind] = 0
        elif name == "probe":
            seq, timeout = int(command[1]), float(command[2])
            await wait_for(lambda: tally.probes.get(seq, (0,))[0] >= len(conns), timeout, timeout,
                           lambda: tally.probes.get(seq, (0,))[0])
            reached, last = tally.probes.pop(seq, [0, 0.0])
            emit(seq=seq, reached=reached, last=last, closed=tally.closed)
        elif name == "ids":
            wanted = int(command[1])
            await wait_for(lambda: len(tally.ids) >= wanted, 10, 10, lambda: len(tally.ids))
            emit(ids=tally.ids[:wanted])
        elif name == "send":
            n = int(command[1])
            started = monotonic()
            for conn in conns:
                conn.transport.write(b"".join(client_frame(payload("queue", i, args.size)) for i in range(n)))
            emit(sent=n * len(conns), start=started)
        elif name == "quit":
            break
    for conn in conns:
        conn.transport.abort()
    emit(bye=True)


# --- HTTP publisher -----------------------------------------------------------------------------


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: `request(bytes)` -> (status, body); one request at a time."""

    def __init__(self):
        self.buffer = b""
        self.waiter = None
        self.transport = None
        self.lost = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.lost = exc or ConnectionError("closed by the server")
        if self.waiter and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def data_received(self, data):
        self.buffer += data
        if self.waiter and not self.waiter.done():
            reply = self._reply()
            if reply is not None:
                self.waiter.set_result(reply)

    def _reply(self):
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        body_start = end + 4
        if fields.get("transfer-encoding", "").lower() == "chunked":
            body, pos = b"", body_start
            while True:
                line_end = self.buffer.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                size = int(self.buffer[pos:line_end].split(b";")[0], 16)
                if len(self.buffer) < line_end + 2 + size + 2:
                    return None
                body += self.buffer[line_end + 2:line_end + 2 + size]
                pos = line_end + 2 + size + 2
                if size == 0:
                    break
            self.buffer = self.buffer[pos:]
        else:
            length = int(fields.get("content-length", "0"))
            if len(self.buffer) < body_start + length:
                return None
            body, self.buffer = self.buffer[body_start:body_start + length], self.buffer[body_start + length:]
        return int(head[0].split()[1]), body

    async def request(self, data: bytes, timeout: float = 30.0):
        if self.lost:
            raise self.lost
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        reply = self._reply() if self.buffer else None
        if reply is not None:
            return reply
        return await asyncio.wait_for(self.waiter, timeout)


def http_request(args, body: bytes) -> bytes:
    return (f"POST {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\nContent-Type: {args.content_type}\r\n"
            f"Accept: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def request_body(args, seq: int) -> bytes:
    """The HTTP body of message `seq`: the payload itself, or meshgate's JSON around it."""
    data = payload(args.kind, seq, args.size)
    if args.style == "raw":
        return data
    if args.style == "mesh.publish":
        return b'{"c":"%s","d":"%s"}' % (args.channel.encode(), data)
    return b'{"c":"%s","d":"%s"}' % (args.target.encode(), data)   # mesh.send


async def publish(args) -> None:
    """`--conns` keep-alive connections, each: send a request, read its reply, send the next.

    With `--count` the connections share M requests (message numbers 0..M-1);
    with `--duration` they go on until that many seconds passed. Commands:
    `go` runs once and replies the figures; `quit`.
    """
    loop = asyncio.get_running_loop()
    conns = []
    for i in range(args.conns):
        _, conn = await open_connection(loop, HttpConnection, args.host, args.port, args.source)
        conns.append(conn)
    emit(ready=True)
    async for command in stdin_lines():
        if command[0] == "quit":
            break
        statuses, errors, failed, reported_failed = {}, [], 0, 0
        next_seq = 0
        started = monotonic()
        stop_at = started + args.duration if args.duration else None
        ok_marker = args.ok_marker.encode() if args.ok_marker else None

        async def run(conn):
            nonlocal next_seq, failed, reported_failed
            while (next_seq < args.count) if stop_at is None else (monotonic() < stop_at):
                seq, next_seq = next_seq, next_seq + 1
                try:
                    status, body = await conn.request(http_request(args, request_body(args, seq)))
                except (OSError, ConnectionError, asyncio.TimeoutError) as error:
                    errors.append(repr(error))
                    return
                statuses[status] = statuses.get(status, 0) + 1
                reported = REPORTED_FAILED.search(body)   # meshgate's publish reply: "f" deliveries failed
                if reported:
                    reported_failed += int(reported.group(1))
                if not 200 <= status < 300 or (ok_marker is not None and ok_marker not in body):
                    failed += 1
                    if len(errors) < 5:
                        errors.append(f"{status} {body[:200]!r}")

        await asyncio.gather(*(run(conn) for conn in conns))
        ended = monotonic()
        emit(requests=sum(statuses.values()), failed=failed, statuses={str(k): v for k, v in statuses.items()},
             reported_failed=reported_failed, errors=errors[:5], start=started, end=ended)
    for conn in conns:
        conn.transport.close()


# --- WebSocket API clients (meshgate's /ws/v1) ------------------------------------------------------


class WsClient(asyncio.Protocol):
    """A WebSocket client connection that hands each complete text message to `on_message(bytes, now)`."""

    def __init__(self, request: bytes, ready, on_message):
        self.request, self.ready, self.on_message = request, ready, on_message
        self.head, self.pending, self.open, self.transport = b"", b"", False, None
        self.headers = {}

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc):
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed during the upgrade: {exc}"))

    def data_received(self, data):
        if not self.open:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.head[:end].decode("latin-1").split("\r\n")
            if " 101 " not in lines[0] + " ":
                self.ready.set_exception(ConnectionError(lines[0]))
                return
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            self.open, data = True, self.head[end + 4:]
            self.ready.set_result(None)
        now = monotonic()
        data = self.pending + data
        used = parse_frames(data, lambda opcode, body: opcode == 1 and self.on_message(body, now))
        self.pending = data[used:]


async def ws_connect(loop, args, path: str, on_message) -> WsClient:
    ready = loop.create_future()
    _, client = await open_connection(
        loop, lambda: WsClient(upgrade_request(args.host, args.port, path), ready, on_message),
        args.host, args.port, args.source)
    await asyncio.wait_for(ready, CONNECT_TIMEOUT)
    return client


async def wssend(args) -> None:
    """One `/ws/v1` connection sending pipelined `mesh.send` requests, at most `--window` unanswered.

    It first consumes a topic of its own (`--probe-topic`) so that the driver
    can tell from the coordinator's status which node holds this connection.
    Commands: `send CLIENT_ID COUNT` replies the figures; `quit`.
    """
    loop = asyncio.get_running_loop()
    state = {"ok": 0, "failed": 0, "replies": 0, "errors": [], "waiter": None, "last": 0.0}

    def on_message(body: bytes, now: float):
        if b'"e":"queue.pop"' in body[:20]:
            return
        state["replies"] += 1
        state["last"] = now
        if b'"E":null' in body and b'"s":true' in body:
            state["ok"] += 1
        else:
            state["failed"] += 1
            if len(state["errors"]) < 5:
                state["errors"].append(body[:200].decode(errors="replace"))
        waiter = state["waiter"]
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    client = await ws_connect(loop, args, "/ws/v1", on_message)
    client.transport.write(client_frame(json.dumps({"m": "queue.pop", "p": {"t": [args.probe_topic]}, "i": 0}).encode()))
    await wait_for(lambda: state["replies"] >= 1, 10, 10, lambda: state["replies"])
    emit(ready=state["ok"] == 1, errors=state["errors"])
    async for command in stdin_lines():
        if command[0] == "quit":
            break
        target, count = command[1], int(command[2])
        for key in ("ok", "failed", "replies"):
            state[key] = 0
        state["errors"] = []
        started = monotonic()
        sent = 0
        deadline = started + args.timeout
        while state["replies"] < count and monotonic() < deadline:
            burst = min(count - sent, args.window - (sent - state["replies"]))
            if burst > 0:
                client.transport.write(b"".join(
                    client_frame(b'{"m":"mesh.send","p":{"c":"%s","d":"%s"},"i":%d}'
                                 % (target.encode(), payload("send", sent + i, args.size), sent + i))
                    for i in range(burst)))
                sent += burst
            state["waiter"] = loop.create_future()
            try:
                await asyncio.wait_for(state["waiter"], max(0.001, deadline - monotonic()))
            except asyncio.TimeoutError:
                break
        emit(requests=sent, replies=state["replies"], ok=state["ok"], failed=state["failed"],
             errors=state["errors"], start=started, end=state["last"])
    client.transport.close()


async def consume(args) -> None:
    """One `/ws/v1` connection consuming the topic `--topic` with `queue.pop`; counts the events.

    Commands: `wait TOTAL TIMEOUT STALL` replies how many events arrived and
    the first and last arrival, then resets; `quit`.
    """
    loop = asyncio.get_running_loop()
    state = {"events": 0, "replies": [], "first": 0.0, "last": 0.0}

    def on_message(body: bytes, now: float):
        if b'"e":"queue.pop"' in body[:20]:
            if not state["events"]:
                state["first"] = now
            state["events"] += 1
            state["last"] = now
        else:
            state["replies"].append(body[:200].decode(errors="replace"))

    client = await ws_connect(loop, args, "/ws/v1", on_message)
    client.transport.write(client_frame(json.dumps({"m": "queue.pop", "p": {"t": [args.topic]}, "i": 1}).encode()))
    await wait_for(lambda: state["replies"], 10, 10, lambda: len(state["replies"]))
    emit(ready=bool(state["replies"]) and '"E":null' in state["replies"][0], replies=state["replies"])
    async for command in stdin_lines():
        if command[0] == "quit":
            break
        total, timeout, stall = int(command[1]), float(command[2]), float(command[3])
        await wait_for(lambda: state["events"] >= total, timeout, stall, lambda: state["events"])
        emit(events=state["events"], first=state["first"], last=state["last"])
        state["events"], state["first"], state["last"] = 0, 0.0, 0.0   # a round's figures are its own
    client.transport.close()


# --- handshakes ---------------------------------------------------------------------------------------


class Handshake(asyncio.Protocol):
    """Connect, upgrade, send a close frame, wait for the server's close (or its end of the TCP connection)."""

    def __init__(self, request: bytes, done):
        self.request, self.done, self.buffer, self.upgraded = request, done, b"", False

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data):
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if b" 101 " not in self.buffer.split(b"\r\n", 1)[0] + b" ":
                self._finish(ConnectionError(self.buffer.split(b"\r\n", 1)[0].decode(errors="replace")))
                return
            self.upgraded, self.buffer = True, self.buffer[end + 4:]
            self.transport.write(CLOSE_FRAME)
        closing = []
        parse_frames(self.buffer, lambda opcode, body: opcode == 8 and closing.append(True))
        if closing:
            self._finish(None)

    def connection_lost(self, exc):
        self._finish(None if self.upgraded else ConnectionError(f"closed during the upgrade: {exc}"))

    def _finish(self, error):
        if not self.done.done():
            if error:
                self.done.set_exception(error)
            else:
                self.done.set_result(None)
        self.transport.close()


async def handshake(args) -> None:
    """`--count` complete WebSocket lifetimes, `--concurrency` at a time; one reply with the figures."""
    loop = asyncio.get_running_loop()

    async def one():
        done = loop.create_future()
        request = upgrade_request(args.host, args.port, args.path)
        transport, _ = await open_connection(loop, lambda: Handshake(request, done), args.host, args.port,
                                             args.source)
        try:
            await done
        finally:
            transport.close()

    emit(ready=True)
    async for command in stdin_lines():
        if command[0] == "quit":
            break
        started = monotonic()
        made, failed, errors = await connect_all(args.count, args.concurrency, one)
        emit(ok=len(made), failed=failed, errors=errors, start=started, end=monotonic())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["receive", "publish", "handshake", "wssend", "consume"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--source", default="127.0.0.1", help="local address the connections come from")
    parser.add_argument("--size", type=int, default=100, help="payload bytes of each message")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--conns", type=int, default=4)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--style", choices=["raw", "mesh.publish", "mesh.send"], default="raw")
    parser.add_argument("--kind", choices=sorted(KIND), default="fanout")
    parser.add_argument("--channel", default="bench")
    parser.add_argument("--target", default="")
    parser.add_argument("--content-type", default="text/plain")
    parser.add_argument("--ok-marker", default="", help="bytes a successful reply body must contain")
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--topic", default="default")
    parser.add_argument("--probe-topic", default="bench-probe")
    args = parser.parse_args()
    asyncio.run({"receive": receive, "publish": publish, "handshake": handshake,
                 "wssend": wssend, "consume": consume}[args.mode](args))


if __name__ == "__main__":
    main()
