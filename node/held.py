"""Events this node holds for at-least-once consumers until they are acknowledged, and the flow to each.

PURE: dictionaries; the caller passes `now`. Owned by the node's IOLoop.
(docs/protocol.md, Queue acknowledgements.)

The node that received an event from its client (its origin) keeps it here
from the moment it hands it to an at-least-once consumer, anywhere in the
mesh, until that consumer's node says it was acknowledged (`take`) or
released (then it waits in node/queues.py again, one attempt higher). Held
events count against the topic's bounds (`Buffers.hold`). A consumer on
another node is `(node_id, consumer_id)`, a target; when its node neither
acknowledges nor releases an event well after the consumer's `ack_timeout`
(`expired`), or leaves the mesh (`on_nodes`), the event is taken back all
the same.

Flow: a target whose window was full (`block`) gets nothing more from this
node until its node says it has room (`room`) or a probe is due, and every
request still on its way to it has been answered (`answered`): only then
(`unblock`) does the next event go out marked `resume`, so that what the
target refused is delivered again before anything newer.
"""

from collections import OrderedDict


class HeldEvent:
    __slots__ = ("seq", "topic", "client_id", "event", "attempt", "target", "deadline")

    def __init__(self, seq: int, topic: str, client_id: int, event: bytes, attempt: int, target: tuple):
        self.seq, self.topic, self.client_id, self.event = seq, topic, client_id, event
        self.attempt = attempt
        self.target = target      # (node_id, consumer_id)
        self.deadline = None      # monotonic; set once a consumer on another node was written it

    def item(self, attempt: int) -> tuple:
        """What waits in node/queues.py to be delivered as `attempt`."""
        return (self.seq, self.client_id, self.event, attempt)


class _Block:
    __slots__ = ("topics", "due")

    def __init__(self):
        self.topics = set()   # topics whose events wait for the target
        self.due = False      # room was announced, or a probe is due


class Held:
    """Args:
        buffers: the node's node/queues.py Buffers (held events count against its bounds).
    """

    def __init__(self, buffers):
        self.buffers = buffers
        self.entries = {}     # seq -> HeldEvent
        self._written = {}    # target on another node -> OrderedDict of its written seqs, in deadline order
        self._sending = {}    # target -> its requests not answered yet
        self.blocked = {}     # target -> _Block
        self._resume = set()  # unblocked targets: their next event says so
        self._early = set()   # targets whose room was announced before the refusal's answer came

    def __len__(self) -> int:
        return len(self.entries)

    # --- events --------------------------------------------------------------------------

    def add(self, seq: int, topic: str, client_id: int, event: bytes, attempt: int, target: tuple) -> HeldEvent:
        entry = self.entries[seq] = HeldEvent(seq, topic, client_id, event, attempt, target)
        self.buffers.hold(topic, len(event))
        return entry

    def take(self, seq: int, entry: HeldEvent = None):
        """Stops holding one event (acknowledged, or to deliver again); returns it, or None when it is not held
        (or, with `entry`, no longer as that one)."""
        held = self.entries.get(seq)
        if held is None or (entry is not None and held is not entry):
            return None
        del self.entries[seq]
        written = self._written.get(held.target)
        if written is not None:
            written.pop(seq, None)
            if not written:
                del self._written[held.target]
        self.buffers.unhold(held.topic, len(held.event))
        return held

    def written(self, entry: HeldEvent, deadline: float) -> None:
        """A consumer on another node was written the event; taken back after `deadline` unless answered."""
        if self.entries.get(entry.seq) is entry:
            entry.deadline = deadline
            self._written.setdefault(entry.target, OrderedDict())[entry.seq] = None

    def expired(self, now: float) -> list:
        """Takes back the events whose consumers' nodes stayed silent past their deadline."""
        late = []
        for written in self._written.values():
            while written:
                seq = next(iter(written))
                if self.entries[seq].deadline > now:
                    break
                late.append(self.entries[seq])
                del written[seq]
        return self._taken(late)

    def on_nodes(self, alive) -> list:
        """Takes back the events written to consumers of nodes not in `alive` (they left the mesh)."""
        gone = [self.entries[seq] for target, written in self._written.items() if target[0] not in alive
                for seq in written]
        return self._taken(gone)

    def _taken(self, entries: list) -> list:
        for entry in entries:
            self.take(entry.seq)
        return entries

    # --- flow ----------------------------------------------------------------------------

    def sent(self, target: tuple) -> None:
        self._sending[target] = self._sending.get(target, 0) + 1

    def answered(self, target: tuple) -> bool:
        """A request to `target` was answered (after `block`, when it was refused); True when the target may
        be unblocked now."""
        left = self._sending[target] - 1
        if left:
            self._sending[target] = left
            return False
        del self._sending[target]
        self._early.discard(target)
        block = self.blocked.get(target)
        return block is not None and block.due

    def block(self, target: tuple, topic: str) -> bool:
        """The target's window is full; True when it was not blocked before (a probe is to be scheduled).

        Refusals of the events sent before it heard of the first keep what is due.
        """
        block = self.blocked.get(target)
        fresh = block is None
        if fresh:
            block = self.blocked[target] = _Block()
            block.due = target in self._early
            self._early.discard(target)
        block.topics.add(topic)
        return fresh

    def room(self, target: tuple, announced: bool = True) -> bool:
        """Its node says the target has room (`announced`), or a probe is due; True when it may be unblocked
        now.

        Room and refusals travel apart (a notice, and replies): room may come first.
        """
        block = self.blocked.get(target)
        if block is None:
            if announced and target in self._sending:
                self._early.add(target)
            return False
        block.due = True
        return target not in self._sending

    def unblock(self, target: tuple) -> set:
        """Lets events go to the target again; returns the topics that waited for it."""
        block = self.blocked.pop(target, None)
        if block is None:
            return set()
        self._resume.add(target)
        return block.topics

    def take_resume(self, target: tuple) -> bool:
        """True (once) for the first event to a target since it was unblocked."""
        if target in self._resume:
            self._resume.discard(target)
            return True
        return False
