"""The supervisor: start the coordinator and node processes, restart, drain.

Children are fresh interpreters (`python -m cluster.cli ...`), each creating
its own IOLoop and zmq.Context, each handed the cluster key on its standard
input. A node that dies is started again after a
backoff (0.5 s doubling to 10 s, reset after 30 s of life). SIGTERM or SIGINT
stops the nodes first (they close clients 1001 and flush), then the coordinator,
under one deadline; whatever is still alive then is killed. SIGHUP is passed on
to every child, which reads the configuration file again. SIGUSR2 replaces the
node processes one at a time (cluster/rolling.py); the node workers' listening
sockets are bound here and handed to their processes (cluster/handover.py).
The supervisor's pid is in its pid file (cluster/pidfile.py) while it runs.

The moment a node process exits (the children are polled every 0.1 s), the
coordinator is told (`ExitNotices`, a `mesh.Exited` over a DEALER made with
the cluster key), so it drops that node at once instead of after
`coordinator.node_timeout` without a heartbeat.
"""

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import zmq

from cluster import handover, mesh, pidfile, rolling
from cluster.zloop import new_socket

log = logging.getLogger("meshgate.supervisor")

# Set in the environment of every child: it then ignores SIGINT (the supervisor
# orders the stop) and stops by itself when the supervisor is gone.
SUPERVISED_ENV = "MESHGATE_SUPERVISED"
# A child that exits with this code cannot run with this configuration: restarting it would not help.
CONFIG_EXIT = 2

_POLL_S = 0.1
_BACKOFF_START_S = 0.5
_BACKOFF_MAX_S = 10.0
_HEALTHY_AFTER_S = 30.0
_COORDINATOR_STOP_S = 3.0
_NOTICES_WAITING = 100        # exit notices queued while the coordinator is unreachable; more are dropped


class Child:
    """One supervised process and its restart state.

    Args:
        name: for logs.
        argv: its command line (never a secret).
        secret: a line written to its standard input at every start, then closed
            (the cluster key: never on a command line, in the environment or in a file).
    """

    def __init__(self, name: str, argv: list, secret: str):
        self.name = name
        self.argv = argv
        self.secret = secret
        self.process = None
        self.started = 0.0
        self.started_wall = 0.0   # time.time() just before the process started (mesh.Exited)
        self.backoff = _BACKOFF_START_S
        self.restart_at = 0.0
        self.first_only = []   # arguments for the first start only
        self.slot = None       # a node worker's handover.Slot: its listening sockets, its mesh port index

    def start(self) -> None:
        env, fds = self.slot.environment() if self.slot is not None else ({}, ())
        self.started_wall = time.time()
        self.process = self.spawn(env, fds)
        if self.slot is not None:
            self.slot.hold(self.process)
        self.started = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def spawn(self, env: dict, fds: tuple) -> subprocess.Popen:
        """A new process of this child, with `env` added to its environment and `fds` inherited."""
        argv = self.argv + self.first_only if self.process is None else self.argv
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, env={**os.environ, SUPERVISED_ENV: "1", **env},
                                   pass_fds=fds)
        try:
            process.stdin.write(self.secret.encode("ascii") + b"\n")
            process.stdin.close()
        except OSError:   # it died at once: the next check sees it
            pass
        return process

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                pass


def _cli(*args: str) -> list:
    return [sys.executable, "-m", "cluster.cli", *args]


class ExitNotices:
    """Tells the coordinator that a node process of this machine exited: one `mesh.Exited` each, no answer.

    The DEALER connects to the registry like the nodes' links, with the cluster
    key; while the coordinator is unreachable, notices wait in it (at most
    `_NOTICES_WAITING`) and are delivered when it is back. The coordinator
    checks each against its registrations (coordinator/registry.py, `exited`).

    Args:
        key: the ClusterKey.
        registry: the registry's address, HOST:PORT (`node.coordinator`).
    """

    def __init__(self, key, registry: str):
        self.host = socket.gethostname()   # what the node processes register as their host
        self._context = zmq.Context(io_threads=1)
        self._socket = new_socket(self._context, zmq.DEALER, _NOTICES_WAITING, key, 64 * 1024,
                                  f"supervisor-{self.host}-{os.getpid()}-{time.time_ns()}".encode())
        self._socket.connect(f"tcp://{registry}")

    def exited(self, child: Child, exited_at: float) -> None:
        notice = mesh.Exited(self.host, child.process.pid, child.started_wall, max(exited_at, child.started_wall),
                             child.process.returncode)
        try:
            self._socket.send_multipart(mesh.encode_control(notice), zmq.NOBLOCK)
        except zmq.ZMQError as exc:   # Again: too many wait for an unreachable coordinator
            log.warning("could not tell the coordinator that pid %d exited: %s", notice.pid, exc)

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()


class Supervisor:
    """Args:
        config_path: the YAML file the children read (None: defaults).
        workers: node processes to run (already resolved: >= 1).
        coordinator: also run the coordinator (False for `meshgate node`).
        key: the ClusterKey every child gets on its standard input.
        coordinator_address: the registry address the nodes use, if overridden.
        registry: the registry address (HOST:PORT) exit notices go to; None: none are sent.
        config: the loaded Config (listening addresses, `node.drain_timeout`, `node.pid_file`).
    """

    def __init__(self, config_path, workers: int, coordinator: bool, key, coordinator_address=None,
                 registry=None, *, config):
        common = ["-c", config_path, "--key-stdin"] if config_path else ["--key-stdin"]
        secret = key.line()
        self.children = []
        if coordinator:
            child = Child("coordinator", _cli("coordinator", *common), secret)
            child.first_only = ["--fresh"]
            self.children.append(child)
        extra = ["--coordinator", coordinator_address] if coordinator_address else []
        for worker in range(workers):
            self.children.append(Child(f"node worker {worker}",
                                       _cli("node-process", *common, "--worker", str(worker), *extra), secret))
        self._stopping = False
        self._reload = False
        self.exit_code = 0
        self._key, self._registry = key, registry
        self.notices = None       # ExitNotices, while running
        self._init_rolling(config, config_path, workers)

    def _init_rolling(self, config, config_path, workers: int) -> None:
        """Each node worker's slot (cluster/handover.py), the rolling restart, the pid file."""
        nodes = [child for child in self.children if child.name != "coordinator"]
        addresses = handover.addresses(config)
        for worker, child in enumerate(nodes):
            child.slot = handover.Slot(worker, workers, addresses)
        self.rolling = rolling.Rolling(nodes, config, config_path)
        self.pid_file = pidfile.path_for(config)
        self._restart = False

    def _on_signal(self, signum, frame) -> None:
        self._stopping = True

    def _on_hangup(self, signum, frame) -> None:
        self._reload = True

    def _on_restart(self, signum, frame) -> None:
        self._restart = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)
        if self._registry:
            self.notices = ExitNotices(self._key, self._registry)
        signal.signal(signal.SIGUSR2, self._on_restart)
        pidfile.write(self.pid_file)   # once SIGUSR2 has its handler
        for child in self.children:
            child.start()
        while not self._stopping:
            time.sleep(_POLL_S)
            if self._reload:   # each child reads the configuration file again (cluster/live.py)
                self._reload = False
                log.info("SIGHUP: passing it on to every process")
                for child in self.children:
                    child.signal(signal.SIGHUP)
            self._tend()
            self._check()
        self._join_leftovers()
        self.stop()
        if self.notices is not None:
            self.notices.close()
        pidfile.remove(self.pid_file)
        return self.exit_code

    def _tend(self) -> None:
        """The rolling restart (SIGUSR2), and the sockets of node workers whose process is gone."""
        if self._restart:
            self._restart = False
            self.rolling.request()
        for child in self.children:
            if child.slot is not None:
                child.slot.tend()
        self.rolling.tick()

    def _join_leftovers(self) -> None:
        """The processes of an unfinished rolling restart stop with the nodes."""
        for name, process in self.rolling.leftovers():
            child = Child(name, [], "")
            child.process = process
            self.children.append(child)

    def _check(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.alive() or self._stopping:
                continue
            if child.process.returncode == CONFIG_EXIT:
                log.error("%s refused to start (configuration, see above); stopping the cluster", child.name)
                self._stopping = True
                self.exit_code = CONFIG_EXIT
                return
            if child.restart_at == 0.0:
                if self.notices is not None and child.name != "coordinator":
                    self.notices.exited(child, time.time())
                lived = now - child.started
                if lived > _HEALTHY_AFTER_S:
                    child.backoff = _BACKOFF_START_S
                code = child.process.returncode if child.process else None
                child.restart_at = now + child.backoff
                log.warning("%s (pid %s) exited with %s; restarting in %.1f s",
                            child.name, child.process.pid if child.process else "-", code, child.backoff)
                child.backoff = min(child.backoff * 2, _BACKOFF_MAX_S)
            elif now >= child.restart_at:
                child.restart_at = 0.0
                child.start()

    def stop(self) -> None:
        log.info("stopping: nodes first, then the coordinator" if any(c.name == "coordinator" for c in self.children)
                 else "stopping the nodes")
        nodes = [c for c in self.children if c.name != "coordinator"]
        coordinators = [c for c in self.children if c.name == "coordinator"]
        for group, deadline in ((nodes, self.rolling.stop_s), (coordinators, _COORDINATOR_STOP_S)):
            for child in group:
                child.signal(signal.SIGTERM)
            end = time.monotonic() + deadline
            while time.monotonic() < end and any(c.alive() for c in group):
                time.sleep(0.05)
            for child in group:
                if child.alive():
                    log.warning("%s (pid %d) did not stop in time; killing it", child.name, child.process.pid)
                    child.signal(signal.SIGKILL)
                    child.process.wait()
        log.info("stopped")


def resolve_workers(configured: int) -> int:
    """0 means one node process per CPU core."""
    return configured or os.cpu_count() or 1


def watch_parent(on_gone, interval_s: float = 0.5):
    """Calls `on_gone()` once when this process's parent (the supervisor) has exited.

    Must be called on a running asyncio loop; returns the PeriodicCallback.
    """
    from tornado.ioloop import PeriodicCallback
    parent = os.getppid()

    def check():
        if os.getppid() != parent:
            log.warning("supervisor (pid %d) is gone; stopping", parent)
            callback.stop()
            on_gone()

    callback = PeriodicCallback(check, interval_s * 1000)
    callback.start()
    return callback
