"""This node's cached copy of the coordinator's tables: live nodes, interest, consumers.

PURE: applies updates and snapshots (cluster/mesh.py messages) and answers
lookups; no I/O. Owned by the node's IOLoop. Changes that arrive directly from
peers go through the same sequence-number rule as the coordinator's
(cluster/interest_table.py).
"""

from typing import NamedTuple

from cluster.interest_table import InterestTable

_SPREAD = 0x9E3779B97F4A7C15


class Changes(NamedTuple):
    """What a routing change means for the node: peers to link to, peers to drop, topics to drain."""
    added: set
    removed: set
    topics: set


NO_CHANGES = Changes(frozenset(), frozenset(), frozenset())


class Routing:
    """Which nodes are alive, which have subscribers of a channel, which consume a topic.

    The coordinator's versioned updates and snapshots keep it in step; a peer's
    own adverts reach it directly too (newest sequence number wins). Every
    method that changes it returns `Changes`, never acts on them itself.

    Args:
        node_id: this node's id (0 until the coordinator gave one; set it then).
    """

    def __init__(self, node_id: int = 0):
        self.node_id = node_id
        self.state = InterestTable()
        self.nodes = {}          # node_id -> mesh.NodeEntry (peers and self)
        self.version = 0
        self._sorted_consumers = {}
        # After a coordinator restart: peers not yet seen again, kept until this time.
        self._unconfirmed = set()
        self._merge_until = 0.0

    # --- updates -----------------------------------------------------------

    def load_snapshot(self, snapshot) -> Changes:
        """Replaces everything with a coordinator snapshot (`mesh.Snapshot`)."""
        before_topics = set(self.state.consumers)
        before_nodes = set(self.nodes)
        self.state = InterestTable()
        self.state.apply(snapshot.interest, snapshot.consumers)
        self.nodes = {info.node_id: info for info in snapshot.nodes}
        self.version = snapshot.v
        self._sorted_consumers.clear()
        self._unconfirmed = set()
        return Changes(set(self.nodes) - before_nodes, before_nodes - set(self.nodes),
                       before_topics | set(self.state.consumers))

    def _moved(self, fresh: dict) -> set:
        """Nodes of `fresh` that are new or have a new mesh point (links to open again)."""
        return {node_id for node_id, info in fresh.items()
                if node_id not in self.nodes or self.nodes[node_id].mesh_point != info.mesh_point}

    def merge_snapshot(self, snapshot, keep_until: float) -> Changes:
        """Takes a snapshot from a coordinator that just restarted, without forgetting anyone yet.

        The restarted coordinator knows only the nodes that have registered
        again so far. Their state replaces what was cached for them; peers
        it does not list yet keep their cached state until `keep_until`
        (monotonic seconds; `expire_unconfirmed` drops them after that)
        unless they reappear first.
        """
        fresh = {info.node_id: info for info in snapshot.nodes}
        added = self._moved(fresh)
        topics = set()
        for origin in fresh:
            if origin != self.node_id:
                topics |= self.state.drop_origin(origin)
        self._unconfirmed = (set(self.nodes) | self._unconfirmed) - set(fresh) - {self.node_id}
        self._merge_until = keep_until
        self.nodes.update(fresh)
        self.version = snapshot.v
        interest = [item for item in snapshot.interest if item[0] in fresh]
        consumers = [item for item in snapshot.consumers if item[0] in fresh]
        topics |= self.apply_changes(interest, consumers)
        self._sorted_consumers.clear()
        return Changes(added, set(), topics)

    def expire_unconfirmed(self, now: float) -> Changes:
        """Drops the peers a restarted coordinator never listed again."""
        if not self._unconfirmed or now < self._merge_until:
            return NO_CHANGES
        removed, self._unconfirmed = self._unconfirmed, set()
        topics = set()
        for node_id in removed:
            topics |= self.drop_node(node_id)
        return Changes(set(), removed, topics)

    def apply_update(self, update):
        """Applies one versioned coordinator update (`mesh.Update`).

        Returns:
            None when a version was skipped (the caller asks for a snapshot);
            otherwise `Changes`.
        """
        version = update.v
        if version <= self.version:
            return NO_CHANGES
        if version != self.version + 1:
            return None
        self.version = version
        added, removed, topics = set(), set(), set()
        for dead in update.dead:
            if dead in self.nodes:
                removed.add(dead)
            topics |= self.drop_node(dead)
        if update.nodes is not None:
            fresh = {info.node_id: info for info in update.nodes}
            added = self._moved(fresh)
            for moved in added & set(self.nodes):
                # Another process holds the id now (after a coordinator restart that never heard of the
                # old one's end): what the old one advertised, and its sequence numbers, are not the new one's.
                topics |= self.drop_node(moved)
            if self._unconfirmed:   # a restarted coordinator's list is partial: only add
                self._unconfirmed -= set(fresh)
                self.nodes.update(fresh)
            else:
                removed |= set(self.nodes) - set(fresh)
                for gone in removed:
                    topics |= self.drop_node(gone)
                self.nodes = fresh
        topics |= self.apply_changes(update.interest, update.consumers)
        return Changes(added, removed, topics)

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

    def pick_consumer(self, topic: str, client_id: int, reachable=None):
        """The consumer `(node_id, consumer_id)` for one client's messages on `topic`, or None.

        While the set of consumers does not change, one client always maps to
        the same consumer (docs/protocol.md, queue.pop: per-client order).
        With `reachable(node_id)`, a consumer on a peer it says no to is passed
        over for one of the others (while that peer's mesh link is down).
        """
        ordered = self._sorted_consumers.get(topic)
        if ordered is None:
            members = self.state.consumers.get(topic)
            if not members:
                return None
            ordered = self._sorted_consumers[topic] = sorted(members)
        spread = ((client_id * _SPREAD) & 0xFFFFFFFFFFFFFFFF) >> 32
        chosen = ordered[spread % len(ordered)]
        if reachable is None or chosen[0] == self.node_id or reachable(chosen[0]):
            return chosen
        others = [item for item in ordered if item[0] == self.node_id or reachable(item[0])]
        return others[spread % len(others)] if others else None
