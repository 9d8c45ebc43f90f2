"""Tests of cluster/ids.py: Snowflake-style client ids made with a fake clock."""

import pytest

from cluster import ids
from cluster.ids import EPOCH_MS, MAX_NODE_ID, MAX_SEQUENCE, IdGenerator
from cluster.protocol import parse_client_id

T0 = 1_800_000_000_000  # a unix millisecond well after EPOCH_MS


class FakeClock:
    """A clock that returns whatever the test sets."""

    def __init__(self, now: int = T0):
        self.now = now

    def __call__(self) -> int:
        return self.now


def sequence_of(client_id: int) -> int:
    return client_id & MAX_SEQUENCE


def test_layout_constants():
    """The id layout is 41 bits of time, 10 of node id and 12 of sequence."""
    assert (ids.NODE_BITS, ids.SEQUENCE_BITS, MAX_NODE_ID, MAX_SEQUENCE) == (10, 12, 1023, 4095)


def test_many_ids_unique_and_increasing_real_clock():
    """Ids from one generator on the real clock are unique and strictly increasing."""
    generator = IdGenerator(5)
    made = [generator.make() for _ in range(20000)]
    assert all(a < b for a, b in zip(made, made[1:]))
    assert all(ids.node_id_of(client_id) == 5 for client_id in made)


def test_many_ids_in_one_millisecond():
    """A clock that never moves still gives unique, strictly increasing ids."""
    generator = IdGenerator(9, clock=FakeClock())
    made = [generator.make() for _ in range(3 * (MAX_SEQUENCE + 1) + 10)]
    assert all(a < b for a, b in zip(made, made[1:]))
    assert len(set(made)) == len(made)
    assert {ids.node_id_of(client_id) for client_id in made} == {9}


def test_first_id_fields():
    """The first id carries the clock's millisecond, the node id and sequence 0."""
    generator = IdGenerator(42, clock=FakeClock(T0))
    client_id = generator.make()
    assert ids.timestamp_ms_of(client_id) == T0
    assert ids.node_id_of(client_id) == 42
    assert sequence_of(client_id) == 0
    assert generator.last_ms == T0


def test_sequence_counts_within_millisecond_and_resets():
    """Ids in one millisecond count the sequence up; a new millisecond starts it at 0."""
    clock = FakeClock(T0)
    generator = IdGenerator(1, clock=clock)
    first = [generator.make() for _ in range(3)]
    assert [sequence_of(i) for i in first] == [0, 1, 2]
    clock.now = T0 + 1
    later = generator.make()
    assert (ids.timestamp_ms_of(later), sequence_of(later)) == (T0 + 1, 0)


def test_sequence_overflow_moves_to_next_millisecond():
    """After 4096 ids in one millisecond the next id moves its time forward one millisecond."""
    clock = FakeClock(T0)
    generator = IdGenerator(3, clock=clock)
    made = [generator.make() for _ in range(MAX_SEQUENCE + 2)]
    assert [ids.timestamp_ms_of(i) for i in made[:-1]] == [T0] * (MAX_SEQUENCE + 1)
    assert [sequence_of(i) for i in made[:-1]] == list(range(MAX_SEQUENCE + 1))
    assert (ids.timestamp_ms_of(made[-1]), sequence_of(made[-1])) == (T0 + 1, 0)
    # the real clock catching up to the borrowed millisecond does not repeat an id
    clock.now = T0 + 1
    again = generator.make()
    assert again > made[-1]
    clock.now = T0 + 2
    assert generator.make() > again


@pytest.mark.parametrize("steps", [
    [T0, T0 - 1],
    [T0, T0 - 1000, T0 - 1000, T0 - 999],
    [T0 + 5, T0, T0 + 1, T0 + 5, T0 + 6],
    [T0, T0 - 3_600_000, T0 + 1],
    [T0, T0, T0 - 1, T0 - 2, T0 + 1, T0, T0 + 2],
])
def test_clock_stepping_back(steps):
    """When the clock steps back the ids still strictly increase and keep their node id."""
    clock = FakeClock()
    generator = IdGenerator(77, clock=clock)
    made = []
    for now in steps:
        clock.now = now
        made.append(generator.make())
    assert all(a < b for a, b in zip(made, made[1:]))
    assert {ids.node_id_of(i) for i in made} == {77}


def test_clock_stepping_back_many_ids():
    """A clock that went back while more than a sequence's worth of ids is made never repeats an id."""
    clock = FakeClock(T0 + 10)
    generator = IdGenerator(2, clock=clock)
    made = [generator.make()]
    clock.now = T0
    made += [generator.make() for _ in range(10000)]
    assert all(a < b for a, b in zip(made, made[1:]))


@pytest.mark.parametrize("not_before, clock_ms", [
    (T0 + 1000, T0),
    (T0, T0),
    (T0 + 1, T0),
    (T0 + 50, T0 - 10_000),
])
def test_not_before_respected(not_before, clock_ms):
    """With a clock at or behind not_before_ms, every id's time is after not_before_ms."""
    generator = IdGenerator(4, not_before_ms=not_before, clock=FakeClock(clock_ms))
    made = [generator.make() for _ in range(MAX_SEQUENCE + 10)]
    assert all(ids.timestamp_ms_of(i) > not_before for i in made)
    assert all(a < b for a, b in zip(made, made[1:]))


def test_not_before_in_the_past_uses_clock():
    """A not_before_ms earlier than the clock does not hold ids back."""
    generator = IdGenerator(4, not_before_ms=T0 - 5000, clock=FakeClock(T0))
    assert ids.timestamp_ms_of(generator.make()) == T0


def test_not_before_prevents_repeat_across_processes():
    """A successor holding the same node id after a clock step back makes no id its predecessor made."""
    clock = FakeClock(T0)
    first = IdGenerator(8, clock=clock)
    old = {first.make() for _ in range(5000)}
    clock.now = T0 - 2000
    second = IdGenerator(8, not_before_ms=first.last_ms, clock=clock)
    new = [second.make() for _ in range(5000)]
    assert not old.intersection(new)
    assert min(new) > max(old)


def test_generators_of_different_nodes_differ():
    """Two nodes at the same instant make different ids."""
    clock = FakeClock()
    a, b = IdGenerator(1, clock=clock), IdGenerator(2, clock=clock)
    first = [a.make() for _ in range(100)]
    second = [b.make() for _ in range(100)]
    assert not set(first).intersection(second)


@pytest.mark.parametrize("node_id", [1, 2, 511, 512, MAX_NODE_ID])
@pytest.mark.parametrize("count", [1, 4096, 4097])
def test_node_id_of_round_trip(node_id, count):
    """node_id_of reads back the generator's node id from every id, at any sequence."""
    generator = IdGenerator(node_id, clock=FakeClock())
    for _ in range(count - 1):
        generator.make()
    client_id = generator.make()
    assert ids.node_id_of(client_id) == node_id


@pytest.mark.parametrize("node_id", [0, -1, MAX_NODE_ID + 1, 5000])
def test_invalid_node_id_refused(node_id):
    """Node ids outside 1..1023 are refused."""
    with pytest.raises(ValueError):
        IdGenerator(node_id)


@pytest.mark.parametrize("node_id", [1.5, "3", None])
def test_node_id_wrong_type_refused(node_id):
    """A node id that is not an integer is refused when the generator is made."""
    with pytest.raises((ValueError, TypeError)):
        IdGenerator(node_id)


def test_ids_fit_in_63_bits():
    """The top bit is zero, so ids are positive in a signed 64-bit integer."""
    generator = IdGenerator(MAX_NODE_ID, clock=FakeClock(EPOCH_MS + (1 << 40)))
    client_id = generator.make()
    assert 0 < client_id < 2 ** 63


@pytest.mark.parametrize("client_id", [0, 1, 1463786910324359168, 2 ** 53 + 1, 2 ** 64 - 1])
def test_to_wire_is_decimal_string(client_id):
    """to_wire gives the decimal string that parse_client_id reads back exactly."""
    wire = ids.to_wire(client_id)
    assert isinstance(wire, str)
    assert wire.isdigit() and wire.isascii()
    assert wire == str(client_id)
    assert parse_client_id(wire) == client_id


def test_to_wire_of_made_id():
    """A made id round-trips through its wire form beyond 2^53."""
    client_id = IdGenerator(1023, clock=FakeClock()).make()
    assert client_id > 2 ** 53
    assert int(ids.to_wire(client_id)) == client_id
