"""System-test harness: real clusters started through the CLI on free ports, real clients.

`Cluster` writes a config, runs `meshgate start`, polls `/v1/status` until every
node is ready (no fixed sleeps), and stops the supervisor by PID; the
processes' log is attached to a failing test. Clients are plain WebSocket and
HTTP clients. `MESHGATE_TEST_SCALE` multiplies every wait (slow machines).
"""

import base64
import contextlib
import http.client
import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import websocket
import yaml

from cluster import cluster_key

SCALE = float(os.environ.get("MESHGATE_TEST_SCALE", "1"))
WAIT = 10.0 * SCALE          # the one timeout unit of the suite (seconds)
MESHGATE = str(Path(sys.executable).with_name("meshgate"))
_STARTED = []                # every Cluster started in this run, in order (their logs go with failures)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_GIVEN_PORTS = set()


def free_port(count: int = 1) -> int:
    """A port nothing listens on, below the kernel's ephemeral range, not handed out before in this run.

    Asking the kernel for port 0 could give the same port twice in a row (a
    cluster's registry and API ports were once equal), and a node's mesh
    point, bound to port 0, could take a port chosen for a server that has not
    bound it yet; neither can happen outside the ephemeral range. With
    `count`, the first of that many such ports in a row (a fixed
    `node.mesh.port` N: worker k listens on N+k).
    """
    low = min(15000, _EPHEMERAL_LOW - 1000)
    for _ in range(200):
        port = random.randrange(low, _EPHEMERAL_LOW - count + 1)
        ports = range(port, port + count)
        if _GIVEN_PORTS.intersection(ports) or not all(_unused(candidate) for candidate in ports):
            continue
        _GIVEN_PORTS.update(ports)
        return port
    raise AssertionError(f"no {count} free port(s) in a row found in {low}..{_EPHEMERAL_LOW - 1}")


def _unused(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop_process(process: subprocess.Popen, timeout: float = WAIT) -> int:
    """Stops a process the test started, by its PID: SIGTERM, then SIGKILL if it is still there after `timeout`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait_until(predicate, timeout: float = WAIT, interval: float = 0.02, what: str = "condition"):
    """Polls `predicate` until it returns a truthy value; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def names_field(message: str, field: str) -> bool:
    """True when `message` names `field` the way docs/protocol.md shows it (`p.c: ...`, `c: ...`, `p.a[0]: ...`)."""
    return re.search(rf"(?<![\w.]){re.escape(field)}[:\[]", message) is not None


def assert_error(reply, code: int, field: str = None, req_id=None, http_status: int = 400, mentions: str = None) -> str:
    """Checks an error envelope and returns its message.

    `reply` is a WebSocket API reply (`{"E": ..., "i": ...}`, whose `i` must be
    `req_id`) or an HTTP `(status, body)` pair (whose status must be
    `http_status`). `E.c` must be `code`; the message must name `field` the way
    docs/protocol.md shows it (`names_field`) and contain `mentions`, when given.
    """
    if isinstance(reply, tuple):
        status, body = reply
        assert status == http_status, reply
        assert isinstance(body, dict) and set(body) == {"E"}, reply
    else:
        body = reply
        assert isinstance(body, dict) and set(body) == {"E", "i"}, reply
        assert body["i"] == req_id, reply
    assert body["E"]["c"] == code, reply
    message = body["E"]["m"]
    if field is not None:
        assert names_field(message, field), reply
    if mentions is not None:
        assert mentions in message, reply
    return message


def make_certificate(directory: Path, name: str = "meshgate-test") -> tuple:
    """A self-signed certificate for 127.0.0.1 and localhost, made now; returns `(cert_path, key_path)`."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def dealer(context, address: str, key=None, receive_timeout: float = WAIT, own_key=None):
    """A ZeroMQ DEALER connected to `address`: with `key` (a ClusterKey) it speaks CURVE as the cluster's own
    processes do; with `own_key` too it knows the server's key but shows a key pair of its own (a stranger
    who learnt the public key); without either, it is a stranger's plain socket."""
    import zmq
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, int(receive_timeout * 1000))
    socket.setsockopt(zmq.SNDTIMEO, int(receive_timeout * 1000))   # a refused socket has nowhere to send
    if key is not None:
        own = own_key or key
        socket.curve_serverkey = key.public
        socket.curve_publickey, socket.curve_secretkey = own.public, own.secret
    socket.connect(address)
    return socket


def compact(value) -> str:
    """JSON as the server writes it: no spaces, UTF-8."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def raw_upgrade(port: int, path: str = "/") -> tuple:
    """A raw socket that did the WebSocket handshake by hand (to send frames no client library would).

    Returns `(socket, bytes that came after the 101 response)`.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, head.split(b"\r\n\r\n", 1)[1]


def raw_api(cluster) -> tuple:
    """`raw_upgrade` to the cluster's /ws/v1."""
    return raw_upgrade(cluster.api_port, "/ws/v1")


def loop_factory(name: str):
    """uvloop's `new_event_loop` for "uvloop" (the test is skipped where uvloop is not installed), else
    None: asyncio's own loop (asyncio.Runner's `loop_factory`)."""
    return pytest.importorskip("uvloop").new_event_loop if name == "uvloop" else None


class StreamConn:
    """What node/clients.py's write path reads of a connection: its stream (a real IOStream on a real socket)."""

    def __init__(self, stream):
        self.stream = stream
        self._closed_by_server = None
        self.node = None


def read_available(sock: socket.socket) -> bytes:
    """Everything a non-blocking socket holds now (until it would block, ends, or was reset)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except (BlockingIOError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def channel() -> str:
    """A channel name no other test uses."""
    return f"ch-{uuid.uuid4().hex[:10]}"


class Client:
    """A client WebSocket connection and what the mesh calls it."""

    def __init__(self, ws, client_id: str = "", node: int = 0):
        self.ws = ws
        self.client_id = client_id
        self.node = node
        self.close_reason = None   # the reason of the server's close frame, once `close_code` read it

    def recv(self, timeout: float = WAIT):
        self.ws.settimeout(timeout)
        return self.ws.recv()

    def recv_frame(self, timeout: float = WAIT):
        """Returns `(opcode, data)` of the next data frame."""
        self.ws.settimeout(timeout)
        opcode, data = self.ws.recv_data()
        return opcode, data

    def close_code(self, timeout: float = WAIT):
        """Reads until the server's close frame; returns its code (None if the connection just dropped).

        Data frames before it are skipped; the frame's reason is kept in `close_reason`.
        """
        self.ws.settimeout(timeout)
        try:
            while True:
                opcode, frame = self.ws.recv_data_frame(True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    data = frame.data
                    if len(data) < 2:
                        return None
                    self.close_reason = data[2:].decode("utf-8")
                    return int.from_bytes(data[:2], "big")
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return None

    def nothing_for(self, seconds: float) -> bool:
        """True when no message arrives within `seconds`."""
        self.ws.settimeout(seconds)
        try:
            self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return True
        return False


class ApiConnection:
    """A backend connection to `/ws/v1` with request/reply helpers."""

    def __init__(self, ws):
        self.ws = ws
        self._next = 0
        self.events = []
        self.replies = {}

    def send_raw(self, text: str) -> None:
        self.ws.send(text)

    def read(self, timeout: float = WAIT) -> dict:
        self.ws.settimeout(timeout)
        raw = self.ws.recv()
        return raw if raw == "pong" else json.loads(raw)

    def request(self, method: str, params=None, timeout: float = WAIT, **extra) -> dict:
        """Sends one request and returns its reply; events that arrive meanwhile are kept in `events`."""
        self._next += 1
        req_id = extra.pop("req_id", self._next)
        message = {"m": method, "i": req_id, **extra}
        if params is not None:
            message["p"] = params
        self.ws.send(json.dumps(message))
        return self.reply_to(req_id, timeout)

    def reply_to(self, req_id, timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while req_id not in self.replies:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no reply to request {req_id!r}")
            message = self.read(remaining)
            if isinstance(message, dict) and "e" in message:
                self.events.append(message)
            elif isinstance(message, dict):
                self.replies[message.get("i")] = message
        return self.replies.pop(req_id)

    def event(self, timeout: float = WAIT) -> dict:
        """The next queue event."""
        if self.events:
            return self.events.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no event arrived")
            message = self.read(remaining)
            if isinstance(message, dict) and "e" in message:
                return message
            self.replies[message.get("i")] = message

    def no_event_for(self, seconds: float) -> bool:
        try:
            self.event(seconds)
        except (AssertionError, websocket.WebSocketTimeoutException):
            return True
        return False


def stop_all(processes) -> None:
    """Stops processes a test started, by PID, the last started first (`stop_process` each)."""
    for process in reversed(processes):
        stop_process(process)


def live_api(cluster, attempts: int = 30):
    """An API connection to a live node process.

    The kernel may hand a new connection to the frozen process, whose handshake
    is never answered (several times in a row, now and then): such an attempt
    gives up after 0.25 s (later ones wait longer, up to 1 s, in case a live
    process is just slow) and another is made, bounded in count and time.
    """
    deadline = time.monotonic() + 2 * WAIT
    for attempt in range(attempts):
        conn = cluster.api_with_timeout(min(1.0, 0.25 * (1 + attempt // 5)))
        if conn is not None:
            return conn
        if time.monotonic() > deadline:
            break
    raise AssertionError("no live node process accepted an API connection")


class Cluster:
    """A meshgate cluster of this machine, started through `meshgate start`.

    Keyword overrides: `node_timeout`, `forward_timeout`, `drain_timeout`, `queue`; `mesh` and
    `api` (keys of node.mesh and node.api, e.g. `max_pending_bytes`,
    `max_in_flight`; the API keeps its generated bind and port); `server` (keys of
    the first node.servers entry) and `extra_servers` (more entries, on the
    client port unless they name one); `key_file=True` writes a cluster key
    file (`self.key`, `self.key_path`) instead of a fresh key per run;
    `access` (more keys of access, e.g. users) and `credentials` ((user, password) that
    `status`, `http` and `api` send); `tls=True` puts every listener on TLS with a
    certificate made for the run (`cert_path`), which the helpers trust.
    """

    host = "127.0.0.1"               # where the helpers reach the node processes' API and client ports
    coordinator_host = "127.0.0.1"   # and the coordinator HTTP

    def __init__(self, tmp: Path, workers: int = 3, **overrides):
        self.tmp = tmp
        self.workers = workers
        self.registry_port = free_port()
        self.coordinator_port = free_port()
        self.api_port = free_port()
        self.client_port = free_port()
        config = {
            "logging": {"level": "info"},
            "coordinator": {"registry": {"bind": "127.0.0.1", "port": self.registry_port},
                            "api": {"bind": "127.0.0.1", "port": self.coordinator_port},
                            "node_timeout": overrides.pop("node_timeout", 3)},
            "node": {"coordinator": f"127.0.0.1:{self.registry_port}", "workers": workers,
                     "forward_timeout": overrides.pop("forward_timeout", 2),
                     "api": {**overrides.pop("api", {}), "bind": "127.0.0.1", "port": self.api_port},
                     "queue": overrides.pop("queue", {"topic_size": 2000, "max_topics": 100}),
                     "servers": [{"port": self.client_port, "bind": "127.0.0.1", **server}
                                 for server in [overrides.pop("server", {}), *overrides.pop("extra_servers", [])]]},
        }
        if "mesh" in overrides:
            config["node"]["mesh"] = overrides.pop("mesh")
        if "drain_timeout" in overrides:
            config["node"]["drain_timeout"] = overrides.pop("drain_timeout")
        self.http_scheme, self.ws_scheme, self.ssl_context, self.sslopt = "http", "ws", None, None
        if overrides.pop("tls", False):   # every listener speaks TLS with a certificate made for this run
            self.cert_path, self.cert_key_path = make_certificate(tmp)
            settings = {"cert_file": str(self.cert_path), "key_file": str(self.cert_key_path)}
            config["coordinator"]["api"]["tls"] = config["node"]["api"]["tls"] = settings
            for server in config["node"]["servers"]:
                server["tls"] = settings
            self.http_scheme, self.ws_scheme = "https", "wss"
            self.ssl_context = ssl.create_default_context(cafile=str(self.cert_path))
            self.sslopt = {"context": self.ssl_context}
        config["access"] = overrides.pop("access", {})
        self.credentials = overrides.pop("credentials", None)   # (user, password) the helpers send
        self.key = self.key_path = None
        if overrides.pop("key_file", False):
            self.key_path = tmp / f"cluster-{uuid.uuid4().hex[:6]}.key"
            self.key = cluster_key.generate()
            cluster_key.write_file(str(self.key_path), self.key)
            config["access"]["cluster_key_file"] = str(self.key_path)
        if overrides:
            raise TypeError(f"unknown overrides {overrides}")
        self.config_path = tmp / f"meshgate-{uuid.uuid4().hex[:6]}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / f"{self.config_path.stem}.log"
        self.process = None
        self.start_options = {}    # extra subprocess.Popen arguments for `meshgate start`
        self.client_options = {}   # e.g. {"origin": ...} for every client connection
        self._open = []

    # --- life ----------------------------------------------------------------

    def start(self) -> "Cluster":
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([MESHGATE, "start", "-c", str(self.config_path)],
                                        stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        **self.start_options)
        _STARTED.append(self)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()   # a cluster that never became ready must not outlive the test
            raise
        return self

    def wait_ready(self, count: int = None) -> dict:
        count = self.workers if count is None else count

        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"meshgate exited with {self.process.returncode}:\n{self.logs()}")
            try:
                status = self.status()
            except (OSError, ValueError):
                return None
            return status if len(status["nodes"]) == count and self._api_answers() else None

        return wait_until(ready, what=f"{count} nodes ready")

    def _api_answers(self) -> bool:
        try:
            self.http("/v1/mesh/publish", {"c": "readiness-probe", "d": "x"})
            return True
        except OSError:
            return False

    def stop(self) -> int:
        for conn in self._open:
            try:
                conn.close()
            except Exception:
                pass
        self._open.clear()
        if self.process:
            stop_process(self.process, WAIT * 2)
        if getattr(self, "_log", None):
            self._log.close()
        return self.process.returncode if self.process else 0

    def restart(self) -> subprocess.CompletedProcess:
        """`meshgate restart` for this cluster's configuration (a rolling restart of its node processes)."""
        return subprocess.run([MESHGATE, "restart", "-c", str(self.config_path)], capture_output=True, text=True,
                              timeout=WAIT)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    # --- clients ---------------------------------------------------------------

    def auth(self, credentials=None) -> dict:
        """The Authorization header of `credentials` (user, password), or of the cluster's own `credentials`."""
        credentials = credentials or self.credentials
        if credentials is None:
            return {}
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def status(self) -> dict:
        url = f"{self.http_scheme}://{self.coordinator_host}:{self.coordinator_port}/v1/status"
        request = urllib.request.Request(url, headers=self.auth())
        with urllib.request.urlopen(request, timeout=3, context=self.ssl_context) as r:
            return json.loads(r.read())

    def http(self, path: str, body=None, method: str = "POST", raw: bytes = None, headers=None):
        """Returns `(status, decoded JSON body)`.

        A connection reset before any answer is retried once: a connection the
        kernel queued on a node process that was just killed is reset, and any
        HTTP client retries that.
        """
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        for attempt in (1, 2):
            request = urllib.request.Request(f"{self.http_scheme}://{self.host}:{self.api_port}{path}", data=data,
                                             method=method,
                                             headers={"Content-Type": "application/json", **self.auth(),
                                                      **(headers or {})})
            try:
                with urllib.request.urlopen(request, timeout=WAIT, context=self.ssl_context) as response:
                    return response.status, json.loads(response.read() or b"null")
            except urllib.error.HTTPError as error:
                payload = error.read()
                return error.code, json.loads(payload) if payload else None
            except (ConnectionResetError, http.client.RemoteDisconnected):
                if attempt == 2:
                    raise

    def api(self, credentials=None) -> ApiConnection:
        ws = websocket.create_connection(f"{self.ws_scheme}://{self.host}:{self.api_port}/ws/v1", timeout=WAIT,
                                         header=self.auth(credentials), sslopt=self.sslopt)
        self._open.append(ws)
        return ApiConnection(ws)

    def api_with_timeout(self, seconds: float):
        """An API connection, or None when the handshake is not answered within `seconds` (a frozen node)."""
        try:
            ws = websocket.create_connection(f"{self.ws_scheme}://{self.host}:{self.api_port}/ws/v1", timeout=seconds,
                                             header=self.auth(), sslopt=self.sslopt)
        except (websocket.WebSocketTimeoutException, TimeoutError, OSError):
            return None
        ws.settimeout(WAIT)
        self._open.append(ws)
        return ApiConnection(ws)

    def client(self, path: str = "/", **options) -> Client:
        ws = websocket.create_connection(f"{self.ws_scheme}://{self.host}:{self.client_port}{path}", timeout=WAIT,
                                         **{"sslopt": self.sslopt, **self.client_options, **options})
        self._open.append(ws)
        return Client(ws)

    def clients(self, count: int, topic: str = "default", nodes: int = 1) -> list:
        """Connects `count` clients and learns each one's client_id and node from a queue event.

        With `nodes` > 1 it connects more (bounded) until the clients are held
        by at least that many node processes: the kernel (SO_REUSEPORT), not
        meshgate, picks the process of each connection.
        """
        deadline = time.monotonic() + WAIT
        with self._node_learner(topic) as learn:
            clients = learn(self.client() for _ in range(count))
            for _ in range(20 * nodes):
                if len({client.node for client in clients}) >= nodes or time.monotonic() > deadline:
                    break
                clients += learn([self.client()])
            held = {client.node for client in clients}
            assert len(held) >= nodes, f"{len(clients)} clients landed on nodes {sorted(held)} only"
        return clients

    def client_on(self, node_ids, attempts: int = 100, topic: str = "default") -> Client:
        """A client held by one of the node processes `node_ids`.

        Connects one client at a time (closing those held elsewhere) until one
        lands there; bounded in count and time.
        """
        wanted = set(node_ids)
        deadline = time.monotonic() + WAIT
        with self._node_learner(topic) as learn:
            for attempt in range(1, attempts + 1):
                [client] = learn([self.client()])
                if client.node in wanted:
                    return client
                client.ws.close()
                if time.monotonic() > deadline:
                    break
        raise AssertionError(f"none of {attempt} clients landed on node(s) {sorted(wanted)}")

    @contextlib.contextmanager
    def _node_learner(self, topic: str):
        """Yields `learn(clients)`: each client sends a marker, and its queue event gives its client_id and node.

        The helper's consumer is gone from the tables when the block ends, so it
        leaves no trace for the test.
        """
        consumers_before = self.status()["coordinator"]["topics_with_consumers"]
        consumer = self.api()
        assert consumer.request("queue.pop", {"t": [topic]})["E"] is None

        def learn(clients) -> list:
            waiting = {}
            for client in clients:
                marker = f"hello-{uuid.uuid4().hex[:12]}"
                client.ws.send(marker)
                waiting[marker] = client
            learned = list(waiting.values())
            deadline = time.monotonic() + WAIT
            while waiting:
                event = consumer.event(max(deadline - time.monotonic(), 0.001))
                client = waiting.pop(event["p"]["d"]["frame"]["data"], None)
                if client is not None:   # anything else was buffered before this consumer came
                    client.client_id, client.node = event["p"]["c"], event["p"]["n"]
            return learned

        try:
            yield learn
        finally:
            consumer.ws.close()
        wait_until(lambda: self.status()["coordinator"]["topics_with_consumers"] <= consumers_before,
                   what="the helper's consumer to leave the tables")


@contextlib.contextmanager
def running(instance: Cluster):
    """Starts a Cluster for the `with` block and stops it however the block ends."""
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    """A 3-worker cluster shared by the tests of one module (more processes than cores is fine)."""
    params = getattr(request, "param", {}) or {}
    instance = Cluster(tmp_path_factory.mktemp("cluster"), **{"workers": 3, **params})
    try:
        instance.start()
    except Exception:
        instance.stop()
        raise
    yield instance
    instance.stop()


@pytest.fixture
def clients(cluster):
    """`clients(n)` connects n clients of `cluster` (ids and nodes known); all are closed after the test."""
    made = []

    def connect(count: int = 1):
        found = cluster.clients(count)
        made.extend(found)
        return found

    yield connect
    for client in made:
        client.ws.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    item.meshgate_started_from = len(_STARTED)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attaches the log of each cluster a failing test used: its fixtures' and those it (or its set-up) started."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed or call.when not in ("setup", "call"):
        return
    used = {}
    for name, value in getattr(item, "funcargs", {}).items():
        for candidate in (value if isinstance(value, tuple) else (value,)):
            if isinstance(candidate, Cluster):
                used.setdefault(id(candidate), (name, candidate))
    for instance in _STARTED[getattr(item, "meshgate_started_from", len(_STARTED)):]:
        used.setdefault(id(instance), ("started by the test", instance))
    for name, instance in used.values():
        report.sections.append((f"meshgate log ({name}: {instance.log_path.name})", instance.logs()[-8000:]))
