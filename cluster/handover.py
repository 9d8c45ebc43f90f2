"""What a supervisor hands a node process it starts, and how the node takes it: both sides of one contract.

- **Listening sockets** (the API port and each client port). The supervisor binds them, one set
  per node worker, with SO_REUSEPORT and without listening; the node process listens on them
  once the coordinator gave it a node id, so no connection waits for a process that cannot name
  it. A replacement (a rolling restart, cluster/rolling.py) gets the sockets of the process it
  replaces: for a moment both hold the same sockets, then the old one stops accepting and what
  waits in their queues is taken by the new one. Closing a listening socket would reset the
  connections waiting in its queue instead (docs/operations.md, Rolling restart).
- **The mesh port index**: with a fixed `node.mesh.port` N, the processes of worker k alternate
  between N+k and N+workers+k, one generation after the other, so that a replacement can bind
  while the process it replaces still holds its port.
- **The readiness pipe** (replacements only): the node writes one line once it serves on the
  shared ports.

They travel in the environment (the names below, exchanged between the processes of one
version) and as inherited file descriptors. The node removes the variables from its
environment and makes the descriptors non-inheritable, so nothing an entry starts holds a
listening socket. The supervisor's side is owned by its one thread.
"""

import json
import logging
import os
import signal
import socket
from typing import NamedTuple, Optional

log = logging.getLogger("meshgate.supervisor")

LISTEN_ENV = "MESHGATE_LISTEN_FDS"     # JSON [[bind, port, [fd, ...]], ...]
MESH_INDEX_ENV = "MESHGATE_MESH_INDEX"   # k or workers+k: node.mesh.port + this, when the port is fixed
READY_ENV = "MESHGATE_READY_FD"        # write end of the readiness pipe
_BACKLOG = 128                         # as tornado.netutil.bind_sockets
DRAIN_SIGNAL = signal.SIGUSR1          # supervisor -> node: drain for a restart (1012), the replacement serves


def addresses(config) -> list:
    """`(bind, port)` of every shared listener of a node process: the API, then each client port.

    Port 0 is left out: every process takes a port of its own there, nothing is shared.
    """
    found = [(config.node.api.bind, config.node.api.port)]
    for server in config.node.servers:   # servers sharing a port share one bind (cluster/config.py)
        if not any(port == server.port for _, port in found):
            found.append((server.bind, server.port))
    return [(bind, port) for bind, port in found if port]


def bound_sockets(bind: str, port: int) -> list:
    """Sockets bound to every address `bind` names, with SO_REUSEPORT, not listening yet.

    Raises:
        OSError: one cannot be bound (none is left open).
    """
    sockets = []
    infos = socket.getaddrinfo(bind or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    try:
        for family, kind, proto, _, address in sorted(set(infos)):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Slot:
    """What the successive processes of one node worker share: its listening sockets and its mesh port index.

    Args:
        worker: k, the worker's index on this machine.
        workers: how many the machine runs.
        addresses: `addresses(config)`.
    """

    def __init__(self, worker: int, workers: int, addresses: list):
        self.worker, self.workers, self.addresses = worker, workers, addresses
        self.generation = 0     # one more each time a replacement takes over (its mesh port alternates)
        self.sockets = {}       # (bind, port) -> [socket]; bound when a process is about to start
        self.holders = []       # the processes given them

    def environment(self, generation: int = None, ready_fd: int = None) -> tuple:
        """`(environment, file descriptors)` for a process of this worker (`generation`: the current one)."""
        self.tend()
        if not self.sockets:
            self._bind()
        generation = self.generation if generation is None else generation
        env = {MESH_INDEX_ENV: str(self.worker + (generation % 2) * self.workers)}
        listen = [[bind, port, [sock.fileno() for sock in socks]] for (bind, port), socks in self.sockets.items()]
        fds = [fd for _, _, numbers in listen for fd in numbers]
        if listen:
            env[LISTEN_ENV] = json.dumps(listen)
        if ready_fd is not None:
            env[READY_ENV] = str(ready_fd)
            fds.append(ready_fd)
        return env, tuple(fds)

    def hold(self, process) -> None:
        """`process` (a Popen) was given this worker's sockets."""
        self.holders.append(process)

    def tend(self) -> None:
        """Closes the sockets once no process given them is alive: nobody would accept what they queue."""
        self.holders = [process for process in self.holders if process.poll() is None]
        if not self.holders:
            self.release()

    def release(self) -> None:
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        self.sockets = {}

    def _bind(self) -> None:
        for bind, port in self.addresses:
            try:
                self.sockets[(bind, port)] = bound_sockets(bind, port)
            except OSError as exc:   # the node process binds it itself, and says what is wrong
                log.debug("cannot bind %s:%d for node worker %d: %s", bind, port, self.worker, exc)


# --- the node process's side ---------------------------------------------------------


class Handed(NamedTuple):
    """What a node process was handed (`take`)."""
    sockets: dict               # (bind, port) -> [socket], not listening yet (or listening: a replacement's)
    mesh_index: Optional[int]   # None: the worker index
    ready_fd: Optional[int]     # None: nobody waits for the readiness line


def take() -> Handed:
    """Reads (and removes) what the supervisor handed this process; nothing when it was started otherwise."""
    sockets = {}
    for bind, port, fds in json.loads(os.environ.pop(LISTEN_ENV, "[]")):
        socks = sockets[(bind, port)] = []
        for fd in fds:
            sock = socket.socket(fileno=fd)
            sock.set_inheritable(False)
            sock.setblocking(False)
            socks.append(sock)
    index = os.environ.pop(MESH_INDEX_ENV, None)
    ready = os.environ.pop(READY_ENV, None)
    if ready is not None:
        os.set_inheritable(int(ready), False)
    return Handed(sockets, int(index) if index is not None else None, int(ready) if ready is not None else None)


def listening(handed: Handed, bind: str, port: int):
    """The sockets handed for `bind:port`, now listening; None when none were (the caller binds its own)."""
    socks = handed.sockets.pop((bind, port), None)
    if not socks:
        return None
    for sock in socks:
        sock.listen(_BACKLOG)
    return socks


def report_ready(handed: Handed, node_id: int) -> None:
    """Tells the supervisor this process serves on the shared ports (docs/operations.md, Rolling restart).

    Sockets handed over for an address this process does not serve are closed first: none stays
    open here without being accepted on.
    """
    for socks in handed.sockets.values():
        for sock in socks:
            sock.close()
    handed.sockets.clear()
    if handed.ready_fd is None:
        return
    try:
        os.write(handed.ready_fd, b"ready %d\n" % node_id)
    except OSError:   # the supervisor gave up waiting; it says so in its log
        pass
    finally:
        os.close(handed.ready_fd)
