"""This node's cached copy of the coordinator's tables: live nodes, interest, consumers.

PURE: applies updates and snapshots (dicts) and answers lookups; no I/O.
Owned by the node's IOLoop. Changes that arrive directly from peers go through
the same sequence-number rule as the coordinator's (cluster/state.py).
"""

from cluster.state import MeshState

_SPREAD = 0x9E3779B97F4A7C15


class Routing:
    def __init__(self, node_id: int):
        self.node_id = node_id
        self.state = MeshState()
        self.nodes = {}          # node_id -> public node info (peers and self)
        self.version = 0
        self._sorted_consumers = {}
        # After a coordinator restart: peers not yet seen again, kept until this time.
        self._unconfirmed = set()
        self._merge_until = 0.0

    # --- updates -----------------------------------------------------------

    def load_snapshot(self, snapshot: dict) -> tuple:
        """Replaces everything with a coordinator snapshot.

        Returns:
            `(added_nodes, removed_nodes, topics)`: peers to connect, peers to
            drop, topics whose consumers may have changed.
        """
        before_topics = set(self.state.consumers)
        before_nodes = set(self.nodes)
        self.state = MeshState()
        self.state.apply(snapshot.get("interest", ()), snapshot.get("consumers", ()))
        self.nodes = {info["node_id"]: info for info in snapshot.get("nodes", ())}
        self.version = snapshot.get("v", 0)
        self._sorted_consumers.clear()
        self._unconfirmed = set()
        return (set(self.nodes) - before_nodes, before_nodes - set(self.nodes),
                before_topics | set(self.state.consumers))

    def merge_snapshot(self, snapshot: dict, keep_until: float) -> tuple:
        """Takes a snapshot from a coordinator that just restarted, without forgetting anyone yet.

        The restarted coordinator knows only the nodes that have registered
        again so far. Their state replaces what was cached for them; peers
        it does not list yet keep their cached state until `keep_until`
        (monotonic seconds; `expire_unconfirmed` drops them after that)
        unless they reappear first. Returns `(added, removed, topics)`.
        """
        fresh = {info["node_id"]: info for info in snapshot.get("nodes", ())}
        added = {node_id for node_id, info in fresh.items()
                 if self.nodes.get(node_id, {}).get("mesh_point") != info.get("mesh_point")}
        topics = set()
        for origin in fresh:
            if origin != self.node_id:
                topics |= self.state.drop_origin(origin)
        self._unconfirmed = (set(self.nodes) | self._unconfirmed) - set(fresh) - {self.node_id}
        self._merge_until = keep_until
        self.nodes.update(fresh)
        self.version = snapshot.get("v", 0)
        interest = [item for item in snapshot.get("interest", ()) if item[0] in fresh]
        consumers = [item for item in snapshot.get("consumers", ()) if item[0] in fresh]
        topics |= self.apply_changes(interest, consumers)
        self._sorted_consumers.clear()
        return added, set(), topics

    def expire_unconfirmed(self, now: float) -> tuple:
        """Drops the peers a restarted coordinator never listed again; returns `(added, removed, topics)`."""
        if not self._unconfirmed or now < self._merge_until:
            return set(), set(), set()
        removed, self._unconfirmed = self._unconfirmed, set()
        topics = set()
        for node_id in removed:
            topics |= self.drop_node(node_id)
        return set(), removed, topics

    def apply_update(self, update: dict):
        """Applies one versioned coordinator update.

        Returns:
            None when a version was skipped (the caller asks for a snapshot);
            otherwise `(added_nodes, removed_nodes, topics)` as `load_snapshot`.
        """
        version = update.get("v", 0)
        if version <= self.version:
            return set(), set(), set()
        if version != self.version + 1:
            return None
        self.version = version
        added, removed, topics = set(), set(), set()
        for dead in update.get("dead", ()):
            if dead in self.nodes:
                removed.add(dead)
            topics |= self.drop_node(dead)
        if "nodes" in update:
            fresh = {info["node_id"]: info for info in update["nodes"]}
            added = {node_id for node_id, info in fresh.items()
                     if self.nodes.get(node_id, {}).get("mesh_point") != info.get("mesh_point")}
            if self._unconfirmed:   # a restarted coordinator's list is partial: only add
                self._unconfirmed -= set(fresh)
                self.nodes.update(fresh)
            else:
                removed |= set(self.nodes) - set(fresh)
                for gone in removed:
                    topics |= self.drop_node(gone)
                self.nodes = fresh
        topics |= self.apply_changes(update.get("interest", ()), update.get("consumers", ()))
        return added, removed, topics

    def apply_changes(self, interest=(), consumers=()) -> set:
        """Applies wire-form changes (from the coordinator or a peer); returns topics whose consumers changed."""
        _, accepted = self.state.apply(interest, consumers)
        topics = {item[1] for item in accepted}
        for topic in topics:
            self._sorted_consumers.pop(topic, None)
        return topics

    def drop_node(self, node_id: int) -> set:
        """Forgets a dead node; returns topics whose consumers changed."""
        self.nodes.pop(node_id, None)
        self._unconfirmed.discard(node_id)
        topics = self.state.drop_origin(node_id)
        for topic in topics:
            self._sorted_consumers.pop(topic, None)
        return topics

    def forget_consumer(self, origin: int, topic: str, consumer_id: int) -> None:
        """Its node said this consumer is gone; stop choosing it before the advert arrives."""
        members = self.state.consumers.get(topic)
        if members and members.pop((origin, consumer_id), None):
            if not members:
                del self.state.consumers[topic]
            self._sorted_consumers.pop(topic, None)

    # --- lookups -----------------------------------------------------------

    def peer_ids(self) -> list:
        return [node_id for node_id in self.nodes if node_id != self.node_id]

    def interested_peers(self, channels: list) -> dict:
        """`{peer: [channels it has subscribers of]}` for a publish (never this node)."""
        peers = {}
        for channel in channels:
            for origin in self.state.interest.get(channel, ()):
                if origin != self.node_id:
                    peers.setdefault(origin, []).append(channel)
        return peers

    def interest_count(self, node_id: int, channels: list) -> int:
        return max((self.state.interest.get(c, {}).get(node_id, 0) for c in channels), default=0)

    def has_consumers(self, topic: str) -> bool:
        return topic in self.state.consumers

    def pick_consumer(self, topic: str, client_id: int):
        """The consumer `(node_id, consumer_id)` for one client's messages on `topic`, or None.

        While the set of consumers does not change, one client always maps to
        the same consumer (PROTOCOL.md, queue.pop: per-client order).
        """
        ordered = self._sorted_consumers.get(topic)
        if ordered is None:
            members = self.state.consumers.get(topic)
            if not members:
                return None
            ordered = self._sorted_consumers[topic] = sorted(members)
        return ordered[(((client_id * _SPREAD) & 0xFFFFFFFFFFFFFFFF) >> 32) % len(ordered)]
