"""Tests of node/queues.py: bounded per-topic buffers and this node's consumers."""

import pytest

from node.queues import AlreadyConsuming, Buffers, Consumers, QueueFull, TooManyTopics


# --- Buffers -------------------------------------------------------------------------------

def test_buffers_fifo_per_topic():
    """Items come out oldest first, each topic on its own."""
    buffers = Buffers(topic_size=10, max_topics=10)
    for n in range(3):
        buffers.push("a", ("a", n))
        buffers.push("b", ("b", n))
    assert [buffers.pop("a") for _ in range(3)] == [("a", 0), ("a", 1), ("a", 2)]
    assert buffers.pop("a") is None
    assert buffers.pop("b") == ("b", 0)


def test_buffers_pop_unknown_topic():
    """Popping a topic with nothing waiting returns None."""
    assert Buffers(1, 1).pop("nothing") is None


def test_buffers_depth_waiting_topics():
    """depth counts every waiting item; waiting and topics follow what is buffered."""
    buffers = Buffers(topic_size=5, max_topics=5)
    assert (buffers.depth(), buffers.waiting("a"), buffers.topics()) == (0, False, [])
    buffers.push("a", 1)
    buffers.push("a", 2)
    buffers.push("b", 3)
    assert buffers.depth() == 3
    assert buffers.waiting("a") and buffers.waiting("b") and not buffers.waiting("c")
    assert sorted(buffers.topics()) == ["a", "b"]
    buffers.pop("b")
    assert buffers.topics() == ["a"]
    assert not buffers.waiting("b")


@pytest.mark.parametrize("topic_size", [1, 2, 5, 2000])
def test_buffers_topic_size_bound(topic_size):
    """A topic holds topic_size items; more is refused, counted, and the old items are kept."""
    buffers = Buffers(topic_size=topic_size, max_topics=3)
    for n in range(topic_size):
        buffers.push("t", n)
    for attempt in range(3):
        with pytest.raises(QueueFull):
            buffers.push("t", "late")
        assert buffers.dropped == attempt + 1
    assert buffers.depth() == topic_size
    assert [buffers.pop("t") for _ in range(topic_size)] == list(range(topic_size))
    assert buffers.pop("t") is None


def test_buffers_room_after_pop():
    """Popping from a full topic makes room for one more push."""
    buffers = Buffers(topic_size=2, max_topics=1)
    buffers.push("t", 1)
    buffers.push("t", 2)
    assert buffers.pop("t") == 1
    buffers.push("t", 3)
    assert [buffers.pop("t"), buffers.pop("t")] == [2, 3]
    assert buffers.dropped == 0


@pytest.mark.parametrize("max_topics", [1, 3, 100])
def test_buffers_max_topics_bound(max_topics):
    """A new topic beyond max_topics is refused and counted; existing topics still take items."""
    buffers = Buffers(topic_size=5, max_topics=max_topics)
    for n in range(max_topics):
        buffers.push(f"t{n}", n)
    with pytest.raises(QueueFull):
        buffers.push("one-too-many", "x")
    assert buffers.dropped == 1
    assert "one-too-many" not in buffers.topics()
    assert not buffers.waiting("one-too-many")
    buffers.push("t0", "more")
    assert buffers.depth() == max_topics + 1
    assert buffers.pop("t0") == 0


def test_buffers_topic_slot_freed_when_emptied():
    """A topic whose items were all popped no longer counts against max_topics."""
    buffers = Buffers(topic_size=5, max_topics=1)
    buffers.push("a", 1)
    with pytest.raises(QueueFull):
        buffers.push("b", 1)
    buffers.pop("a")
    buffers.push("b", 2)
    assert buffers.topics() == ["b"]


def test_buffers_queue_full_message_names_topic():
    """The refusal says which topic and which bound."""
    buffers = Buffers(topic_size=1, max_topics=1)
    buffers.push("orders", 1)
    with pytest.raises(QueueFull, match="orders.*1"):
        buffers.push("orders", 2)
    with pytest.raises(QueueFull, match="other.*1"):
        buffers.push("other", 1)


@pytest.mark.parametrize("waiting, returned, expected", [
    ([3, 4], [1, 2], [1, 2, 3, 4]),
    ([3, 4], [2, 1], [1, 2, 3, 4]),
    ([], [1, 2], [1, 2]),
    ([], [2, 1], [1, 2]),
    ([5], [1], [1, 5]),
    ([2, 3], [1], [1, 2, 3]),
    ([7, 8], [1, 4, 2], [1, 2, 4, 7, 8]),
])
def test_buffers_put_back_keeps_arrival_order(waiting, returned, expected):
    """Items put back go in by arrival sequence, whatever order they come back in, before what waited."""
    buffers = Buffers(topic_size=10, max_topics=10)
    for seq in waiting:
        buffers.push("t", (seq, "client"))
    for seq in returned:
        buffers.put_back("t", (seq, "client"))
    assert [buffers.pop("t")[0] for _ in expected] == expected
    assert buffers.pop("t") is None


def test_buffers_put_back_may_exceed_bound():
    """Putting undelivered items back is never refused, even over the bounds, and is not a drop."""
    buffers = Buffers(topic_size=2, max_topics=1)
    buffers.push("t", (3,))
    buffers.push("t", (4,))
    buffers.put_back("t", (2,))
    buffers.put_back("t", (1,))
    buffers.put_back("u", (9,))
    assert buffers.depth() == 5
    assert buffers.dropped == 0
    assert [buffers.pop("t")[0] for _ in range(4)] == [1, 2, 3, 4]
    assert buffers.pop("u") == (9,)


# --- Consumers -----------------------------------------------------------------------------

def test_consumers_new_ids_unique():
    """Consumer ids are unique and increasing."""
    consumers = Consumers()
    made = [consumers.new_id() for _ in range(100)]
    assert made == sorted(set(made))
    assert made[0] >= 1


def test_consumers_add_and_lookup():
    """A consumer added for topics is found for each of them and for nothing else."""
    consumers = Consumers()
    cid = consumers.new_id()
    conn = object()
    assert consumers.add(cid, conn, ["a", "b"]) == ["a", "b"]
    assert consumers.connection(cid, "a") is conn
    assert consumers.connection(cid, "b") is conn
    assert consumers.connection(cid, "c") is None
    assert consumers.connection(cid + 1, "a") is None
    assert consumers.count() == 1


def test_consumers_add_more_topics_later():
    """A consumer can add topics in several calls."""
    consumers = Consumers()
    conn = object()
    consumers.add(1, conn, ["a"])
    consumers.add(1, conn, ["b", "c"])
    assert consumers.topics[1] == {"a", "b", "c"}
    assert consumers.count() == 1


@pytest.mark.parametrize("first, second", [
    (["a"], ["a"]),
    (["a", "b"], ["c", "b"]),
    (["a"], ["x", "y", "a"]),
])
def test_consumers_repeated_refused(first, second):
    """Consuming a topic twice on one connection is refused and nothing changes."""
    consumers = Consumers()
    conn = object()
    consumers.add(1, conn, first)
    with pytest.raises(AlreadyConsuming):
        consumers.add(1, conn, second)
    assert consumers.topics[1] == set(first)
    for topic in set(second) - set(first):
        assert consumers.connection(1, topic) is None


def test_consumers_same_topic_on_other_connection_is_fine():
    """Two connections may consume the same topic (competing consumers)."""
    consumers = Consumers()
    consumers.add(1, "conn1", ["a"])
    consumers.add(2, "conn2", ["a"])
    assert consumers.connection(1, "a") == "conn1"
    assert consumers.connection(2, "a") == "conn2"
    assert consumers.count() == 2


@pytest.mark.parametrize("limit, first, second, refused", [
    (2, ["a", "b"], [], False),
    (2, ["a"], ["b"], False),
    (2, ["a", "b"], ["c"], True),
    (2, ["a"], ["b", "c"], True),
    (1, [], ["a", "b"], True),
    (3, ["a"], ["b", "c"], False),
])
def test_consumers_limit(limit, first, second, refused):
    """More than max_topics_per_consumer topics is refused and nothing changes; exactly the limit is fine."""
    consumers = Consumers(max_topics_per_consumer=limit)
    conn = object()
    if first:
        consumers.add(1, conn, first)
    if refused:
        with pytest.raises(TooManyTopics):
            consumers.add(1, conn, second)
        assert consumers.topics.get(1, set()) == set(first)
        assert consumers.count() == (1 if first else 0)
    else:
        if second:
            consumers.add(1, conn, second)
        assert consumers.topics[1] == set(first) | set(second)


def test_consumers_remove_some():
    """Removing some topics returns the ones the consumer had and keeps the rest."""
    consumers = Consumers()
    consumers.add(1, "conn", ["a", "b", "c"])
    assert consumers.remove(1, ["a", "zzz"]) == ["a"]
    assert consumers.topics[1] == {"b", "c"}
    assert consumers.connection(1, "a") is None
    assert consumers.connection(1, "b") == "conn"
    assert consumers.count() == 1


def test_consumers_remove_last_topic_forgets_connection():
    """A consumer with no topics left is forgotten."""
    consumers = Consumers()
    consumers.add(1, "conn", ["a"])
    assert consumers.remove(1, ["a"]) == ["a"]
    assert consumers.count() == 0
    assert 1 not in consumers.by_id and 1 not in consumers.topics


def test_consumers_remove_all():
    """Removing with no topics removes every topic of the consumer."""
    consumers = Consumers()
    consumers.add(1, "conn", ["a", "b"])
    consumers.add(2, "other", ["a"])
    assert sorted(consumers.remove(1)) == ["a", "b"]
    assert consumers.count() == 1
    assert consumers.connection(2, "a") == "other"


@pytest.mark.parametrize("topics", [None, ["a"], []])
def test_consumers_remove_repeated_is_harmless(topics):
    """Removing again, or removing an unknown consumer, returns nothing and changes nothing."""
    consumers = Consumers()
    consumers.add(1, "conn", ["a"])
    consumers.remove(1)
    assert consumers.remove(1, topics) == []
    assert consumers.remove(99, topics) == []
    assert consumers.count() == 0


def test_consumers_readd_after_remove():
    """A topic removed from a consumer can be consumed again."""
    consumers = Consumers()
    consumers.add(1, "conn", ["a", "b"])
    consumers.remove(1, ["a"])
    consumers.add(1, "conn", ["a"])
    assert consumers.topics[1] == {"a", "b"}


def test_buffers_byte_budget_covers_all_topics():
    """Past max_bytes (all topics together) a push is refused and counted; popping frees room again."""
    buffers = Buffers(topic_size=100, max_topics=10, max_bytes=10, size_of=lambda item: len(item[1]))
    buffers.push("a", (1, b"1234"))
    buffers.push("b", (2, b"123456"))
    assert buffers.bytes == 10
    with pytest.raises(QueueFull, match="10 bytes"):
        buffers.push("c", (3, b"x"))
    assert buffers.dropped == 1
    assert buffers.pop("a") == (1, b"1234")
    assert buffers.bytes == 6
    buffers.push("c", (3, b"xyz"))
    buffers.put_back("a", (0, b"12345"))          # returned items are never refused
    assert buffers.bytes == 14 and buffers.depth() == 3


# --- held events (node/held.py) count against the bounds ------------------------------------

def test_held_events_count_against_topic_size():
    """Waiting and held events of a topic together are at most topic_size; a push past it is a drop."""
    buffers = Buffers(topic_size=3, max_topics=10, size_of=lambda item: len(item[1]))
    buffers.hold("t", 1)
    buffers.hold("t", 1)
    buffers.push("t", (1, b"x"))
    with pytest.raises(QueueFull, match="buffer full"):
        buffers.push("t", (2, b"x"))
    with pytest.raises(QueueFull, match="buffer full"):
        buffers.admit("t", 1)
    assert buffers.dropped == 2 and buffers.dropped_by == {"t": 2}
    buffers.admit("other", 1)                      # other topics are not held back
    buffers.unhold("t", 1)
    buffers.admit("t", 1)
    buffers.push("t", (2, b"x"))
    assert buffers.depth() == 2 and buffers.held == {"t": 1}


def test_held_events_count_against_max_bytes():
    """Held bytes and waiting bytes share max_bytes; releasing the hold frees them."""
    buffers = Buffers(topic_size=100, max_topics=10, max_bytes=10, size_of=lambda item: len(item[1]))
    buffers.hold("a", 8)
    with pytest.raises(QueueFull, match="10 bytes"):
        buffers.push("b", (1, b"xyz"))
    with pytest.raises(QueueFull, match="10 bytes"):
        buffers.admit("b", 3)
    buffers.push("b", (1, b"xy"))
    buffers.unhold("a", 8)
    assert (buffers.held, buffers.held_bytes, buffers.bytes) == ({}, 0, 2)
    buffers.push("a", (2, b"12345678"))


def test_held_topic_without_waiting_events_is_not_a_buffered_topic():
    """max_topics counts topics with events waiting; held ones alone do not take a slot."""
    buffers = Buffers(topic_size=5, max_topics=1)
    buffers.hold("held", 0)
    buffers.push("waiting", (1,))
    assert buffers.topics() == ["waiting"]


def test_consumers_sibling_topics_count_together():
    """A connection's two consumer ids (at most once, at least once) may not share a topic; their topics
    count together against the limit."""
    consumers = Consumers(max_topics_per_consumer=3)
    consumers.add(1, "conn", ["a", "b"])
    with pytest.raises(AlreadyConsuming):
        consumers.add(2, "conn", ["c", "a"], sibling=1)
    with pytest.raises(TooManyTopics):
        consumers.add(2, "conn", ["c", "d"], sibling=1)
    consumers.add(2, "conn", ["c"], sibling=1)
    assert consumers.topics == {1: {"a", "b"}, 2: {"c"}}
