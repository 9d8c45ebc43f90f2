"""The three servers of a run: how to start each, reach it, publish to it, and stop it.

Each class starts its server as real processes on free loopback ports and
knows: where subscribers connect (`ws`), where and how to publish over HTTP
(`publish`), how many subscribers a publish reply reports
(`subscribers_in`), and which processes are the server (`processes`, for
RSS and CPU). `stop()` ends only processes this run started, by PID, and is
safe to call twice or after a failed start. Servers run in sessions of their
own, so that a Ctrl-C in the terminal reaches run.py alone, which then stops
them in order (receivers first, then the server).
"""

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import Cluster, free_port  # noqa: E402

NGINX_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
START_TIMEOUT = 30.0


@dataclass
class Endpoint:
    host: str
    port: int
    path: str


@dataclass
class Publish:
    """How the HTTP publisher reaches a server: `style` is loadgen's body style."""
    endpoint: Endpoint
    style: str
    content_type: str


def _tree(pid: int) -> list:
    """The process `pid` and all its descendants (meshgate: supervisor, coordinator, nodes)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _end(process: subprocess.Popen, first=signal.SIGTERM, grace: float = 10.0) -> None:
    """Stops a process this run started: `first`, then SIGKILL after `grace` seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(first)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _keep(log: Path, where: Path) -> None:
    """Copies a server's log out of its temporary directory (bench/results/logs/), for whoever reads
    the results of a round that went wrong."""
    if where is None:
        return
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, where)
    except OSError:
        pass


def _wait_http(url: str, timeout: float, process: subprocess.Popen, what: str, data: bytes = None) -> bytes:
    """Polls `url` until it answers (any HTTP status), bounded; fails early if `process` exited."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=2) as reply:
                return reply.read()
        except urllib.error.HTTPError as error:
            return error.read()
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.05)


class Meshgate:
    """meshgate through its CLI (`meshgate start`, tests/conftest.py's Cluster), 2 node processes.

    The bench entry (bench/entry.py) subscribes every client to `bench` in
    `on_open`. `read_timeout` is raised from 60 s to 600 s: the receivers only
    listen, and a round of 20,000 of them may last longer than a minute.
    """

    name, label = "meshgate", "meshgate"

    def __init__(self, workers: int = 2, node_timeout: float = 3.0):
        self.workers = workers
        self.node_timeout = node_timeout
        self.cluster = None
        self.tmp = None
        self.last_log = ""

    def describe(self) -> str:
        return (f"meshgate, {self.workers} node processes (+ coordinator, supervisor), "
                f"node_timeout {self.node_timeout:g} s")

    def start(self) -> "Meshgate":
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-meshgate-"))
        self.cluster = Cluster(self.tmp, workers=self.workers, node_timeout=self.node_timeout,
                               server={"entry": str(HERE / "entry.py"), "read_timeout": 600})
        self.cluster.start_options = {"start_new_session": True}   # Ctrl-C reaches run.py only (it stops us)
        self.cluster.start()
        self.ws = Endpoint("127.0.0.1", self.cluster.client_port, "/")
        self.api = Endpoint("127.0.0.1", self.cluster.api_port, "/ws/v1")
        self.publish = Publish(Endpoint("127.0.0.1", self.cluster.api_port, "/v1/mesh/publish"),
                               "mesh.publish", "application/json")
        self.send = Publish(Endpoint("127.0.0.1", self.cluster.api_port, "/v1/mesh/send"),
                            "mesh.send", "application/json")
        return self

    @staticmethod
    def subscribers_in(body: bytes) -> int:
        return json.loads(body)["r"]["s"]

    def processes(self) -> list:
        return _tree(self.cluster.process.pid) if self.cluster and self.cluster.process else []

    def nodes(self) -> list:
        """Per node: node_id, pid, consumers (from the coordinator's /v1/status)."""
        return self.cluster.status()["nodes"]

    def log_tail(self) -> str:
        return self.cluster.logs()[-3000:] if self.cluster else self.last_log

    def stop(self, keep_log: Path = None) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.last_log = self.cluster.logs()[-3000:]
            _keep(self.cluster.log_path, keep_log)
            self.cluster = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


NGINX_CONF = """\
# Written by bench/servers.py for one round; everything it writes is in this directory.
daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile {nofile};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
load_module {module};

events {{
    worker_connections {connections};
    multi_accept on;
}}

http {{
    # meshgate and the baseline log nothing per request; neither does Nchan here.
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    # Shared memory for channels and messages; 20,000 subscribers and a few
    # thousand short-lived messages fit with room to spare.
    nchan_max_reserved_memory 256M;

    server {{
        # reuseport: the kernel spreads connections over both workers, as it
        # does over meshgate's node processes.
        listen 127.0.0.1:{port} reuseport backlog=4096;

        location = /pub {{
            nchan_publisher http;
            nchan_channel_id bench;
            # A fan-out server, not a message store: keep a few messages, briefly.
            nchan_message_buffer_length 16;
            nchan_message_timeout 60s;
        }}

        location = /sub {{
            nchan_subscriber websocket;
            nchan_channel_id bench;
            # A new subscriber waits for the next message (never replays the buffer).
            nchan_subscriber_first_message newest;
            nchan_subscriber_timeout 0;
        }}
    }}
}}
"""


def nchan_missing() -> str:
    """Why the Nchan round cannot run here, or '' when it can."""
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        return "nginx is not installed (Debian: nginx-light)"
    if not NGINX_MODULE.exists():
        return f"{NGINX_MODULE} is missing (Debian: libnginx-mod-nchan)"
    return ""


class Nchan:
    """Nchan on nginx, 2 worker processes, run in the foreground with a configuration of its own."""

    name, label = "nchan", "Nchan"

    def __init__(self):
        self.process = None
        self.tmp = None
        self.last_log = ""
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"

    def describe(self) -> str:
        return "Nchan on nginx, master + 2 worker processes"

    def start(self) -> "Nchan":
        import resource
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-nchan-"))
        port = free_port()
        nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 30000)
        (self.tmp / "nginx.conf").write_text(NGINX_CONF.format(
            tmp=self.tmp, port=port, module=NGINX_MODULE, nofile=nofile, connections=min(30000, nofile)))
        self.log = open(self.tmp / "stderr.log", "wb")
        self.process = subprocess.Popen(
            [self.binary, "-p", str(self.tmp), "-c", str(self.tmp / "nginx.conf"), "-e", str(self.tmp / "error.log")],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.ws = Endpoint("127.0.0.1", port, "/sub")
            self.publish = Publish(Endpoint("127.0.0.1", port, "/pub"), "raw", "text/plain")
            _wait_http(f"http://127.0.0.1:{port}/pub", START_TIMEOUT, self.process, "nginx")
            self._wait_workers()
            self.smoke_test()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_workers(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while len(self.processes()) < 3:
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not start its 2 workers")
            time.sleep(0.05)

    def smoke_test(self) -> None:
        """A POST must reach a WebSocket subscriber before anything is measured."""
        import websocket
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.ws.port}/sub", timeout=10)
        try:
            deadline = time.monotonic() + 10
            while True:   # the subscriber may take a moment to be counted by the channel
                body = _wait_http(f"http://127.0.0.1:{self.ws.port}/pub", 5, self.process, "nginx",
                                  data=b"smoke test")
                if self.subscribers_in(body) >= 1:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Nchan never counted the smoke-test subscriber: {body!r}")
                time.sleep(0.1)
            message = ws.recv()
            if message != "smoke test":
                raise RuntimeError(f"Nchan smoke test: the subscriber got {message!r}")
        finally:
            ws.close()

    @staticmethod
    def subscribers_in(body: bytes) -> int:
        text = body.decode("utf-8", "replace")
        if text.lstrip().startswith("{"):
            return int(json.loads(text)["subscribers"])
        for line in text.splitlines():   # text/plain reply: "active subscribers: N"
            if line.startswith("active subscribers:"):
                return int(line.split(":")[1])
        raise ValueError(f"no subscriber count in {text!r}")

    def processes(self) -> list:
        return _tree(self.process.pid) if self.process else []

    def log_tail(self) -> str:
        try:
            return (self.tmp / "error.log").read_text(errors="replace")[-3000:]
        except (OSError, TypeError):
            return self.last_log

    def stop(self, keep_log: Path = None) -> None:
        """SIGQUIT (graceful) to the master this run started, SIGTERM if it lingers, SIGKILL last;
        workers that outlive a killed master are ended by their PIDs."""
        if self.process is not None:
            workers = self.processes()[1:]
            _end(self.process, first=signal.SIGQUIT, grace=5)
            for worker in workers:
                try:
                    worker.wait(timeout=5)
                except psutil.TimeoutExpired:
                    worker.kill()
                except psutil.NoSuchProcess:
                    pass
            self.process = None
            self.log.close()
            self.last_log = self.log_tail()
            _keep(self.tmp / "error.log", keep_log)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


class Baseline:
    """bench/baseline_server.py: one process, `websockets`' broadcast, HTTP publish on a second port."""

    name, label = "baseline", "baseline"

    def __init__(self):
        self.process = None

    def describe(self) -> str:
        import websockets
        return f"hand-written websockets {websockets.__version__} broadcast server, 1 process"

    def start(self) -> "Baseline":
        ws_port, http_port = free_port(), free_port()
        self.process = subprocess.Popen([sys.executable, str(HERE / "baseline_server.py"), str(ws_port), str(http_port)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                        start_new_session=True)
        try:
            self.ws = Endpoint("127.0.0.1", ws_port, "/")
            self.publish = Publish(Endpoint("127.0.0.1", http_port, "/pub"), "raw", "text/plain")
            _wait_http(f"http://127.0.0.1:{http_port}/pub", START_TIMEOUT, self.process, "the baseline", data=b"w")
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def subscribers_in(body: bytes) -> int:
        return json.loads(body)["s"]

    def processes(self) -> list:
        return _tree(self.process.pid) if self.process else []

    def log_tail(self) -> str:
        return ""

    def stop(self, keep_log: Path = None) -> None:
        _end(self.process)
        self.process = None
