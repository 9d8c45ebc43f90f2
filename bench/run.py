"""meshgate against Nchan and a hand-written `websockets` server, same run, same load generator.

    make bench                                   # everything, about 5 minutes on 2 cores
    .venv/bin/python bench/run.py --subscribers 1000 5000 20000
    make bench BENCH_ARGS="--subscribers 1000 --servers meshgate nchan"

For each server in turn (a fresh start for every round): fan-out rounds at
each subscriber count K (memory per idle connection, idle fan-out completion
time, fan-out deliveries per second, CPU, delivery ratio), then a round with
100 subscribers (publish requests per second, WebSocket handshakes per
second, and meshgate's own API figures). Prints one table per figure with
the ratios between servers and writes bench/results/latest.json. What each
figure means is in bench/README.md. The load generator is bench/loadgen.py.
"""

import argparse
import http.client
import json
import platform
import queue
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
from loadgen import payload  # noqa: E402
from servers import Baseline, Meshgate, Nchan, nchan_missing  # noqa: E402

LOADGEN = str(HERE / "loadgen.py")
monotonic = time.monotonic


class BenchError(RuntimeError):
    """A round could not be measured (a process did not answer in time, a server refused clients, ...)."""


# --- load generator processes --------------------------------------------------------------------------


class Child:
    """One load generator process: commands in on its stdin, JSON replies out, every wait bounded."""

    started = []   # every Child of this run, so that all are ended however the run ends

    def __init__(self, mode: str, endpoint, **options):
        argv = [sys.executable, LOADGEN, mode, "--host", endpoint.host, "--port", str(endpoint.port),
                "--path", endpoint.path, "--source", next_source()]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        self.name = f"loadgen {mode}"
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                        start_new_session=True)   # Ctrl-C goes to run.py, which stops us
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        Child.started.append(self)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, *words) -> None:
        try:
            self.process.stdin.write(" ".join(str(word) for word in words) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise BenchError(f"{self.name} is gone: {error}")

    def reply(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"{self.name} did not answer within {timeout:.0f} s")
        if line is None:
            raise BenchError(f"{self.name} exited with status {self.process.wait(timeout=5)}")
        return json.loads(line)

    def ask(self, timeout: float, *words) -> dict:
        self.send(*words)
        return self.reply(timeout)

    def psutil(self):
        try:
            return psutil.Process(self.process.pid)
        except psutil.NoSuchProcess:
            return None

    def stop(self) -> None:
        """`quit`, then SIGTERM and SIGKILL to this child's own PID if it does not exit."""
        if self.process.poll() is None:
            try:
                self.send("quit")
                self.process.wait(timeout=10)
            except (BenchError, subprocess.TimeoutExpired):
                self.process.terminate()
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=5)
        if self in Child.started:
            Child.started.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        for child in list(cls.started):
            child.stop()


_sources = iter(f"127.1.{n // 250}.{n % 250 + 1}" for n in range(250 * 250))


def next_source() -> str:
    """A loopback address no earlier process of this run connected from: each receiver process gets its
    own, so that connections closed by earlier rounds (TIME_WAIT) never take the ports a new round needs."""
    return next(_sources)


class Receivers:
    """K subscribers spread over a few receiver processes: started first, connected by `connect()`."""

    def __init__(self, endpoint, count: int, processes: int, size: int, concurrency: int):
        self.count = count
        self.connect_seconds = None
        shares = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
        self.children = [(Child("receive", endpoint, count=share, size=size, concurrency=concurrency), share)
                         for share in shares if share]
        try:
            for child, _ in self.children:
                child.reply(timeout=30)
        except BaseException:
            self.stop()
            raise

    def connect(self) -> "Receivers":
        """Opens every connection (bounded: each connect has its own timeout in the receivers)."""
        replies = self.ask_all(60 + self.count / 100, "connect")
        self.connect_seconds = max(reply["seconds"] for reply in replies)
        failed = sum(reply["failed"] for reply in replies)
        if failed:
            errors = [error for reply in replies for error in reply["errors"]]
            raise BenchError(f"{failed} of {self.count} subscribers could not connect: {errors[:3]}")
        return self

    def ask_all(self, timeout: float, *words, per_share=None) -> list:
        """Sends a command to every receiver process (`per_share(share)` fills in a per-process
        argument), then collects the replies."""
        for child, share in self.children:
            child.send(*words, *(per_share(share) if per_share else ()))
        return [child.reply(timeout) for child, _ in self.children]

    def wait(self, kind: str, per_connection: int, timeout: float, stall: float = 5.0) -> dict:
        """Waits until every connection has `per_connection` messages of `kind`; sums the replies."""
        return self.wait_each(kind, [share * per_connection for _, share in self.children], timeout, stall)

    def wait_each(self, kind: str, totals: list, timeout: float, stall: float) -> dict:
        """Waits until receiver process i has `totals[i]` messages of `kind` (or stalls, or times out)."""
        for (child, _), total in zip(self.children, totals):
            child.send("wait", kind, total, timeout, stall)
        replies = [child.reply(timeout + 15) for child, _ in self.children]
        return {"received": sum(r["count"] for r in replies), "expected": sum(totals),
                "missing": [total - r["count"] for total, r in zip(totals, replies)],
                "last": max(r["last"] for r in replies), "closed": sum(r["closed"] for r in replies)}

    def processes(self) -> list:
        return [p for p in (child.psutil() for child, _ in self.children) if p]

    def stop(self) -> None:
        for child, _ in self.children:
            child.stop()


# --- measuring helpers -----------------------------------------------------------------------------------


def cpu_seconds(processes: list) -> dict:
    """user+system CPU seconds per PID (processes that exited meanwhile are left out)."""
    seconds = {}
    for process in processes:
        try:
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return seconds


def cpu_used(before: dict, after: dict) -> dict:
    return {pid: round(after[pid] - before.get(pid, 0.0), 3) for pid in after}


class OtherProcesses:
    """CPU seconds that processes outside the bench use meanwhile (the machine may be shared): a figure
    measured while something else ran is worth less, and the tables say how much else ran."""

    def __init__(self, ours: list):
        self.ours = {p.pid for p in ours} | {p.pid for p in psutil.Process().children(recursive=True)}
        self.ours.add(psutil.Process().pid)
        self.before = self._sample()

    def _sample(self) -> dict:
        seconds = {}
        for process in psutil.process_iter(["cpu_times", "create_time"]):
            times, created = process.info["cpu_times"], process.info["create_time"]
            if process.pid not in self.ours and times is not None:
                seconds[(process.pid, created)] = times.user + times.system
        return seconds

    def used(self) -> float:
        after = self._sample()
        return round(sum(s - self.before.get(key, 0.0) for key, s in after.items()), 2)


def memory(processes: list) -> dict:
    """Summed RSS and PSS (bytes). PSS shares a page between the processes mapping it, which counts
    nginx's and Nchan's shared memory once instead of once per worker."""
    rss = pss = 0
    for process in processes:
        try:
            info = process.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except psutil.NoSuchProcess:
            pass
    return {"rss": rss, "pss": pss}


def process_names(server, processes: list) -> dict:
    """A short role per PID for the CPU table: supervisor, coordinator, node<id>; master, worker<n>; server."""
    if server.name == "meshgate":
        try:
            names = {node["pid"]: f"node{node['node_id']}" for node in server.nodes()}
        except OSError:
            names = {}
        for i, process in enumerate(processes):
            if process.pid not in names:
                names[process.pid] = "supervisor" if i == 0 else "coordinator"
        return names
    if server.name == "nchan":
        return {process.pid: "master" if i == 0 else f"worker{i}" for i, process in enumerate(processes)}
    return {process.pid: "server" for process in processes}


class Poster:
    """One keep-alive HTTP connection from the driver, for warm-ups and idle probes."""

    def __init__(self, publish):
        self.publish = publish
        self.conn = http.client.HTTPConnection(publish.endpoint.host, publish.endpoint.port, timeout=30)

    def post(self, data: bytes) -> tuple:
        if self.publish.style == "mesh.publish":
            data = b'{"c":"bench","d":"%s"}' % data
        self.conn.request("POST", self.publish.endpoint.path, body=data,
                          headers={"Content-Type": self.publish.content_type, "Accept": "application/json"})
        reply = self.conn.getresponse()
        return reply.status, reply.read()

    def close(self) -> None:
        self.conn.close()


def wait_subscribed(server, poster: Poster, count: int, size: int, timeout: float) -> int:
    """Publishes warm-up messages (kind "w", ignored by the receivers) until the server reports at least
    `count` subscribers: connected is not yet subscribed (meshgate's on_open runs after the upgrade;
    Nchan counts subscribers in shared memory). Returns how many warm-ups it took."""
    deadline = monotonic() + timeout
    for attempt in range(1, 100000):
        status, body = poster.post(payload("warm", attempt, size))
        seen = server.subscribers_in(body) if 200 <= status < 300 else -1
        if seen >= count:
            return attempt
        if monotonic() > deadline:
            raise BenchError(f"{server.label} reports {seen} of {count} subscribers after {timeout:.0f} s")
        time.sleep(0.1)
    return 0


def idle_probes(poster: Poster, receivers: Receivers, count: int, gap: float, size: int) -> dict:
    """Publishes `count` single messages, one at a time: from just before the POST to the arrival at the
    last subscriber (max over every receiver's arrival time), each after the previous one arrived
    everywhere and `gap` seconds of quiet."""
    samples, lost = [], 0
    for seq in range(count):
        started = monotonic()
        status, body = poster.post(payload("probe", seq, size))
        if not 200 <= status < 300:
            raise BenchError(f"idle probe {seq}: HTTP {status} {body[:200]!r}")
        replies = receivers.ask_all(20, "probe", seq, 10)
        reached = sum(r["reached"] for r in replies)
        lost += receivers.count - reached
        if reached == receivers.count:
            samples.append(max(r["last"] for r in replies) - started)
        time.sleep(gap)
    samples.sort()
    return {"samples_ms": [round(s * 1000, 3) for s in samples],
            "median_ms": round(statistics.median(samples) * 1000, 3) if samples else None,
            "p99_ms": round(samples[-1] * 1000, 3) if samples else None,   # of 20 samples p99 is the maximum
            "delivery_ratio": (count * receivers.count - lost) / (count * receivers.count)}


def publisher(publish, size: int, **options) -> Child:
    """The HTTP publisher: 4 keep-alive connections, each sending a request once the previous reply came."""
    child = Child("publish", publish.endpoint, style=publish.style, content_type=publish.content_type,
                  size=size, conns=4, **options)
    ready = child.reply(30)
    if not ready.get("ready"):
        raise BenchError(f"the publisher could not connect: {ready}")
    return child


def fanout(server, receivers: Receivers, messages: int, size: int) -> dict:
    """M publishes over the 4 publisher connections; the time until every subscriber has every message."""
    child = publisher(server.publish, size, count=messages, kind="fanout")
    try:
        procs = server.processes()
        loadgen = receivers.processes() + [p for p in [child.psutil()] if p]
        cpu_before, lg_before = cpu_seconds(procs), cpu_seconds(loadgen)
        others = OtherProcesses(procs + loadgen)
        child.send("go")
        sent = child.reply(timeout=300)
        got = receivers.wait("fanout", messages, timeout=max(60.0, receivers.count * messages / 5000), stall=15)
        cpu = cpu_used(cpu_before, cpu_seconds(procs))
        lg = cpu_used(lg_before, cpu_seconds(loadgen))
        background = others.used()
        late = {"received": 0, "last": 0.0}
        if got["received"] < got["expected"]:   # lost, or only very late? Wait once more to tell.
            late = receivers.wait_each("fanout", got["missing"], timeout=30, stall=30)
            print(f"  {server.label}: {got['expected'] - got['received']:,} deliveries missing after a "
                  f"15 s stall; {late['received']:,} of them arrived within 30 s more")
    finally:
        child.stop()
    if sent["failed"] or sent["requests"] != messages:
        raise BenchError(f"{server.label}: {sent['failed']} of {sent['requests']} publishes failed: {sent['errors']}")
    received = got["received"] + late["received"]
    elapsed = max(got["last"], late["last"]) - sent["start"] if received else float("nan")
    names = process_names(server, procs)
    return {"messages": messages, "deliveries": received, "expected": got["expected"],
            "delivery_ratio": received / got["expected"], "seconds": round(elapsed, 4),
            "deliveries_per_s": received / elapsed, "publish_seconds": round(sent["end"] - sent["start"], 4),
            "closed_by_server": got["closed"], "failures_reported_by_server": sent["reported_failed"],
            "late_deliveries": late["received"],
            "background_cpu_s": background,
            "cpu_s": {names.get(pid, str(pid)): s for pid, s in cpu.items()}, "cpu_total_s": round(sum(cpu.values()), 3),
            "loadgen_cpu_s": round(sum(lg.values()), 3)}


# --- rounds --------------------------------------------------------------------------------------------------


def receiver_processes(count: int, wanted: int) -> int:
    return max(1, min(wanted, count // 50))


def fanout_round(server, count: int, args) -> dict:
    """One fresh server, K subscribers: memory per idle connection, idle probes, the fan-out."""
    messages = max(10, round(args.deliveries / count))
    limit = single_process_limit(server)
    if limit and count > limit:
        note = (f"ran with {limit:,} subscribers: one process may not open more than "
                f"{hard_nofile():,} files here (RLIMIT_NOFILE)")
        print(f"  {server.label}: {note}")
        count = limit
    else:
        note = None
    server.start()
    try:
        receivers = Receivers(server.ws, count, receiver_processes(count, args.receivers), args.size,
                              args.connect_concurrency)
        poster = Poster(server.publish)
        try:
            idle = memory(server.processes())
            receivers.connect()
            warmups = wait_subscribed(server, poster, count, args.size, timeout=60 + count / 500)
            time.sleep(args.settle)
            loaded = memory(server.processes())
            probes = idle_probes(poster, receivers, args.probes, args.probe_gap, args.size)
            result = fanout(server, receivers, messages, args.size)
        finally:
            poster.close()
            receivers.stop()
        health = server_health(server)
    finally:
        server.stop(keep_log=log_path(args, server, count))
    health.update(declared_dead(server, log_path(args, server, count)))
    result.update({
        "subscribers": count, "note": note, "connect_seconds": receivers.connect_seconds, "warmups": warmups,
        "rss_before": idle["rss"], "rss_after": loaded["rss"], "pss_before": idle["pss"], "pss_after": loaded["pss"],
        "kib_per_connection_rss": (loaded["rss"] - idle["rss"]) / count / 1024,
        "kib_per_connection_pss": (loaded["pss"] - idle["pss"]) / count / 1024,
        "idle_fanout": probes, "server_health": health})
    return result


def log_path(args, server, count: int) -> Path:
    return Path(args.output).parent / "logs" / f"{server.name}-{count}.log"


def server_health(server) -> dict:
    """meshgate's own counters of trouble (slow clients closed, forward timeouts, queue drops)."""
    if server.name != "meshgate":
        return {}
    keys = ("slow_closed", "forward_timeouts", "queue_dropped", "hook_errors", "limit_closed")
    try:
        return {key: sum(node.get(key, 0) for node in server.nodes()) for key in keys}
    except OSError:
        return {}


def declared_dead(server, log: Path) -> dict:
    """How often meshgate's coordinator declared a live node dead (no heartbeat within node_timeout):
    a node whose event loop is held that long by fan-out work on a starved CPU is dropped from the
    routing tables until it registers again, and publishes meanwhile skip its subscribers."""
    if server.name != "meshgate":
        return {}
    try:
        return {"declared_dead": log.read_text(errors="replace").count("removed: no heartbeat")}
    except OSError:
        return {}


def publish_round(server, args) -> dict:
    """100 subscribers: publish requests/s over 4 connections, handshakes/s, and meshgate's API figures."""
    count = 100
    server.start()
    try:
        path = server.ws.path + ("?hello" if server.name == "meshgate" else "")
        endpoint = type(server.ws)(server.ws.host, server.ws.port, path)
        receivers = Receivers(endpoint, count, 2, args.size, args.connect_concurrency)
        poster = Poster(server.publish)
        try:
            receivers.connect()
            wait_subscribed(server, poster, count, args.size, timeout=30)
            result = {"publish": publish_rate(server, receivers, args)}
            result["handshakes"] = handshakes(server, args)
            if server.name == "meshgate":
                result.update(meshgate_api(server, receivers, args))
        finally:
            poster.close()
            receivers.stop()
        result["server_health"] = server_health(server)
    finally:
        server.stop(keep_log=log_path(args, server, count))
    result["server_health"].update(declared_dead(server, log_path(args, server, count)))
    return result


def publish_rate(server, receivers: Receivers, args) -> dict:
    child = publisher(server.publish, args.size, duration=args.duration, kind="fanout")
    try:
        procs = server.processes()
        cpu_before = cpu_seconds(procs)
        child.send("go")
        sent = child.reply(timeout=args.duration + 60)
        cpu = cpu_used(cpu_before, cpu_seconds(procs))
    finally:
        child.stop()
    got = receivers.wait("fanout", sent["requests"], timeout=60)
    return {"requests": sent["requests"], "failed": sent["failed"], "errors": sent["errors"],
            "seconds": round(sent["end"] - sent["start"], 4),
            "requests_per_s": sent["requests"] / (sent["end"] - sent["start"]),
            # A server that answers before it writes is still writing when the publisher stops: until the
            # last subscriber's last message, the same publishes make this rate (one clock: CLOCK_MONOTONIC).
            "delivered_per_s": sent["requests"] / (max(got["last"], sent["end"]) - sent["start"]),
            "last_delivery_after_s": round(max(got["last"] - sent["end"], 0.0), 4),
            "delivery_ratio": got["received"] / got["expected"] if got["expected"] else 0.0,
            "cpu_total_s": round(sum(cpu.values()), 3)}


def handshakes(server, args) -> dict:
    """Connect + upgrade + close, `--handshake-concurrency` connectors at once, a fixed count."""
    child = Child("handshake", server.ws, count=args.handshakes, concurrency=args.handshake_concurrency)
    try:
        child.reply(30)
        done = child.ask(120, "go")
    finally:
        child.stop()
    if done["failed"]:
        print(f"  {server.label}: {done['failed']} handshakes failed: {done['errors'][:2]}")
    return {"count": args.handshakes, "ok": done["ok"], "failed": done["failed"],
            "seconds": round(done["end"] - done["start"], 4), "per_s": done["ok"] / (done["end"] - done["start"])}


def meshgate_api(server, receivers: Receivers, args) -> dict:
    """meshgate only: pipelined /ws/v1 mesh.send (local, cross-node), HTTP mesh.send, queue events/s."""
    owners = {}   # client_id -> (node_id, receiver child holding it)
    for child, share in receivers.children:
        for client_id, node_id in child.ask(20, "ids", share)["ids"]:
            owners[client_id] = (node_id, child)
    if len({node for node, _ in owners.values()}) < 2:
        raise BenchError("every client landed on one node; no cross-node target")
    results = {}
    procs = server.processes()
    sender = Child("wssend", server.api, probe_topic=f"bench-probe-{uuid.uuid4().hex[:8]}", window=args.window)
    try:
        if not sender.reply(30).get("ready"):
            raise BenchError("the /ws/v1 sender could not consume its probe topic")
        api_node = node_of_consumer(server)
        for where, wanted in (("local", lambda node: node == api_node), ("cross_node", lambda node: node != api_node)):
            target = next(cid for cid, (node, _) in owners.items() if wanted(node))
            node, holder = owners[target]
            cpu_before = cpu_seconds(procs)
            done = sender.ask(args.duration * 20 + 60, "send", target, args.sends)
            got = holder.ask(40, "wait", "send", args.sends, 30, 5)
            cpu = sum(cpu_used(cpu_before, cpu_seconds(procs)).values())
            results[f"ws_send_{where}"] = {
                "api_node": api_node, "client_node": node, "requests": done["requests"], "ok": done["ok"],
                "failed": done["failed"], "errors": done["errors"], "seconds": round(done["end"] - done["start"], 4),
                "requests_per_s": done["ok"] / (done["end"] - done["start"]),
                "delivery_ratio": got["count"] / args.sends, **_cpu_per(cpu, done["ok"])}
    finally:
        sender.stop()
    target = next(iter(owners))
    node, holder = owners[target]
    child = publisher(server.send, args.size, duration=args.duration, kind="send", target=target,
                      ok_marker='"s":true')
    try:
        cpu_before = cpu_seconds(procs)
        sent = child.ask(args.duration + 60, "go")
    finally:
        child.stop()
    got = holder.ask(40, "wait", "send", sent["requests"], 30, 5)
    cpu = sum(cpu_used(cpu_before, cpu_seconds(procs)).values())
    results["http_send"] = {"requests": sent["requests"], "failed": sent["failed"], "errors": sent["errors"],
                            "seconds": round(sent["end"] - sent["start"], 4),
                            "requests_per_s": sent["requests"] / (sent["end"] - sent["start"]),
                            "delivery_ratio": got["count"] / sent["requests"], **_cpu_per(cpu, sent["requests"])}
    results["queue_events"] = queue_events(server, receivers, args)
    return results


def _cpu_per(cpu_s: float, count: int) -> dict:
    """The server's CPU seconds over a measurement, and per operation in µs: steadier than a rate on a
    shared machine (the rate also depends on how the work overlaps and on the load generator)."""
    return {"cpu_total_s": round(cpu_s, 3), "cpu_us_each": round(cpu_s * 1e6 / count, 1) if count else None}


def node_of_consumer(server, timeout: float = 10.0) -> int:
    """The node whose status shows the one consumer (the /ws/v1 sender's probe topic): the node that
    holds the API connection. Status comes with heartbeats, so it is polled, bounded."""
    deadline = monotonic() + timeout
    while monotonic() < deadline:
        holding = [node["node_id"] for node in server.nodes() if node.get("consumers")]
        if len(holding) == 1:
            return holding[0]
        time.sleep(0.1)
    raise BenchError("could not tell which node holds the /ws/v1 connection")


def queue_events(server, receivers: Receivers, args) -> dict:
    """Every subscriber sends N messages at once; one queue.pop consumer counts the events.

    `--queue-rounds` rounds, one consumer throughout: the rate reported is their median (one round of
    a second or so swung by half either way between runs of one commit), the CPU is of all of them.
    """
    consumer = Child("consume", server.api, topic="default")
    try:
        ready = consumer.reply(30)
        if not ready.get("ready"):
            raise BenchError(f"the queue consumer was refused: {ready}")
        total = receivers.count * args.queue_messages
        procs = server.processes()
        cpu_before = cpu_seconds(procs)
        rounds = []
        for _ in range(args.queue_rounds):
            started = min(r["start"] for r in receivers.ask_all(30, "send", args.queue_messages))
            got = consumer.ask(90, "wait", total, 60, 5)
            rounds.append((got["events"], max(got["last"] - started, 0.0)))
        cpu = sum(cpu_used(cpu_before, cpu_seconds(procs)).values())
    finally:
        consumer.stop()
    events = sum(count for count, _ in rounds)
    rates = [count / seconds if count and seconds else 0.0 for count, seconds in rounds]
    return {"events": events, "expected": total * len(rounds), "delivery_ratio": events / (total * len(rounds)),
            "seconds": round(sum(seconds for _, seconds in rounds), 4), "events_per_s": statistics.median(rates),
            "rounds_per_s": [round(rate) for rate in rates], **_cpu_per(cpu, events)}


# --- the run -----------------------------------------------------------------------------------------------------


def hard_nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def raise_nofile() -> int:
    """Soft open-file limit up to the hard one; the servers and load generators inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def single_process_limit(server) -> int:
    """The most subscribers a one-process server can hold under the open-file limit (0: no such limit)."""
    return hard_nofile() - 64 if server.name == "baseline" else 0


def machine() -> dict:
    def first(path: str, prefix: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "unknown"

    def run(*argv) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (done.stdout + done.stderr).strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    commit = run("git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD")
    if run("git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    memory_kib = first("/proc/meminfo", "MemTotal").split()[0]
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    import websockets
    return {
        "cpu": first("/proc/cpuinfo", "model name"), "cores": psutil.cpu_count(),
        "memory_gib": round(int(memory_kib) / 1024 / 1024, 1) if memory_kib.isdigit() else None,
        "kernel": platform.release(), "python": platform.python_version(),
        "nginx": run(nginx, "-v").replace("nginx version: ", "") if Path(nginx).exists() else "not installed",
        "nchan": run("dpkg-query", "-W", "-f=${Version}", "libnginx-mod-nchan") if not nchan_missing() else "not installed",
        "websockets": websockets.__version__, "meshgate_commit": commit, "nofile_limit": hard_nofile(),
    }


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, nargs="+", default=[1000, 5000, 20000],
                        help="subscriber counts K of the fan-out rounds")
    parser.add_argument("--servers", nargs="+", default=["meshgate", "nchan", "baseline"],
                        choices=["meshgate", "nchan", "baseline"])
    parser.add_argument("--workers", type=int, default=2, help="meshgate node processes")
    parser.add_argument("--node-timeout", type=float, default=3.0,
                        help="meshgate's coordinator.node_timeout (3 s, its default)")
    parser.add_argument("--deliveries", type=int, default=200_000,
                        help="fan-out messages per round M = this / K (at least 10)")
    parser.add_argument("--size", type=int, default=100, help="payload bytes of every message")
    parser.add_argument("--probes", type=int, default=20, help="idle single publishes per round")
    parser.add_argument("--probe-gap", type=float, default=0.05, help="quiet seconds between idle probes")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of the requests/s measurements")
    parser.add_argument("--receivers", type=int, default=4, help="receiver processes of a fan-out round")
    parser.add_argument("--connect-concurrency", type=int, default=16, help="connects in flight per receiver")
    parser.add_argument("--handshakes", type=int, default=3000)
    parser.add_argument("--handshake-concurrency", type=int, default=16)
    parser.add_argument("--sends", type=int, default=30000, help="pipelined /ws/v1 mesh.send requests")
    parser.add_argument("--window", type=int, default=1000, help="/ws/v1 requests in flight at most")
    parser.add_argument("--queue-messages", type=int, default=300, help="messages each of 100 clients sends")
    parser.add_argument("--queue-rounds", type=_at_least_one, default=3,
                        help="queue rounds; their median rate is reported")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between subscribing and measuring")
    parser.add_argument("--output", default=str(HERE / "results" / "latest.json"))
    return parser.parse_args()


def servers_to_run(args, skipped: dict) -> list:
    chosen = []
    for name in args.servers:
        if name == "nchan" and nchan_missing():
            skipped[name] = nchan_missing()
            print(f"Nchan skipped: {nchan_missing()}. The other servers still run.")
            continue
        chosen.append({"meshgate": lambda: Meshgate(args.workers, args.node_timeout), "nchan": Nchan,
                       "baseline": Baseline}[name]())
    return chosen


def main() -> int:
    args = parse_args()
    raise_nofile()

    def interrupted(signum, frame):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)   # even when started with SIGINT ignored (a background job)
    started = time.time()
    results = {"machine": machine(), "settings": vars(args), "servers": {}, "skipped": {}}
    print(report.header(results["machine"]))
    servers = servers_to_run(args, results["skipped"])
    for server in servers:
        results["servers"][server.name] = {"description": server.describe(), "fanout": {}}
    try:
        # Servers take turns at each size, so that a change in what else runs on the machine
        # spreads over all of them rather than over one.
        for count in args.subscribers:
            for server in servers:
                print(f"{server.label}: fan-out round, {count:,} subscribers", flush=True)
                results["servers"][server.name]["fanout"][str(count)] = guarded(
                    server, lambda: fanout_round(server, count, args))
        for server in servers:
            print(f"{server.label}: 100 subscribers, requests/s and handshakes", flush=True)
            results["servers"][server.name]["rounds_100"] = guarded(server, lambda: publish_round(server, args))
    except KeyboardInterrupt:
        print("interrupted; stopping every process this run started", file=sys.stderr)
        return 130
    finally:
        Child.stop_all()
    results["seconds"] = round(time.time() - started, 1)
    print(report.tables(results))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {output}; the run took {results['seconds']:.0f} s")
    return 0


def guarded(server, measure) -> dict:
    """Runs one round; a round that fails is reported as such and the run goes on with the next."""
    try:
        return measure()
    except (BenchError, RuntimeError, OSError, AssertionError) as error:
        print(f"  {server.label}: round failed: {error}", file=sys.stderr)
        tail = server.log_tail()
        if tail:
            print(f"  last lines of its log:\n{tail}", file=sys.stderr)
        return {"error": str(error)}
    finally:
        Child.stop_all()


if __name__ == "__main__":
    sys.exit(main())
