"""Tests of node/acks.py (a node's at-least-once consumers) and node/held.py (what an origin holds for them)."""

import pytest

from node.acks import AckTable, Delivery, SettingsDiffer
from node.held import Held
from node.queues import Buffers

CONSUMER = (1 << 62) | 7
ORIGIN, OTHER = 3, 4


def table(window: int = 3, ack_timeout: float = 10.0) -> AckTable:
    made = AckTable(100, 30.0)
    made.open(CONSUMER, window, ack_timeout)
    return made


def deliver(acks: AckTable, count: int, origin: int = ORIGIN, now: float = 0.0, topic: str = "t") -> list:
    ids = []
    for seq in range(1, count + 1):
        assert acks.admit(CONSUMER, origin, False)
        ids.append(acks.add(CONSUMER, origin, seq, 1, topic, now))
    return ids


# --- AckTable ------------------------------------------------------------------------------

def test_defaults_and_settings():
    """A consumer takes the defaults for what it does not say; a later pop may repeat or omit them only."""
    acks = AckTable(100, 30.0)
    acks.open(CONSUMER)
    acks.check(CONSUMER, None, None)
    acks.check(CONSUMER, 100, 30.0)
    with pytest.raises(SettingsDiffer) as info:
        acks.check(CONSUMER, 99, None)
    assert info.value.field == "window" and "100" in info.value.message
    with pytest.raises(SettingsDiffer) as info:
        acks.check(CONSUMER, None, 31)
    assert info.value.field == "ack_timeout" and "30" in info.value.message
    acks.check(CONSUMER + 1, 5, 5)   # another consumer: anything goes
    acks.open(CONSUMER, 5, 5)        # an existing consumer keeps what it has
    assert acks.ack_timeout(CONSUMER) == 30.0


def test_ids_are_unique_strings_and_acks_count_once():
    """Each delivery has its own id (a string); acking counts only what was outstanding, once."""
    acks = table(window=5)
    ids = deliver(acks, 5)
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == 5
    assert acks.unacked == 5
    done = acks.ack(CONSUMER, [ids[0], ids[0], "nope", ids[2]])
    assert [d.seq for d in done] == [1, 3]
    assert acks.ack(CONSUMER, [ids[0], ids[2]]) == []
    assert acks.unacked == 3 and acks.outstanding(CONSUMER) == 3


def test_ids_are_scoped_to_their_consumer():
    """One consumer's ids mean nothing to another (or to a consumer that does not exist)."""
    acks = table()
    acks.open(CONSUMER + 1, 3, 10)
    [mine] = deliver(acks, 1)
    assert acks.ack(CONSUMER + 1, [mine]) == []
    assert acks.ack(CONSUMER + 2, [mine]) == []
    assert [d.seq for d in acks.ack(CONSUMER, [mine])] == [1]


def test_window_refuses_until_the_origin_resumes():
    """Past the window an origin is refused; after room it is still refused until it resumes, so that what it
    sent before hearing of the refusal cannot overtake the first refused event."""
    acks = table(window=2)
    ids = deliver(acks, 2)
    assert not acks.admit(CONSUMER, ORIGIN, False)
    assert acks.rooms(CONSUMER) == [], "no room yet"
    acks.ack(CONSUMER, ids[:1])
    assert not acks.admit(CONSUMER, ORIGIN, False), "its older events are refused even with room"
    assert acks.admit(CONSUMER, OTHER, False), "an origin never refused is not"
    acks.add(CONSUMER, OTHER, 1, 1, "t", 0)
    assert acks.rooms(CONSUMER) == [], "full again"
    acks.ack(CONSUMER, ids[1:])
    assert acks.rooms(CONSUMER) == [ORIGIN]
    assert acks.rooms(CONSUMER) == [], "told once"
    assert acks.admit(CONSUMER, ORIGIN, True)
    acks.add(CONSUMER, ORIGIN, 9, 1, "t", 0)
    assert not acks.admit(CONSUMER, ORIGIN, True), "a resumed origin that finds it full is refused again"
    acks.ack(CONSUMER, [])
    assert acks.rooms(CONSUMER) == []


@pytest.mark.parametrize("window", [1, 3, 10])
def test_never_more_than_window_outstanding(window):
    """However many origins offer events, at most `window` are outstanding."""
    acks = table(window=window)
    taken = 0
    for seq in range(50):
        origin = seq % 3
        if acks.admit(CONSUMER, origin, True):
            acks.add(CONSUMER, origin, seq, 1, "t", 0)
            taken += 1
    assert taken == window == acks.outstanding(CONSUMER)


def test_deadlines_release_in_write_order():
    """Deliveries past their deadline (written + ack_timeout) are taken back, the oldest first; acked ones never."""
    acks = table(window=10, ack_timeout=5)
    first = deliver(acks, 2, now=0.0)
    assert acks.admit(CONSUMER, OTHER, False)
    late = acks.add(CONSUMER, OTHER, 7, 2, "u", 3.0)
    acks.ack(CONSUMER, first[1:])
    assert acks.expired(4.9) == []
    assert acks.expired(5.0) == [(CONSUMER, Delivery(ORIGIN, 1, 1, "t", 5.0))]
    assert acks.expired(7.9) == []
    assert acks.expired(100) == [(CONSUMER, Delivery(OTHER, 7, 2, "u", 8.0))]
    assert acks.ack(CONSUMER, [first[0], late]) == [] and acks.unacked == 0


def test_release_of_topics_and_close():
    """Stopping some topics takes back their deliveries only; closing takes back the rest and forgets the consumer."""
    acks = table(window=10)
    [keep] = deliver(acks, 1, topic="keep")
    assert acks.admit(CONSUMER, OTHER, False)
    acks.add(CONSUMER, OTHER, 5, 1, "stop", 0)
    assert [d.seq for d in acks.release(CONSUMER, ["stop", "unknown"])] == [5]
    assert acks.release(CONSUMER, ["stop"]) == []
    assert [d.topic for d in acks.close(CONSUMER)] == ["keep"]
    assert not acks.has(CONSUMER) and acks.unacked == 0
    assert acks.close(CONSUMER) == [] and acks.release(CONSUMER, ["keep"]) == [] and acks.ack(CONSUMER, [keep]) == []
    assert acks.rooms(CONSUMER) == []


def test_drop_forgets_an_unwritten_delivery():
    """A delivery whose write failed is forgotten and frees its place in the window."""
    acks = table(window=1)
    [only] = deliver(acks, 1)
    acks.drop(CONSUMER, only)
    acks.drop(CONSUMER, only)
    assert acks.unacked == 0 and acks.admit(CONSUMER, ORIGIN, False)


# --- Held ------------------------------------------------------------------------------------

LOCAL, REMOTE = (1, CONSUMER), (2, CONSUMER)


def held(topic_size: int = 10) -> Held:
    return Held(Buffers(topic_size, 10, size_of=lambda item: len(item[2])))


def test_held_events_count_in_the_buffers_until_taken():
    """Holding an event counts it against its topic's bounds; taking it (once) stops that."""
    h = held()
    entry = h.add(1, "t", 42, b"event", 1, REMOTE)
    assert h.buffers.held == {"t": 1} and h.buffers.held_bytes == 5 and len(h) == 1
    assert h.take(1) is entry and h.take(1) is None
    assert h.buffers.held == {} and h.buffers.held_bytes == 0
    assert entry.item(2) == (1, 42, b"event", 2)


def test_take_with_an_entry_ignores_a_newer_one():
    """A late answer about an earlier hand-over of the same event does not take the newer one."""
    h = held()
    old = h.add(1, "t", 42, b"e", 1, REMOTE)
    h.take(1)
    new = h.add(1, "t", 42, b"e", 2, LOCAL)
    assert h.take(1, old) is None and h.entries[1] is new
    h.written(old, 5.0)
    assert h.expired(100) == [], "the old one is not written again"


def test_silent_nodes_lose_their_events_after_the_deadline():
    """Events written to a consumer of another node come back when its node stays silent past the deadline."""
    h = held()
    one, two = h.add(1, "t", 1, b"e", 1, REMOTE), h.add(2, "t", 1, b"e", 1, REMOTE)
    h.add(3, "t", 1, b"e", 1, LOCAL)
    h.written(one, 10.0)
    h.written(two, 12.0)
    assert h.expired(9.0) == []
    assert h.expired(10.0) == [one] and 1 not in h.entries
    h.take(2)
    assert h.expired(100.0) == [] and sorted(h.entries) == [3]


def test_events_of_nodes_that_left_come_back():
    """What consumers of a node that left the mesh had is taken back; others keep theirs."""
    h = held()
    gone, kept = h.add(1, "t", 1, b"e", 1, REMOTE), h.add(2, "t", 1, b"e", 1, (5, CONSUMER))
    h.written(gone, 10.0)
    h.written(kept, 10.0)
    assert h.on_nodes({1, 5}) == [gone] and sorted(h.entries) == [2]
    assert h.on_nodes({1, 5}) == []


def test_a_full_target_is_unblocked_after_room_and_every_answer():
    """A refused target stays blocked until its node announced room and every request to it was answered;
    the first event after that says it resumes, once."""
    h = held()
    for _ in range(3):
        h.sent(REMOTE)
    assert h.block(REMOTE, "t") is True
    assert h.answered(REMOTE) is False
    assert h.block(REMOTE, "u") is False, "already blocked: no second probe"
    assert h.room(REMOTE) is False, "one request still unanswered"
    assert h.answered(REMOTE) is False
    assert h.answered(REMOTE) is True
    assert h.unblock(REMOTE) == {"t", "u"} and REMOTE not in h.blocked
    assert h.take_resume(REMOTE) is True and h.take_resume(REMOTE) is False
    assert h.unblock(REMOTE) == set()


def test_room_that_comes_before_the_refusal_counts():
    """Room announced before the refusal's answer arrived (they travel apart) is not lost."""
    h = held()
    h.sent(REMOTE)
    assert h.room(REMOTE) is False
    h.block(REMOTE, "t")
    assert h.answered(REMOTE) is True


def test_refusals_of_events_sent_earlier_keep_the_room():
    """The refusals of events sent before the first one was answered do not undo announced room."""
    h = held()
    h.sent(REMOTE)
    h.sent(REMOTE)
    h.block(REMOTE, "t")
    h.answered(REMOTE)
    h.room(REMOTE)
    h.block(REMOTE, "t")
    assert h.answered(REMOTE) is True


def test_probe_unblocks_without_room():
    """A probe makes a blocked target due; unlike room, a probe for a target not blocked leaves nothing behind."""
    h = held()
    assert h.room(LOCAL, announced=False) is False
    h.block(LOCAL, "t")
    assert h.room(LOCAL, announced=False) is True
    h.sent(REMOTE)
    assert h.room(REMOTE, announced=False) is False
    h.block(REMOTE, "t")
    assert h.answered(REMOTE) is False, "the probe came before the block: not due"
