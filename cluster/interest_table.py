"""The interest table: which nodes have subscribers of which channels, and consumers of which topics.

PURE: plain dictionaries; no I/O. The coordinator keeps the authoritative copy
(coordinator/tables.py) and every node caches one (node/routing.py).

Each node is the only author of its own entries. Every change it makes carries
a sequence number from that node's own counter, and a copy applies a change
only when its number is higher than the one it holds for that key. A change can
therefore reach a copy twice and in any order (directly from the origin and
relayed by the coordinator) and every copy still converges on the origin's
latest state. Entries of a dead node are dropped whole.

A key whose last change removed it (count 0, consumer gone) keeps its
sequence number as a tombstone for GRAVE_S seconds, long enough for any
delayed copy of an older change to arrive and be refused; then it is
forgotten, so channel and consumer churn does not grow the state forever.

Wire forms (exchanged between processes: append only):
    interest change:  [origin, channel, count, seq]     count 0 = no subscribers
    consumer change:  [origin, topic, consumer_id, present, seq]   present 0/1
"""


import time
from collections import deque

GRAVE_S = 60.0


class InterestTable:
    """Interest (channel -> nodes with subscribers) and consumers (topic -> consumers) of every node.

    Owned by one IOLoop (the coordinator's or a node's): not thread-safe.

    Args:
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._graves = deque()   # (time, kind, key, seq) of removals, oldest first
        # channel -> {origin: subscriber count > 0}
        self.interest = {}
        # topic -> {(origin, consumer_id): True}, insertion ordered
        self.consumers = {}
        # (origin, channel) -> seq ; (origin, topic, consumer_id) -> seq
        self._interest_seq = {}
        self._consumer_seq = {}

    def apply_interest(self, origin: int, channel: str, count: int, seq: int) -> bool:
        """Applies one interest change; returns True when it was newer than what is held."""
        key = (origin, channel)
        if self._interest_seq.get(key, -1) >= seq:
            return False
        self._interest_seq[key] = seq
        nodes = self.interest.get(channel)
        if count > 0:
            if nodes is None:
                nodes = self.interest[channel] = {}
            nodes[origin] = count
        else:
            self._graves.append((self._clock(), "i", key, seq))
            if nodes is not None:
                nodes.pop(origin, None)
                if not nodes:
                    del self.interest[channel]
        return True

    def apply_consumer(self, origin: int, topic: str, consumer_id: int, present: bool, seq: int) -> bool:
        """Applies one consumer change; returns True when it was newer than what is held."""
        key = (origin, topic, consumer_id)
        if self._consumer_seq.get(key, -1) >= seq:
            return False
        self._consumer_seq[key] = seq
        members = self.consumers.get(topic)
        if present:
            if members is None:
                members = self.consumers[topic] = {}
            members[(origin, consumer_id)] = True
        else:
            self._graves.append((self._clock(), "c", key, seq))
            if members is not None:
                members.pop((origin, consumer_id), None)
                if not members:
                    del self.consumers[topic]
        return True

    def apply(self, interest=(), consumers=()) -> tuple:
        """Applies wire-form changes; returns the ones that were accepted, in the same forms."""
        accepted_interest = [item for item in interest if self.apply_interest(*item)]
        accepted_consumers = [item for item in consumers if self.apply_consumer(*item)]
        self.bury()
        return accepted_interest, accepted_consumers

    def bury(self) -> int:
        """Forgets tombstones older than GRAVE_S whose key did not change since; returns how many."""
        graves = self._graves
        if not graves:
            return 0
        limit = self._clock() - GRAVE_S
        forgotten = 0
        while graves and graves[0][0] <= limit:
            _, kind, key, seq = graves.popleft()
            seqs = self._interest_seq if kind == "i" else self._consumer_seq
            if seqs.get(key) == seq:   # nothing happened to the key since this removal
                del seqs[key]
                forgotten += 1
        return forgotten

    def tracked_keys(self) -> int:
        """How many keys carry a sequence number (live ones and tombstones)."""
        return len(self._interest_seq) + len(self._consumer_seq)

    def drop_origin(self, origin: int) -> set:
        """Forgets everything node `origin` said; returns the topics whose consumers changed."""
        for channel in [c for c, nodes in self.interest.items() if origin in nodes]:
            nodes = self.interest[channel]
            del nodes[origin]
            if not nodes:
                del self.interest[channel]
        changed = set()
        for topic in list(self.consumers):
            members = self.consumers[topic]
            for key in [k for k in members if k[0] == origin]:
                del members[key]
                changed.add(topic)
            if not members:
                del self.consumers[topic]
        self._interest_seq = {k: v for k, v in self._interest_seq.items() if k[0] != origin}
        self._consumer_seq = {k: v for k, v in self._consumer_seq.items() if k[0] != origin}
        return changed

    def dump(self) -> tuple:
        """All live entries in wire form (for a snapshot)."""
        interest = [[origin, channel, count, self._interest_seq[(origin, channel)]]
                    for channel, nodes in self.interest.items() for origin, count in nodes.items()]
        consumers = [[origin, topic, consumer_id, 1, self._consumer_seq[(origin, topic, consumer_id)]]
                     for topic, members in self.consumers.items() for origin, consumer_id in members]
        return interest, consumers

    def interested_nodes(self, channel: str):
        """Nodes with subscribers of `channel` ({origin: count}, possibly empty)."""
        return self.interest.get(channel, {})

    def consumers_of(self, topic: str) -> list:
        """`(origin, consumer_id)` of every consumer of `topic`."""
        members = self.consumers.get(topic)
        return list(members) if members else []
