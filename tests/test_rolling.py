"""Rolling restart (docs/operations.md, Rolling restart): `meshgate restart` under steady traffic, real processes."""

import http.client
import json
import os
import signal
import subprocess
import threading
import time

import psutil
import websocket
import yaml

from conftest import MESHGATE, SCALE, WAIT, Cluster, free_port, running, stop_process, wait_until

# Acknowledges what it pushed (a client sends its next message then); every connection joins one
# channel, for the backend's publishes.
_ENTRY = '''
from node.entry import queue

def on_open(conn):
    conn.subscribe("roll-news")

def on_message(conn, frame):
    queue.push(conn.topic, {"frame": frame})
    if frame["data"].startswith("m-"):
        conn.send("ack " + frame["data"])
'''
_TOPIC = "roll"
_CONSUMER_BACK_S = 0.3
_PER_WORKER_S = 5.0 * SCALE   # a replacement starts, registers, serves; the old process drains


def _rolling_cluster(tmp_path, workers: int, **overrides) -> Cluster:
    entry = tmp_path / "ack_entry.py"
    entry.write_text(_ENTRY)
    return Cluster(tmp_path, workers=workers, server={"entry": str(entry), "topic": _TOPIC}, **overrides)


def _pids(cluster) -> dict:
    return {n["node_id"]: n["pid"] for n in cluster.status()["nodes"]}


def _log(cluster) -> str:
    return cluster.log_path.read_text(errors="replace")


def _wait_restarted(cluster, before: dict, timeout: float) -> dict:
    """Waits for the end of a rolling restart: `workers` nodes, none of whose pids served before."""
    def replaced():
        if "rolling restart done" not in _log(cluster):
            return None
        now = _pids(cluster)
        return now if len(now) == cluster.workers and not set(now.values()) & set(before.values()) else None
    return wait_until(replaced, timeout=timeout, what="every node process replaced")


def _listening(pids, ports) -> set:
    """The listening sockets (their inodes) the processes `pids` hold on `ports`."""
    found = set()
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports:
                found.add(os.stat(f"/proc/{pid}/fd/{conn.fd}").st_ino)
    return found


def _close_code(frame) -> int:
    return int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None


class Traffic:
    """Clients, a consumer and a backend that keep working during a rolling restart, and what they saw."""

    def __init__(self, cluster, senders: int, connectors: int = 2, ack: bool = False):
        self.cluster = cluster
        self.ack = ack                   # the consumer is at least once: it acknowledges each event
        self.quiet = threading.Event()   # clients and backend stop; the consumer reads on
        self.stop = threading.Event()    # the consumer stops too
        self.lock = threading.Lock()
        self.problems = []           # anything a user would have noticed: a refusal, a lost message, ...
        self.sent = set()            # messages clients sent (each before its connection's close frame arrived)
        self.acked = set()           # those a node acknowledged
        self.consumed = set()        # messages the consumer received
        self.client_of = {}          # sender -> its current client_id (learnt from queue events)
        self.closes = {}             # who -> close codes the server sent it
        self.connects = 0            # new client connections made by the connecting loop
        self.requests = 0            # backend HTTP requests answered
        self.retries = 0             # backend requests sent again after a reset of a kept-alive connection
        self.threads = [threading.Thread(target=self._guard, args=(target, name), name=name, daemon=True)
                        for target, name in [(self._consume, "consumer"), (self._backend, "backend")]
                        + [(self._connect_loop, f"connector{index}") for index in range(connectors)]
                        + [(self._send_loop, f"s{index}") for index in range(senders)]]

    def __enter__(self) -> "Traffic":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.quiet.set()
        self.stop.set()
        for thread in self.threads:
            thread.join(WAIT)

    def settle(self) -> None:
        """Stops the clients and the backend; the consumer gets what they sent (or the test fails)."""
        self.quiet.set()
        for thread in self.threads:
            if thread.name != "consumer":
                thread.join(WAIT)
        try:
            wait_until(lambda: self.sent <= self.consumed, timeout=3, what="the consumer to get every message sent")
        except AssertionError:
            raise AssertionError(f"{sorted(self.sent - self.consumed)[:10]} missing; problems: {self.problems}")

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)

    def _guard(self, target, name: str) -> None:
        try:
            target(name)
        except Exception as exc:   # whatever it is, the test reports it
            self.problem(f"{name}: {type(exc).__name__}: {exc}")

    def _ws(self, path: str, name: str, what: str):
        """A new WebSocket connection: refused, reset or a failed upgrade is a problem (and None)."""
        url = f"ws://127.0.0.1:{self.cluster.api_port if path == '/ws/v1' else self.cluster.client_port}{path}"
        try:
            return websocket.create_connection(url, timeout=WAIT)
        except Exception as exc:
            self.problem(f"{name}: {what} failed: {type(exc).__name__}: {exc}")
            return None

    def _closed(self, name: str, frame) -> None:
        code = _close_code(frame)
        with self.lock:
            self.closes.setdefault(name, []).append(code)
        if code != 1012:
            self.problem(f"{name}: closed with {code}, not 1012")

    # --- the parts ------------------------------------------------------------------

    def _connect_loop(self, name: str) -> None:
        """New clients all along: each one connects, upgrades and leaves."""
        while not self.quiet.is_set():
            ws = self._ws("/", name, "a new client's connection")
            if ws is None:
                return
            with self.lock:
                self.connects += 1
            ws.shutdown()

    def _send_loop(self, name: str) -> None:
        """One client: sends numbered messages, the next once the last is acknowledged; closed 1012, it
        reconnects at once. A message sent before the close frame arrived is handled by the node that
        closes (docs/operations.md, Rolling restart), acknowledged or not: it is not sent again."""
        ws = self._ws("/", name, "first connection")
        number = 0
        while ws is not None and not self.quiet.is_set():
            message = f"m-{name}-{number}"
            number += 1
            ws.send(message)
            with self.lock:
                self.sent.add(message)
            while True:
                opcode, frame = ws.recv_data_frame(True)
                if opcode == websocket.ABNF.OPCODE_TEXT and frame.data.decode() == f"ack {message}":
                    with self.lock:
                        self.acked.add(message)
                    break
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    self._closed(name, frame)
                    ws.shutdown()
                    ws = self._ws("/", name, "reconnection after 1012")   # the first try must do
                    break
            time.sleep(0.005)
        if ws is not None:
            ws.close(timeout=1)

    def _consume(self, name: str) -> None:
        """The backend's consumer of the clients' topic; closed 1012, it reconnects and consumes again at once."""
        while not self.stop.is_set():
            ws = self._ws("/ws/v1", name, "consumer connection")
            if ws is None:
                return
            ws.send(json.dumps({"m": "queue.pop", "p": {"t": [_TOPIC], **({"ack": True} if self.ack else {})},
                                "i": 1}))
            ws.settimeout(0.5)
            while not self.stop.is_set():
                try:
                    opcode, frame = ws.recv_data_frame(True)
                except websocket.WebSocketTimeoutException:
                    continue
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    self._closed(name, frame)
                    ws.shutdown()
                    # A backend that takes a moment to come back: what waits for it on the draining
                    # node is handed on when it is back (node/drain.py).
                    time.sleep(_CONSUMER_BACK_S)
                    break
                if opcode != websocket.ABNF.OPCODE_TEXT:
                    continue
                message = json.loads(frame.data)
                if message.get("i") == 1 and message["E"] is not None:
                    self.problem(f"{name}: queue.pop refused: {message}")
                if message.get("e") == "queue.pop":
                    if self.ack:   # acknowledged once recorded below (the reply, i 2, is not waited for)
                        ws.send(json.dumps({"m": "queue.ack", "p": {"k": [message["p"]["k"]]}, "i": 2}))
                    data = message["p"]["d"]["frame"]["data"]
                    with self.lock:
                        self.consumed.add(data)
                        if data.startswith("m-"):
                            self.client_of[data.split("-")[1]] = message["p"]["c"]
            else:
                ws.close(timeout=1)

    def _backend(self, name: str) -> None:
        """Publishes and sends over HTTP on one kept-alive connection; a reset of it is retried once, counted."""
        connection = None
        number = 0
        while not self.quiet.is_set():
            number += 1
            with self.lock:
                targets = sorted(self.client_of.values())
            if number % 2 and targets:
                path, body = "/v1/mesh/send", {"c": targets[number % len(targets)], "d": f"b-{number}"}
            else:
                path, body = "/v1/mesh/publish", {"c": "roll-news", "d": f"b-{number}"}
            while True:
                kept = connection is not None   # only a kept-alive connection may have been closed under us
                if not kept:
                    connection = http.client.HTTPConnection("127.0.0.1", self.cluster.api_port, timeout=WAIT)
                try:
                    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    answer = json.loads(response.read())
                    break
                except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as exc:
                    connection.close()
                    connection = None
                    if not kept:
                        self.problem(f"{name}: {path} on a new connection: {type(exc).__name__}: {exc}")
                        return
                    self.retries += 1
            if response.will_close:   # the draining node said Connection: close
                connection.close()
                connection = None
            self.requests += 1
            error = answer.get("E")
            if response.status != 200 or (error is not None and not (path.endswith("send") and error["c"] == 401)):
                self.problem(f"{name}: {path} answered {response.status} {answer}")
            time.sleep(0.002)


def test_rolling_restart_under_traffic_refuses_nothing_and_loses_nothing(tmp_path):
    """Every node process replaced one at a time while clients connect, send and reconnect, and a backend works."""
    with running(_rolling_cluster(tmp_path, workers=3, drain_timeout=3)) as cluster:
        before = _pids(cluster)
        ports = {cluster.client_port, cluster.api_port}
        sockets = _listening(before.values(), ports)
        assert len(sockets) == 2 * cluster.workers, sockets
        with Traffic(cluster, senders=4) as traffic:
            wait_until(lambda: len(traffic.consumed) >= 20 and traffic.requests >= 20 and len(traffic.client_of) == 4,
                       what="traffic flowing")
            result = cluster.restart()
            assert result.returncode == 0, result.stderr
            started = time.monotonic()
            after = _wait_restarted(cluster, before, timeout=_PER_WORKER_S * cluster.workers)
            took = time.monotonic() - started
            acked_during = len(traffic.acked)
            wait_until(lambda: len(traffic.acked) > acked_during + 20, what="traffic after the restart")
            # No message a client sent is lost: each was pushed, and reaches the consumer.
            traffic.settle()
        assert not traffic.problems, traffic.problems
        # Every client was on a replaced process, so each was closed (1012) and reconnected at once.
        assert set(traffic.closes) == {"consumer", "s0", "s1", "s2", "s3"}, traffic.closes
        assert traffic.connects >= 20 and traffic.requests >= 100, (traffic.connects, traffic.requests)
        assert traffic.retries <= cluster.workers, traffic.retries   # at most once per drained node
        assert took < _PER_WORKER_S * cluster.workers, took
        assert len(after) == cluster.workers and not set(after) & set(before)
        # The new processes took over the very sockets (and what waited in them), not sockets of their own.
        assert _listening(after.values(), ports) == sockets
        # Everything works on the new processes.
        clients = cluster.clients(6, topic=_TOPIC, nodes=2)
        assert cluster.http("/v1/mesh/send", {"c": clients[0].client_id, "d": "after"})[1]["r"] == {"s": True}
        assert clients[0].recv() == "after"
        published = cluster.http("/v1/mesh/publish", {"c": "roll-news", "d": "news"})[1]["r"]
        assert published["s"] >= len(clients) and published["f"] == 0, published
        for client in clients:
            assert client.recv() == "news"
    assert cluster.process.returncode == 0   # SIGTERM after a rolling restart stops it as before


def test_an_at_least_once_consumer_loses_nothing_in_a_rolling_restart(tmp_path):
    """The consumer acknowledges each event: what the restarted processes held for it, or what it had not
    acknowledged when it was closed 1012, reaches it again; every message a client sent arrives."""
    with running(_rolling_cluster(tmp_path, workers=2, drain_timeout=3)) as cluster:
        before = _pids(cluster)
        with Traffic(cluster, senders=2, connectors=1, ack=True) as traffic:
            wait_until(lambda: len(traffic.consumed) >= 20 and len(traffic.client_of) == 2, what="traffic flowing")
            assert cluster.restart().returncode == 0
            _wait_restarted(cluster, before, timeout=_PER_WORKER_S * cluster.workers)
            acked_during = len(traffic.acked)
            wait_until(lambda: len(traffic.acked) > acked_during + 10, what="traffic after the restart")
            traffic.settle()
        assert not traffic.problems, traffic.problems
        assert "not acknowledged" not in _log(cluster)


def test_fixed_mesh_ports_alternate_between_two_ranges(tmp_path):
    """With node.mesh.port N, replacements bind N+workers+k, and the next rolling restart N+k again."""
    base = free_port(4)
    with running(Cluster(tmp_path, workers=2, mesh={"port": base}, drain_timeout=2)) as cluster:
        def mesh_ports() -> set:
            return {int(n["mesh_point"].rpartition(":")[2]) for n in cluster.status()["nodes"]}
        assert mesh_ports() == {base, base + 1}
        for expected in ({base + 2, base + 3}, {base, base + 1}):
            before = _pids(cluster)
            log_mark = _log(cluster).count("rolling restart done")
            assert cluster.restart().returncode == 0
            wait_until(lambda: _log(cluster).count("rolling restart done") > log_mark,
                       timeout=_PER_WORKER_S * cluster.workers, what="the rolling restart to end")
            assert not set(_pids(cluster).values()) & set(before.values())
            assert mesh_ports() == expected
        client = cluster.client_on(set(_pids(cluster)))
        assert cluster.http("/v1/mesh/send", {"c": client.client_id, "d": "x"})[1]["r"] == {"s": True}


def test_sigterm_during_a_rolling_restart_stops_every_process(tmp_path):
    """A second SIGUSR2 is ignored (and said so); SIGTERM in the middle stops old, new and replaced processes."""
    with running(Cluster(tmp_path, workers=2, drain_timeout=2)) as cluster:
        supervisor = psutil.Process(cluster.process.pid)
        assert cluster.restart().returncode == 0
        assert cluster.restart().returncode == 0
        wait_until(lambda: "this one is ignored" in _log(cluster), what="the second SIGUSR2 to be ignored")
        wait_until(lambda: "started the replacement of node worker 1" in _log(cluster),
                   timeout=_PER_WORKER_S * cluster.workers, what="the restart of the second worker")
        processes = supervisor.children()
        started = time.monotonic()
        assert stop_process(cluster.process) == 0
        assert time.monotonic() - started < 2 + 3 + 3 + WAIT / 10   # drain, the supervisor's margin, coordinator
        assert not [p for p in processes if p.is_running()], "a process outlived its supervisor's stop"
        assert "rolling restart done" not in _log(cluster)
        assert not (tmp_path / f"{cluster.config_path.stem}.pid").exists()


def test_a_replacement_that_cannot_start_stops_the_restart(tmp_path):
    """An entry broken since the start: the first replacement exits 2, the restart stops, the old processes serve."""
    cluster = _rolling_cluster(tmp_path, workers=2)
    with running(cluster):
        before = _pids(cluster)
        (tmp_path / "ack_entry.py").write_text("def on_message(conn, frame)\n")   # a syntax error
        assert cluster.restart().returncode == 0
        wait_until(lambda: "rolling restart stopped" in _log(cluster), timeout=_PER_WORKER_S,
                   what="the rolling restart to stop")
        assert "exited with 2 before it was ready" in _log(cluster)
        assert _pids(cluster) == before
        assert cluster.process.poll() is None   # the supervisor goes on: only the replacement could not start
        client = cluster.client_on(set(before), topic=_TOPIC)
        assert cluster.http("/v1/mesh/send", {"c": client.client_id, "d": "still"})[1]["r"] == {"s": True}
    assert cluster.process.returncode == 0


def test_restart_signals_only_a_supervisor_of_this_configuration(tmp_path):
    """No pid file, a pid file naming another process (alive or not), or one others may write: nothing is signalled."""
    config = tmp_path / "alone.yaml"
    config.write_text("node: {workers: 1}\n")
    pid_file = tmp_path / "alone.pid"

    def restart():
        return subprocess.run([MESHGATE, "restart", "-c", str(config)], capture_output=True, text=True, timeout=WAIT)
    result = restart()
    assert result.returncode == 1 and "no rolling restart" in result.stderr and "alone.pid" in result.stderr
    bystander = subprocess.Popen(["sleep", "30"])   # not a supervisor: SIGUSR2 would end it
    try:
        started = psutil.Process(bystander.pid).create_time()
        for content, mode, says in [(f"{bystander.pid} {started!r}\n", 0o644, "is not a meshgate supervisor"),
                                    (f"{bystander.pid} {started - 5!r}\n", 0o644, "is not running any more"),
                                    (f"{bystander.pid} {started!r}\n", 0o666, "others may write it"),
                                    ("nonsense\n", 0o644, "not a meshgate pid file")]:
            pid_file.write_text(content)
            pid_file.chmod(mode)
            result = restart()
            assert result.returncode == 1 and says in result.stderr, (says, result.stderr)
            assert bystander.poll() is None
    finally:
        stop_process(bystander)


def test_a_configuration_that_needs_a_full_restart_is_refused(tmp_path):
    """A file that does not load, or new listening ports, refuse the rolling restart: nothing is replaced."""
    with running(Cluster(tmp_path, workers=1)) as cluster:
        before = _pids(cluster)
        good = cluster.config_path.read_text()
        cluster.config_path.write_text("node: {workers: nope}\n")
        result = cluster.restart()   # the command reads the file first
        assert result.returncode == 2 and "node.workers: expected an integer" in result.stderr, result.stderr
        cluster.process.send_signal(signal.SIGUSR2)   # as `kill -USR2` would: the supervisor reads it too
        wait_until(lambda: "no rolling restart: the configuration does not load: node.workers" in _log(cluster),
                   what="the refusal of a file that does not load")
        changed = yaml.safe_load(good)
        changed["node"]["api"]["port"] = free_port()
        cluster.config_path.write_text(yaml.safe_dump(changed))
        assert cluster.restart().returncode == 0
        wait_until(lambda: "no rolling restart: the listening addresses" in _log(cluster),
                   what="the refusal of new listening ports")
        assert "rolling restart of" not in _log(cluster)
        assert _pids(cluster) == before
        cluster.config_path.write_text(good)
        assert cluster.restart().returncode == 0
        _wait_restarted(cluster, before, timeout=_PER_WORKER_S)
