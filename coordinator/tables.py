"""The coordinator's routing tables: ownership, interest, consumers; versioned.

PURE: no I/O. Every accepted change becomes part of an update with the next
version; nodes apply updates in version order and ask for a snapshot when they
see a gap. Takes and makes cluster/mesh.py messages. Owned by the
coordinator's IOLoop.
"""

from cluster import mesh
from cluster.interest_table import InterestTable


class Tables:
    """Which node owns which client, and the interest table of every node, with a version."""

    def __init__(self):
        self.state = InterestTable()
        self.ownership = {}   # node_id -> set of client ids
        self.watched = {}     # node_id -> {client_id: lifecycle topic} (their close is pushed if the node dies)
        self.version = 0

    def apply_advert(self, origin: int, advert: mesh.Advert) -> tuple:
        """Applies a node's advert (its own changes); returns `(interest, consumers)` accepted, in wire form."""
        owned = self.ownership.setdefault(origin, set())
        owned.update(advert.opened)
        owned.difference_update(advert.closed)
        if advert.watched or origin in self.watched:
            watched = self.watched.setdefault(origin, {})
            watched.update((client_id, topic) for client_id, topic in advert.watched or ())
            for client_id in advert.closed:
                watched.pop(client_id, None)
        return self.state.apply([[origin, *item] for item in advert.interest],
                                [[origin, *item] for item in advert.consumers])

    def replace_node_state(self, origin: int, state: mesh.NodeState) -> tuple:
        """A node (re-)registered with its full state: forget what it said before, take this."""
        self.drop_node(origin)
        self.ownership[origin] = set(state.clients)
        return self.apply_advert(origin, mesh.Advert(state.interest, state.consumers, watched=state.watched))

    def drop_node(self, origin: int) -> list:
        """Forgets a node; returns `[client_id, topic]` of its watched clients (for their lost closes)."""
        self.ownership.pop(origin, None)
        self.state.drop_origin(origin)
        return [[client_id, topic] for client_id, topic in self.watched.pop(origin, {}).items()]

    def next_update(self, nodes=None, dead=(), interest=(), consumers=()) -> mesh.Update:
        """Wraps changes into the next versioned update (`nodes`: the whole new node list, if it changed)."""
        self.version += 1
        return mesh.Update(self.version, nodes, dead, interest, consumers)

    def snapshot(self, nodes: list) -> mesh.Snapshot:
        interest, consumers = self.state.dump()
        return mesh.Snapshot(self.version, nodes, interest, consumers)

    def counts(self) -> dict:
        return {
            "channels": len(self.state.interest),
            "topics_with_consumers": len(self.state.consumers),
            "owned_clients": sum(len(ids) for ids in self.ownership.values()),
        }
