"""The coordinator's routing tables: ownership, interest, consumers; versioned.

PURE: no I/O. Every accepted change becomes part of an update with the next
version; nodes apply updates in version order and ask for a snapshot when they
see a gap. Owned by the coordinator's IOLoop.
"""

from cluster.state import MeshState


class Tables:
    def __init__(self):
        self.state = MeshState()
        self.ownership = {}   # node_id -> set of client ids
        self.version = 0

    def apply_advert(self, origin: int, body: dict) -> tuple:
        """Applies a node's advert (its own changes); returns `(interest, consumers)` accepted, in wire form."""
        owned = self.ownership.setdefault(origin, set())
        owned.update(body.get("opened", ()))
        owned.difference_update(body.get("closed", ()))
        interest = [[origin, *item] for item in body.get("interest", ()) if len(item) == 3]
        consumers = [[origin, *item] for item in body.get("consumers", ()) if len(item) == 4]
        return self.state.apply(interest, consumers)

    def replace_node_state(self, origin: int, body: dict) -> tuple:
        """A node (re-)registered with its full state: forget what it said before, take this."""
        self.drop_node(origin)
        self.ownership[origin] = set(body.get("clients", ()))
        return self.apply_advert(origin, {"interest": body.get("interest", ()), "consumers": body.get("consumers", ())})

    def drop_node(self, origin: int) -> None:
        self.ownership.pop(origin, None)
        self.state.drop_origin(origin)

    def next_update(self, **parts) -> dict:
        """Wraps changes into the next versioned update."""
        self.version += 1
        return {"v": self.version, **{k: v for k, v in parts.items() if v}}

    def snapshot(self, nodes: list) -> dict:
        interest, consumers = self.state.dump()
        return {"v": self.version, "nodes": nodes, "interest": interest, "consumers": consumers}

    def counts(self) -> dict:
        return {
            "channels": len(self.state.interest),
            "topics_with_consumers": len(self.state.consumers),
            "owned_clients": sum(len(ids) for ids in self.ownership.values()),
        }
