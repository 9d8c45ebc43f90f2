"""Node ids, heartbeats and liveness.

PURE state: the caller passes `now` (monotonic seconds) and wall milliseconds;
no sockets, no timers. Owned by the coordinator's IOLoop.
"""

import hmac
from dataclasses import dataclass, field
from typing import Optional

from cluster import mesh
from cluster.ids import MAX_NODE_ID


_ID_MS_AHEAD = 60_000


class RegistryError(Exception):
    """A registration was refused; `retry` says whether the node should try again."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


@dataclass
class NodeInfo:
    node_id: int
    routing_id: bytes
    host: str
    pid: int
    api_server: str
    mesh_point: str
    started_at: float
    last_seen: float
    stats: dict = field(default_factory=dict)
    metrics: str = ""          # its latest metrics text (node/metrics.py), parsed when /metrics is read
    address: str = ""         # the network address it registered from (ZeroMQ's Peer-Address)

    def entry(self) -> mesh.NodeEntry:
        """What nodes learn of this node (also the `/v1/nodes` form: docs/protocol.md, Coordinator HTTP)."""
        return mesh.NodeEntry(self.node_id, self.host, self.pid, self.api_server, self.mesh_point,
                              int(self.stats.get("clients", 0)), self.started_at)

    def public(self) -> dict:
        return self.entry()._asdict()


class Registry:
    """Live nodes by id, and which routing id holds each.

    Args:
        grace_until: monotonic time before which fresh nodes (asking no id) are
            told to retry, so nodes of the previous coordinator run reclaim their ids first.
        lease_of: `(node_id, routing_id) -> lease`; with it, a node asking for an id it
            does not hold right now must show that id's lease for its routing id (so
            after a coordinator restart an id goes back only to the process that held it).
    """

    def __init__(self, grace_until: float = 0.0, lease_of=None):
        self._lease_of = lease_of
        self.nodes = {}
        self._by_routing = {}
        self._released_ms = {}   # node_id -> last wall ms its previous holder may have used
        self._next_id = 1
        self._grace_until = grace_until

    def register(self, routing_id: bytes, info: mesh.Register, now: float, wall_ms: int,
                 address: str = "") -> tuple:
        """Adds a node; returns `(node_id, not_before_ms)`.

        `address` is where the registration came from (an exit notice about
        this node must come from there too: `exited`).

        `info.node_id` > 0 asks to keep that id (a node re-registering after
        a coordinator restart or after it was wrongly declared dead). A repeated
        registration from the same routing id gets the same id again.

        Raises:
            RegistryError: the id is held by another live node, or no id is free.
        """
        if not mesh.is_mesh_point(info.mesh_point):
            raise RegistryError(f"mesh point {info.mesh_point!r} is not tcp://HOST:PORT (check node.advertise)",
                                retry=False)
        wanted = info.node_id or self._by_routing.get(routing_id, 0)
        if isinstance(wanted, bool) or not isinstance(wanted, int) or not 0 <= wanted <= MAX_NODE_ID:
            raise RegistryError(f"node id {wanted!r} is not in 1..{MAX_NODE_ID}", retry=False)
        if wanted:
            holder = self.nodes.get(wanted)
            if holder is not None and holder.routing_id != routing_id:
                raise RegistryError(f"node id {wanted} is held by pid {holder.pid} on {holder.host}", retry=False)
            if holder is None and info.node_id and self._lease_of is not None and not hmac.compare_digest(
                    info.lease or "", self._lease_of(wanted, routing_id)):
                raise RegistryError(f"node id {wanted} was not given to this process (no valid lease)", retry=False)
            node_id = wanted
        else:
            if now < self._grace_until:
                raise RegistryError("coordinator is starting; retry", retry=True)
            node_id = self._free_id()
        previous = self.nodes.get(node_id)
        if previous is not None:
            self._by_routing.pop(previous.routing_id, None)
        self.nodes[node_id] = NodeInfo(
            node_id=node_id, routing_id=routing_id, host=info.host, pid=info.pid, api_server=info.api_server,
            mesh_point=info.mesh_point, started_at=float(info.started_at), last_seen=now, address=address,
        )
        self._by_routing[routing_id] = node_id
        return node_id, max(self._released_ms.pop(node_id, 0), 0)

    def _free_id(self) -> int:
        for offset in range(MAX_NODE_ID):
            candidate = (self._next_id - 1 + offset) % MAX_NODE_ID + 1
            if candidate not in self.nodes:
                self._next_id = candidate % MAX_NODE_ID + 1
                return candidate
        raise RegistryError(f"all {MAX_NODE_ID} node ids are in use", retry=True)

    def node_for(self, routing_id: bytes) -> Optional[int]:
        return self._by_routing.get(routing_id)

    def heartbeat(self, routing_id: bytes, node_id: int, stats: dict, now: float) -> bool:
        """Records a heartbeat; returns False when the sender is not the registered holder of `node_id`.

        `stats` was checked by cluster/mesh.py (names and finite numbers only).
        """
        info = self.nodes.get(node_id)
        if info is None or info.routing_id != routing_id:
            return False
        info.last_seen = now
        info.stats = stats
        return True

    def metrics(self, routing_id: bytes, node_id: int, text: str) -> bool:
        """Keeps a node's latest metrics; False when the sender is not the registered holder of `node_id`."""
        info = self.nodes.get(node_id)
        if info is None or info.routing_id != routing_id:
            return False
        info.metrics = text
        return True

    def remove(self, node_id: int, wall_ms: int) -> Optional[NodeInfo]:
        """Forgets a node; its id may be given out again, with ids made after `wall_ms` only."""
        info = self.nodes.pop(node_id, None)
        if info is None:
            return None
        self._by_routing.pop(info.routing_id, None)
        # A node's ids may run a little ahead of the clock (a busy millisecond borrows the next); a
        # figure far ahead is not believed, so a later holder of the id is not pushed out of the id space.
        self._released_ms[node_id] = max(wall_ms, min(int(info.stats.get("id_ms", 0)), wall_ms + _ID_MS_AHEAD))
        return info

    def exited(self, notice: mesh.Exited, address: str) -> Optional[int]:
        """The node whose process a supervisor saw exit (`mesh.Exited`), or None when no live node is that process.

        It must be registered with the notice's host and pid, from `address`
        (the notice's sender: the supervisor runs on the node's machine), and
        have started while the supervisor's process ran: a node that started
        after the exit holds a pid used again, and is alive.
        """
        for node_id, info in self.nodes.items():
            if (info.pid == notice.pid and info.host == notice.host and info.address == address
                    and notice.started_at <= info.started_at <= notice.exited_at):
                return node_id
        return None

    def expired(self, now: float, timeout: float) -> list:
        """Ids of nodes whose last heartbeat is older than `timeout` seconds."""
        return [node_id for node_id, info in self.nodes.items() if now - info.last_seen > timeout]

    def entries(self) -> list:
        """`mesh.NodeEntry` of every live node, by id."""
        return [info.entry() for _, info in sorted(self.nodes.items())]

    def public_list(self) -> list:
        """The `/v1/nodes` list."""
        return [entry._asdict() for entry in self.entries()]
