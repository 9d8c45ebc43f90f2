"""Tests of the routing state: cluster/interest_table.py, coordinator/tables.py, coordinator/registry.py, node/routing.py."""

import itertools
from collections import Counter

import pytest

from cluster import mesh
from cluster.ids import MAX_NODE_ID, IdGenerator
from cluster.interest_table import GRAVE_S, InterestTable
from coordinator.registry import NodeInfo, Registry, RegistryError
from coordinator.tables import Tables
from node.routing import Routing


def nodes(*ids) -> list:
    """NodeEntry of each id, mesh point tcp://h:(7000 + id)."""
    return [mesh.NodeEntry(node_id, "h", 1, "h:6789", f"tcp://h:{7000 + node_id}", 0, 0.0) for node_id in ids]


# --- InterestTable: interest ---------------------------------------------------------------

def test_interest_added_and_removed():
    """A count > 0 adds the origin to the channel; count 0 removes it and the empty channel."""
    state = InterestTable()
    assert state.apply_interest(1, "ch", 2, 1)
    assert state.interested_nodes("ch") == {1: 2}
    assert state.apply_interest(2, "ch", 1, 1)
    assert state.interested_nodes("ch") == {1: 2, 2: 1}
    assert state.apply_interest(1, "ch", 0, 2)
    assert state.interested_nodes("ch") == {2: 1}
    assert state.apply_interest(2, "ch", 0, 2)
    assert state.interested_nodes("ch") == {}
    assert "ch" not in state.interest


@pytest.mark.parametrize("first, second, expected", [
    ((3, 5), (7, 5), {1: 3}),    # duplicate sequence number ignored
    ((3, 5), (7, 4), {1: 3}),    # older change ignored
    ((3, 5), (7, 6), {1: 7}),    # newer change applied
    ((0, 5), (7, 4), {}),        # an older add does not undo a newer removal
    ((3, 5), (0, 1), {1: 3}),    # an older removal does not undo a newer add
])
def test_interest_sequence_rule(first, second, expected):
    """Only a change with a higher sequence number than the one held for its key is applied."""
    state = InterestTable()
    state.apply_interest(1, "ch", *first)
    accepted = state.apply_interest(1, "ch", *second)
    assert accepted == (second[1] > first[1])
    assert state.interested_nodes("ch") == expected


def test_interest_sequence_is_per_key():
    """Sequence numbers of one (origin, channel) do not hide changes of another."""
    state = InterestTable()
    assert state.apply_interest(1, "a", 1, 10)
    assert state.apply_interest(1, "b", 1, 3)
    assert state.apply_interest(2, "a", 1, 1)
    assert state.interest == {"a": {1: 1, 2: 1}, "b": {1: 1}}


INTEREST_CHANGES = [
    [1, "ch", 1, 1], [1, "ch", 2, 2], [1, "ch", 0, 3], [1, "ch", 5, 4],
    [2, "ch", 1, 1], [2, "ch", 0, 2],
    [1, "other", 3, 5],
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_interest_out_of_order_converges(order):
    """Whatever order the changes of one key arrive in (and repeated), the state is the latest one."""
    state = InterestTable()
    changes = [INTEREST_CHANGES[i] for i in order]
    state.apply(changes + changes[::-1] + INTEREST_CHANGES[4:])
    assert state.interest == {"ch": {1: 5}, "other": {1: 3}}


# --- InterestTable: consumers ----------------------------------------------------------------

def test_consumers_added_and_removed():
    """Consumers appear with present=1 and go with present=0; an empty topic disappears."""
    state = InterestTable()
    assert state.apply_consumer(1, "t", 10, True, 1)
    assert state.apply_consumer(2, "t", 10, True, 1)
    assert state.apply_consumer(1, "t", 11, True, 2)
    assert state.consumers_of("t") == [(1, 10), (2, 10), (1, 11)]
    assert state.apply_consumer(1, "t", 10, False, 3)
    assert state.consumers_of("t") == [(2, 10), (1, 11)]
    assert state.apply_consumer(2, "t", 10, False, 2)
    assert state.apply_consumer(1, "t", 11, False, 4)
    assert state.consumers_of("t") == []
    assert "t" not in state.consumers


def test_consumer_removal_of_unknown_is_harmless():
    """Removing a consumer never seen is accepted and changes nothing."""
    state = InterestTable()
    assert state.apply_consumer(1, "t", 10, False, 1)
    assert state.consumers == {}


@pytest.mark.parametrize("first, second, present", [
    ((True, 5), (False, 5), True),
    ((True, 5), (False, 4), True),
    ((False, 5), (True, 4), False),
    ((True, 5), (False, 6), False),
    ((False, 5), (True, 6), True),
])
def test_consumer_sequence_rule(first, second, present):
    """Duplicate or older consumer changes are ignored; newer ones applied."""
    state = InterestTable()
    state.apply_consumer(1, "t", 10, *first)
    state.apply_consumer(1, "t", 10, *second)
    assert ((1, 10) in state.consumers_of("t")) == present


CONSUMER_CHANGES = [[1, "t", 10, 1, 1], [1, "t", 10, 0, 2], [1, "t", 10, 1, 3], [1, "t", 11, 1, 4], [1, "t", 11, 0, 5]]


@pytest.mark.parametrize("order", list(itertools.permutations(range(5))))
def test_consumers_out_of_order_converge(order):
    """Consumer changes arriving in any order, some twice, converge on the origin's latest state."""
    state = InterestTable()
    changes = [CONSUMER_CHANGES[i] for i in order]
    state.apply((), changes + changes[:2])
    assert state.consumers_of("t") == [(1, 10)]


def test_apply_returns_accepted_in_wire_form():
    """apply returns exactly the changes that were newer, in their wire form."""
    state = InterestTable()
    state.apply([[1, "a", 1, 5]], [[1, "t", 3, 1, 5]])
    interest, consumers = state.apply(
        [[1, "a", 2, 4], [1, "a", 2, 6], [2, "a", 1, 1]],
        [[1, "t", 3, 0, 5], [1, "t", 3, 0, 7]],
    )
    assert interest == [[1, "a", 2, 6], [2, "a", 1, 1]]
    assert consumers == [[1, "t", 3, 0, 7]]


# --- InterestTable: dropping an origin and snapshots ---------------------------------------------

def build_state() -> InterestTable:
    state = InterestTable()
    state.apply(
        [[1, "a", 2, 1], [2, "a", 1, 1], [1, "b", 1, 2], [3, "c", 4, 1]],
        [[1, "t", 10, 1, 3], [2, "t", 20, 1, 2], [1, "u", 11, 1, 4], [3, "v", 30, 1, 2]],
    )
    return state


def test_drop_origin():
    """Dropping a node forgets all its interest and consumers and reports the topics that changed."""
    state = build_state()
    assert state.drop_origin(1) == {"t", "u"}
    assert state.interest == {"a": {2: 1}, "c": {3: 4}}
    assert state.consumers_of("t") == [(2, 20)]
    assert state.consumers_of("u") == []
    assert "u" not in state.consumers
    assert state.consumers_of("v") == [(3, 30)]


def test_drop_unknown_origin():
    """Dropping a node that said nothing changes nothing."""
    state = build_state()
    before = state.dump()
    assert state.drop_origin(9) == set()
    assert state.dump() == before


def test_drop_origin_forgets_sequence_numbers():
    """After a node is dropped, a new holder of its id starts its sequence numbers afresh."""
    state = build_state()
    state.drop_origin(1)
    assert state.apply_interest(1, "a", 7, 1)
    assert state.apply_consumer(1, "t", 12, True, 1)
    assert state.interested_nodes("a") == {1: 7, 2: 1}
    assert (1, 12) in state.consumers_of("t")


def test_dump_round_trip():
    """A dump loaded into a fresh state gives the same tables and the same sequence numbers."""
    state = build_state()
    state.apply([[1, "b", 0, 9]], [[2, "t", 20, 0, 9]])
    interest, consumers = state.dump()
    copy = InterestTable()
    copy.apply(interest, consumers)
    assert copy.interest == state.interest
    assert copy.consumers == state.consumers
    assert copy.dump() == (interest, consumers)
    # held sequence numbers came along: older changes are still refused
    assert not copy.apply_interest(1, "a", 9, 1)
    assert not copy.apply_consumer(1, "t", 10, False, 3)
    assert copy.apply_consumer(1, "t", 10, False, 4)


# --- coordinator tables ------------------------------------------------------------------------

def test_tables_advert():
    """An advert updates ownership and returns the accepted changes with the origin prefixed."""
    tables = Tables()
    interest, consumers = tables.apply_advert(3, mesh.Advert(
        opened=[100, 101, 102], closed=[101], interest=[["ch", 2, 1]], consumers=[["t", 7, 1, 2]]))
    assert tables.ownership == {3: {100, 102}}
    assert interest == [[3, "ch", 2, 1]]
    assert consumers == [[3, "t", 7, 1, 2]]
    assert tables.state.interested_nodes("ch") == {3: 2}


def test_tables_watched_clients_are_handed_over_when_their_node_goes():
    """Watched clients (a lifecycle topic) are kept per node, forgotten when they close, and returned by
    drop_node for their lost closes; a re-registration's state replaces them."""
    tables = Tables()
    tables.apply_advert(3, mesh.Advert(opened=[100, 101, 102], watched=[[100, "life"], [101, "life"]]))
    tables.apply_advert(3, mesh.Advert(closed=[101], watched=[[102, "other"]]))
    tables.apply_advert(4, mesh.Advert(opened=[200]))
    assert tables.drop_node(4) == []
    tables.replace_node_state(5, mesh.NodeState(clients=[300], watched=[[300, "life"]]))
    assert sorted(tables.drop_node(3)) == [[100, "life"], [102, "other"]]
    assert tables.drop_node(3) == [] and tables.drop_node(5) == [[300, "life"]]


def test_tables_repeated_advert_not_accepted_twice():
    """The same advert applied twice yields no changes the second time."""
    tables = Tables()
    advert = mesh.Advert(interest=[["ch", 1, 1]], consumers=[["t", 7, 1, 1]])
    tables.apply_advert(3, advert)
    assert tables.apply_advert(3, advert) == ([], [])


def test_tables_next_update_versions():
    """Each update has the next version and leaves out empty parts."""
    tables = Tables()
    first = tables.next_update(interest=[[1, "a", 1, 1]])
    second = tables.next_update(nodes=nodes(1), dead=[2])
    third = tables.next_update()
    assert first == mesh.Update(1, interest=[[1, "a", 1, 1]])
    assert second == mesh.Update(2, nodes=nodes(1), dead=[2])
    assert third == mesh.Update(3)
    assert tables.version == 3


def test_tables_drop_node():
    """Dropping a node removes its ownership, interest and consumers only."""
    tables = Tables()
    tables.apply_advert(1, mesh.Advert(opened=[1], interest=[["a", 1, 1]], consumers=[["t", 1, 1, 2]]))
    tables.apply_advert(2, mesh.Advert(opened=[2], interest=[["a", 1, 1]], consumers=[["t", 1, 1, 2]]))
    tables.drop_node(1)
    assert tables.ownership == {2: {2}}
    assert tables.state.interested_nodes("a") == {2: 1}
    assert tables.state.consumers_of("t") == [(2, 1)]
    assert tables.counts() == {"channels": 1, "topics_with_consumers": 1, "owned_clients": 1}


def test_tables_replace_node_state():
    """A re-registration replaces what the node said before, even with lower sequence numbers."""
    tables = Tables()
    tables.apply_advert(4, mesh.Advert(opened=[1, 2], interest=[["old", 1, 50], ["kept", 1, 51]],
                                       consumers=[["t", 1, 1, 52]]))
    interest, consumers = tables.replace_node_state(4, mesh.NodeState(clients=[3], interest=[["kept", 2, 1]],
                                                                      consumers=[["u", 2, 1, 2]]))
    assert tables.ownership[4] == {3}
    assert tables.state.interest == {"kept": {4: 2}}
    assert tables.state.consumers_of("t") == []
    assert tables.state.consumers_of("u") == [(4, 2)]
    assert interest == [[4, "kept", 2, 1]]
    assert consumers == [[4, "u", 2, 1, 2]]


def test_tables_snapshot_loads_into_routing():
    """A coordinator snapshot loaded by a node gives the node the same tables and version."""
    tables = Tables()
    tables.apply_advert(1, mesh.Advert(interest=[["a", 2, 1]], consumers=[["t", 5, 1, 2]]))
    tables.apply_advert(2, mesh.Advert(interest=[["a", 1, 1], ["b", 3, 2]]))
    tables.next_update()
    tables.next_update()
    listed = nodes(1, 2)
    snapshot = tables.snapshot(listed)
    assert snapshot.v == 2 and snapshot.nodes == listed
    routing = Routing(2)
    added, removed, topics = routing.load_snapshot(snapshot)
    assert (added, removed, topics) == ({1, 2}, set(), {"t"})
    assert routing.version == 2
    assert routing.state.interest == tables.state.interest
    assert routing.state.consumers == tables.state.consumers


# --- coordinator registry ----------------------------------------------------------------------

INFO = mesh.Register(0, "h1", 100, "h1:6789", "tcp://h1:7000", 1.5, mesh.NodeState())


def info(**extra) -> mesh.Register:
    return INFO._replace(**extra)


def test_registry_allocates_ids():
    """Fresh nodes get distinct ids from 1 up and no not_before."""
    registry = Registry()
    assert [registry.register(b"r%d" % n, info(pid=n), now=0, wall_ms=0) for n in range(3)] == [(1, 0), (2, 0), (3, 0)]
    assert registry.node_for(b"r1") == 2
    assert sorted(registry.nodes) == [1, 2, 3]


def test_registry_same_routing_id_same_node_id():
    """A repeated registration from the same routing id gets the same id, asked for or not."""
    registry = Registry()
    node_id, _ = registry.register(b"r", info(), now=0, wall_ms=0)
    registry.register(b"other", info(), now=0, wall_ms=0)
    assert registry.register(b"r", info(), now=1, wall_ms=1)[0] == node_id
    assert registry.register(b"r", info(node_id=node_id), now=2, wall_ms=2)[0] == node_id
    assert len(registry.nodes) == 2
    assert registry.nodes[node_id].last_seen == 2


def test_registry_conflicting_id_refused():
    """Asking for an id a different live node holds is refused for good."""
    registry = Registry()
    node_id, _ = registry.register(b"a", info(), now=0, wall_ms=0)
    with pytest.raises(RegistryError) as error:
        registry.register(b"b", info(node_id=node_id), now=1, wall_ms=1)
    assert error.value.retry is False
    assert registry.node_for(b"a") == node_id
    assert registry.node_for(b"b") is None


def test_registry_reclaim_after_coordinator_restart():
    """A node of the previous run keeps its id with a fresh registry."""
    registry = Registry(grace_until=10.0)
    assert registry.register(b"n7", info(node_id=7), now=1, wall_ms=1) == (7, 0)
    # fresh ids skip ids already held
    assert registry.register(b"fresh", info(), now=11, wall_ms=11)[0] != 7


@pytest.mark.parametrize("now, refused", [(0.0, True), (9.99, True), (10.0, False), (50.0, False)])
def test_registry_grace_period(now, refused):
    """During the grace period a fresh node is told to retry; a node asking for its id is not."""
    registry = Registry(grace_until=10.0)
    if refused:
        with pytest.raises(RegistryError) as error:
            registry.register(b"fresh", info(), now=now, wall_ms=0)
        assert error.value.retry is True
    else:
        assert registry.register(b"fresh", info(), now=now, wall_ms=0)[0] >= 1
    assert registry.register(b"old", info(node_id=5), now=now, wall_ms=0) == (5, 0)


def test_registry_removed_id_not_before():
    """A released id, given out again, carries the time the previous holder may have used."""
    registry = Registry()
    registry.register(b"a", info(node_id=3), now=0, wall_ms=0)
    registry.heartbeat(b"a", 3, {"id_ms": 5000}, now=1)
    assert registry.remove(3, wall_ms=4000).node_id == 3
    assert registry.node_for(b"a") is None
    assert registry.register(b"b", info(node_id=3), now=2, wall_ms=6000) == (3, 5000)
    registry.remove(3, wall_ms=9000)
    assert registry.register(b"c", info(node_id=3), now=3, wall_ms=9500) == (3, 9000)


def test_registry_reuses_ids_when_all_taken():
    """With every id in use a fresh node retries; a released id is then reused with not_before."""
    registry = Registry()
    for n in range(MAX_NODE_ID):
        registry.register(b"r%d" % n, info(), now=0, wall_ms=0)
    assert sorted(registry.nodes) == list(range(1, MAX_NODE_ID + 1))
    with pytest.raises(RegistryError) as error:
        registry.register(b"extra", info(), now=0, wall_ms=0)
    assert error.value.retry is True
    registry.remove(500, wall_ms=777)
    assert registry.register(b"extra", info(), now=1, wall_ms=800) == (500, 777)


def test_registry_remove_unknown():
    """Removing an id nobody holds returns None."""
    assert Registry().remove(4, wall_ms=0) is None


@pytest.mark.parametrize("wanted", [MAX_NODE_ID + 1, 5000, -1])
def test_registry_refuses_out_of_range_id(wanted):
    """A node asking for an id outside 1..1023 is refused."""
    with pytest.raises(RegistryError):
        Registry().register(b"r", info(node_id=wanted), now=0, wall_ms=0)


def test_registry_heartbeat():
    """Heartbeats count only from the registered holder of the id."""
    registry = Registry()
    node_id, _ = registry.register(b"a", info(), now=0, wall_ms=0)
    assert registry.heartbeat(b"a", node_id, {"clients": 4}, now=5)
    assert registry.nodes[node_id].last_seen == 5
    assert registry.nodes[node_id].stats == {"clients": 4}
    assert not registry.heartbeat(b"b", node_id, {}, now=6)
    assert not registry.heartbeat(b"a", node_id + 1, {}, now=6)
    assert registry.nodes[node_id].last_seen == 5


def test_registry_expired():
    """A node is expired when its last heartbeat is older than the timeout."""
    registry = Registry()
    registry.register(b"a", info(), now=0, wall_ms=0)
    registry.register(b"b", info(), now=0, wall_ms=0)
    registry.heartbeat(b"b", 2, {}, now=2.5)
    assert registry.expired(now=3.0, timeout=3.0) == []
    assert registry.expired(now=3.01, timeout=3.0) == [1]
    assert registry.expired(now=6.0, timeout=3.0) == [1, 2]


def test_registry_public_list():
    """/v1/nodes lists live nodes by id with the documented fields."""
    registry = Registry()
    registry.register(b"b", info(node_id=9, pid=9), now=0, wall_ms=0)
    registry.register(b"a", info(node_id=2, pid=2), now=0, wall_ms=0)
    registry.heartbeat(b"b", 9, {"clients": 10}, now=1)
    listed = registry.public_list()
    assert [item["node_id"] for item in listed] == [2, 9]
    assert listed[1] == {"node_id": 9, "host": "h1", "pid": 9, "api_server": "h1:6789",
                         "mesh_point": "tcp://h1:7000", "clients": 10, "started_at": 1.5}
    assert listed[0]["clients"] == 0


EXITED = mesh.Exited("h1", 100, 1.0, 2.0, -9)   # the process of INFO (started_at 1.5), from address 10.0.0.5


@pytest.mark.parametrize("notice, address, dropped", [
    (EXITED, "10.0.0.5", True),
    (EXITED._replace(started_at=1.5, exited_at=1.5), "10.0.0.5", True),       # the window's edges count
    (EXITED._replace(host="h2"), "10.0.0.5", False),                            # another machine's pid 100
    (EXITED._replace(pid=101), "10.0.0.5", False),
    (EXITED, "10.0.0.6", False),                                                # not from the node's machine
    (EXITED, "", False),
    (EXITED._replace(started_at=1.6, exited_at=9.0), "10.0.0.5", False),      # started before the process did
    (EXITED._replace(started_at=0.5, exited_at=1.4), "10.0.0.5", False),      # the pid is a newer process's
], ids=["match", "edges", "host", "pid", "address", "no-address", "later-start", "pid-reused"])
def test_registry_exited_matches_only_that_process(notice, address, dropped):
    """An exit notice names a node only with its host, pid and address, and a start window holding its own start."""
    registry = Registry()
    node_id, _ = registry.register(b"a", info(), now=0, wall_ms=0, address="10.0.0.5")
    registry.register(b"b", info(host="h2", pid=7), now=0, wall_ms=0, address="10.0.0.5")
    assert registry.exited(notice, address) == (node_id if dropped else None)


def test_registry_exited_after_reregistration_keeps_the_new_address():
    """A node that registers again (coordinator restart) is matched at the address it registered from last."""
    registry = Registry()
    node_id, _ = registry.register(b"a", info(), now=0, wall_ms=0, address="10.0.0.5")
    registry.register(b"a", info(node_id=node_id), now=1, wall_ms=1, address="10.0.0.9")
    assert registry.exited(EXITED, "10.0.0.5") is None
    assert registry.exited(EXITED, "10.0.0.9") == node_id


def test_node_info_public_has_no_routing_id():
    """The public form of a node leaves out its routing id, stats and address."""
    public = NodeInfo(1, b"rid", "h", 2, "h:1", "tcp://h:2", 3.0, 4.0, {"clients": 1, "id_ms": 9}, "10.0.0.5").public()
    assert set(public) == {"node_id", "host", "pid", "api_server", "mesh_point", "clients", "started_at"}


# --- node routing ------------------------------------------------------------------------------

def snapshot(v: int, listed: list, interest=(), consumers=()) -> mesh.Snapshot:
    return mesh.Snapshot(v, listed, list(interest), list(consumers))


def test_routing_updates_in_order():
    """Updates apply in version order and report node and topic changes."""
    routing = Routing(1)
    assert routing.apply_update(mesh.Update(1, nodes=nodes(1, 2))) == ({1, 2}, set(), set())
    assert routing.apply_update(mesh.Update(2, interest=[[2, "a", 1, 1]], consumers=[[2, "t", 5, 1, 1]])) \
        == (set(), set(), {"t"})
    assert routing.version == 2
    assert routing.peer_ids() == [2]
    assert routing.interested_peers(["a"]) == {2: ["a"]}
    assert routing.pick_consumer("t", 123) == (2, 5)


@pytest.mark.parametrize("version", [0, 1, 3])
def test_routing_old_update_ignored(version):
    """An update at or below the held version changes nothing."""
    routing = Routing(1)
    routing.load_snapshot(snapshot(3, nodes(1, 2), interest=[[2, "a", 1, 1]]))
    assert routing.apply_update(mesh.Update(version, nodes=nodes(1), dead=[2])) == (set(), set(), set())
    assert routing.version == 3
    assert set(routing.nodes) == {1, 2}
    assert routing.interested_peers(["a"]) == {2: ["a"]}


@pytest.mark.parametrize("version", [5, 6, 100])
def test_routing_gap_detected(version):
    """apply_update returns None on a gap and applies nothing."""
    routing = Routing(1)
    routing.load_snapshot(snapshot(3, nodes(1, 2)))
    assert routing.apply_update(mesh.Update(version, dead=[2], interest=[[2, "a", 1, 1]])) is None
    assert routing.version == 3
    assert routing.interested_peers(["a"]) == {}
    assert set(routing.nodes) == {1, 2}


def test_routing_dead_node():
    """A dead node's interest and consumers are forgotten and its topics reported."""
    routing = Routing(1)
    routing.load_snapshot(snapshot(1, nodes(1, 2, 3), interest=[[2, "a", 1, 1], [3, "a", 1, 1]],
                                   consumers=[[2, "t", 1, 1, 1], [3, "u", 1, 1, 1]]))
    added, removed, topics = routing.apply_update(mesh.Update(2, nodes=nodes(1, 3), dead=[2]))
    assert (added, removed) == (set(), {2})
    assert topics == {"t"}
    assert routing.interested_peers(["a"]) == {3: ["a"]}
    assert routing.pick_consumer("t", 1) is None
    assert routing.pick_consumer("u", 1) == (3, 1)


def test_routing_node_list_change_drops_removed():
    """A node missing from a new node list is dropped like a dead one."""
    routing = Routing(1)
    routing.load_snapshot(snapshot(1, nodes(1, 2), consumers=[[2, "t", 1, 1, 1]]))
    added, removed, topics = routing.apply_update(mesh.Update(2, nodes=nodes(1, 4)))
    assert (added, removed, topics) == ({4}, {2}, {"t"})
    assert routing.has_consumers("t") is False


def test_routing_snapshot_replaces_everything():
    """A snapshot replaces nodes, tables and version, and reports what changed."""
    routing = Routing(1)
    routing.load_snapshot(snapshot(4, nodes(1, 2, 3), interest=[[2, "a", 1, 1]],
                                   consumers=[[2, "t", 1, 1, 1]]))
    added, removed, topics = routing.load_snapshot(snapshot(9, nodes(1, 3, 5), consumers=[[5, "u", 1, 1, 1]]))
    assert (added, removed, topics) == ({5}, {2}, {"t", "u"})
    assert routing.version == 9
    assert routing.interested_peers(["a"]) == {}
    assert routing.pick_consumer("t", 1) is None
    assert routing.pick_consumer("u", 1) == (5, 1)
    assert routing.apply_update(mesh.Update(10)) == (set(), set(), set())
    assert routing.apply_update(mesh.Update(12)) is None


def test_routing_peer_changes_use_sequence_rule():
    """Changes from a peer and the same changes relayed later are applied once, newest wins."""
    routing = Routing(1)
    routing.load_snapshot(snapshot(1, nodes(1, 2)))
    assert routing.apply_changes(consumers=[[2, "t", 1, 1, 1]]) == {"t"}
    assert routing.apply_changes(consumers=[[2, "t", 1, 0, 2]]) == {"t"}
    changed = routing.apply_update(mesh.Update(2, consumers=[[2, "t", 1, 1, 1]]))
    assert changed == (set(), set(), set())
    assert routing.has_consumers("t") is False


def test_routing_interest_lookups():
    """interested_peers never names this node; interest_count is the largest count over the channels."""
    routing = Routing(1)
    routing.load_snapshot(snapshot(1, nodes(1, 2, 3),
                                   interest=[[1, "a", 4, 1], [2, "a", 1, 1], [2, "b", 6, 2], [3, "b", 2, 1]]))
    assert routing.interested_peers(["a", "b", "none"]) == {2: ["a", "b"], 3: ["b"]}
    assert routing.interested_peers(["none"]) == {}
    assert routing.interest_count(2, ["a", "b"]) == 6
    assert routing.interest_count(1, ["a"]) == 4
    assert routing.interest_count(3, ["a"]) == 0
    assert routing.interest_count(3, []) == 0


def consumer_routing(members) -> Routing:
    routing = Routing(1)
    routing.load_snapshot(snapshot(1, nodes(1, 2, 3),
                                   consumers=[[origin, "t", cid, 1, 1] for origin, cid in members]))
    return routing


def made_ids(count: int, node_id: int = 7) -> list:
    clock = {"now": 1_800_000_000_000}

    def tick():
        clock["now"] += 1
        return clock["now"] // 4

    generator = IdGenerator(node_id, clock=tick)
    return [generator.make() for _ in range(count)]


def test_pick_consumer_none_without_consumers():
    """No consumer of a topic means no pick."""
    assert Routing(1).pick_consumer("t", 5) is None


def test_pick_consumer_sticky():
    """While the set of consumers is unchanged, one client always maps to the same consumer."""
    routing = consumer_routing([(1, 1), (2, 1), (3, 4)])
    clients = made_ids(500)
    first = [routing.pick_consumer("t", c) for c in clients]
    for _ in range(3):
        assert [routing.pick_consumer("t", c) for c in clients] == first
    routing.apply_changes(interest=[[2, "a", 1, 5]], consumers=[[2, "other", 1, 1, 5]])
    assert [routing.pick_consumer("t", c) for c in clients] == first


def test_pick_consumer_independent_of_arrival_order():
    """Two nodes that learned the same consumers in different orders pick the same one."""
    members = [(1, 1), (2, 1), (3, 4), (2, 9)]
    forward, backward = consumer_routing(members), consumer_routing(members[::-1])
    for client_id in made_ids(300):
        assert forward.pick_consumer("t", client_id) == backward.pick_consumer("t", client_id)


@pytest.mark.parametrize("count", [2, 3, 5, 8])
def test_pick_consumer_spreads(count):
    """Many clients spread over all consumers, none getting far more or less than its share."""
    members = [(1 + index % 3, index) for index in range(count)]
    routing = consumer_routing(members)
    clients = made_ids(4000)
    spread = Counter(routing.pick_consumer("t", c) for c in clients)
    assert set(spread) == set(members)
    share = len(clients) / count
    assert all(0.7 * share < n < 1.3 * share for n in spread.values()), spread


def test_pick_consumer_follows_set_changes():
    """A new consumer takes part in picks; a removed one is never picked again."""
    routing = consumer_routing([(2, 1)])
    clients = made_ids(200)
    assert {routing.pick_consumer("t", c) for c in clients} == {(2, 1)}
    routing.apply_changes(consumers=[[3, "t", 1, 1, 2]])
    assert {routing.pick_consumer("t", c) for c in clients} == {(2, 1), (3, 1)}
    routing.apply_changes(consumers=[[2, "t", 1, 0, 3]])
    assert {routing.pick_consumer("t", c) for c in clients} == {(3, 1)}


def test_pick_consumer_passes_over_unreachable_peers():
    """With a peer's link down its consumers are passed over, the others' clients keep theirs; none left: None."""
    routing = consumer_routing([(1, 1), (2, 1), (3, 4)])
    clients = made_ids(300)
    first = {c: routing.pick_consumer("t", c) for c in clients}
    without_2 = {c: routing.pick_consumer("t", c, lambda node_id: node_id != 2) for c in clients}
    assert set(without_2.values()) == {(1, 1), (3, 4)}
    assert all(without_2[c] == first[c] for c in clients if first[c][0] != 2)
    assert all(routing.pick_consumer("t", c, lambda node_id: True) == first[c] for c in clients)
    # this node's own consumer is never passed over; with only unreachable peers there is none
    assert {routing.pick_consumer("t", c, lambda node_id: False) for c in clients} == {(1, 1)}
    assert consumer_routing([(2, 1), (3, 4)]).pick_consumer("t", clients[0], lambda node_id: False) is None


def test_forget_consumer():
    """A consumer its node said is gone is not picked before the advert arrives."""
    routing = consumer_routing([(2, 1), (3, 1)])
    clients = made_ids(100)
    assert {routing.pick_consumer("t", c) for c in clients} == {(2, 1), (3, 1)}
    routing.forget_consumer(2, "t", 1)
    assert {routing.pick_consumer("t", c) for c in clients} == {(3, 1)}
    routing.forget_consumer(3, "t", 1)
    assert routing.pick_consumer("t", clients[0]) is None
    assert routing.has_consumers("t") is False
    routing.forget_consumer(3, "t", 1)  # already gone: harmless


# --- tombstones -----------------------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_tombstones_refuse_stale_changes_then_are_forgotten():
    """A removed key refuses an older change for GRAVE_S seconds; after that it no longer takes memory."""
    clock = _Clock()
    state = InterestTable(clock=clock)
    for index in range(100):
        state.apply_interest(1, f"room-{index}", 1, 2 * index + 1)
        state.apply_interest(1, f"room-{index}", 0, 2 * index + 2)
        state.apply_consumer(1, "topic", index, True, 1000 + 2 * index)
        state.apply_consumer(1, "topic", index, False, 1001 + 2 * index)
    assert state.tracked_keys() == 200
    assert not state.apply_interest(1, "room-0", 1, 1)        # a late copy of the first change
    clock.now += GRAVE_S + 1
    assert state.bury() == 200
    assert state.tracked_keys() == 0
    assert state.interest == {} and state.consumers == {}


def test_tombstone_of_a_key_changed_again_is_kept():
    """A key removed, then re-added (and removed again later) keeps the newer sequence number."""
    clock = _Clock()
    state = InterestTable(clock=clock)
    state.apply_interest(1, "room", 1, 1)
    state.apply_interest(1, "room", 0, 2)
    clock.now += GRAVE_S / 2
    state.apply_interest(1, "room", 3, 3)
    clock.now += GRAVE_S / 2 + 1
    assert state.bury() == 0
    assert state.interest == {"room": {1: 3}}
    assert not state.apply_interest(1, "room", 0, 2)
    state.apply_interest(1, "room", 0, 4)
    clock.now += GRAVE_S / 2
    assert state.bury() == 0          # the second removal is only half as old as GRAVE_S
    assert not state.apply_interest(1, "room", 1, 3)
    clock.now += GRAVE_S
    assert state.bury() == 1 and state.tracked_keys() == 0


def test_routing_merge_after_coordinator_restart_keeps_unlisted_peers_until_expiry():
    """A restarted coordinator's partial snapshot adds and refreshes nodes; the others stay until expired."""
    routing = Routing(1)
    routing.load_snapshot(snapshot(5, nodes(1, 2, 3), interest=[[2, "a", 1, 10], [3, "b", 1, 10], [2, "gone", 1, 11]],
                                   consumers=[[3, "t", 7, 1, 12]]))
    # Node 2 is back with fresh state (it left "gone"); node 3 has not re-registered yet.
    added, removed, _ = routing.merge_snapshot(snapshot(1, nodes(1, 2), interest=[[2, "a", 2, 50]]), keep_until=100.0)
    assert added == set() and removed == set()
    assert set(routing.nodes) == {1, 2, 3}
    assert routing.interested_peers(["a", "b", "gone"]) == {2: ["a"], 3: ["b"]}
    assert routing.pick_consumer("t", 99) == (3, 7)
    assert routing.version == 1
    # A partial node list in an update only adds.
    assert routing.apply_update(mesh.Update(2, nodes=nodes(1, 2, 4)))[0] == {4}
    assert set(routing.nodes) == {1, 2, 3, 4}
    assert routing.expire_unconfirmed(now=50.0) == (set(), set(), set())
    added, removed, topics = routing.expire_unconfirmed(now=100.0)
    assert removed == {3} and topics == {"t"}
    assert set(routing.nodes) == {1, 2, 4} and routing.pick_consumer("t", 99) is None
    # Back to normal: a full list removes what it does not name.
    assert routing.apply_update(mesh.Update(3, nodes=nodes(1, 2)))[1] == {4}


def test_routing_node_back_with_a_new_mesh_point_is_reconnected():
    """A known node id listed with another mesh point counts as added (the link is opened again)."""
    routing = Routing(1)
    routing.load_snapshot(snapshot(1, nodes(1, 2)))
    moved = [info._replace(mesh_point="tcp://h:9999") if info.node_id == 2 else info for info in nodes(1, 2)]
    assert routing.apply_update(mesh.Update(2, nodes=moved))[0] == {2}


def test_routing_node_id_taken_by_a_new_process_forgets_the_old_one():
    """An id listed with another mesh point is a new process: the old one's interest, consumers and sequence
    numbers are forgotten, so the new one's first changes (low sequence numbers) are taken."""
    routing = Routing(1)
    routing.load_snapshot(snapshot(1, nodes(1, 2), interest=[[2, "a", 3, 40]], consumers=[[2, "t", 1, 0, 41]]))
    routing.merge_snapshot(snapshot(1, nodes(1)), keep_until=100.0)   # a coordinator restart: node 2 unconfirmed
    moved = [info._replace(mesh_point="tcp://h:9999") if info.node_id == 2 else info for info in nodes(1, 2)]
    added, removed, topics = routing.apply_update(mesh.Update(2, nodes=moved, consumers=[[2, "t", 1, 1, 1]]))
    assert added == {2} and "t" in topics
    assert routing.interested_peers(["a"]) == {}
    assert routing.pick_consumer("t", 5) == (2, 1)


def test_registry_refuses_a_bad_mesh_point():
    """A mesh point that is not tcp://HOST:PORT is refused for good (a misconfigured node.advertise)."""
    registry = Registry()
    for bad in ("tcp://http://h:1", "h:1", "tcp://host name:1", ""):
        with pytest.raises(RegistryError) as refused:
            registry.register(b"r", info(mesh_point=bad), now=0, wall_ms=0)
        assert not refused.value.retry


def test_registry_lists_a_node_as_its_mesh_entry():
    """What nodes learn of a node (NodeEntry) is what /v1/nodes lists, with the client count of its last heartbeat."""
    registry = Registry()
    node_id, _ = registry.register(b"r", INFO, now=0, wall_ms=0)
    registry.heartbeat(b"r", node_id, {"clients": 3, "cpu": 1.5}, now=1)
    [entry] = registry.entries()
    assert entry == mesh.NodeEntry(node_id, "h1", 100, "h1:6789", "tcp://h1:7000", 3, 1.5)
    assert registry.public_list() == [entry._asdict()]


def _lease(node_id: int, routing_id: bytes) -> str:
    return f"{node_id:02x}{routing_id.hex()}".ljust(64, "0")[:64]


def test_registry_with_leases_gives_an_id_back_only_to_its_holder():
    """With leases, an id not held right now goes back only to the process showing that id's lease for itself."""
    registry = Registry(lease_of=_lease)
    node_id, _ = registry.register(b"a", info(), now=0, wall_ms=0)           # a fresh node needs no lease
    assert registry.register(b"a", info(node_id=node_id), now=1, wall_ms=1)[0] == node_id   # its own, held
    restarted = Registry(lease_of=_lease)                                  # a coordinator restart
    for routing_id, lease in ((b"b", _lease(node_id, b"a")), (b"a", None), (b"a", _lease(node_id, b"b"))):
        with pytest.raises(RegistryError) as refused:
            restarted.register(routing_id, info(node_id=node_id, lease=lease), now=2, wall_ms=2)
        assert not refused.value.retry and "lease" in str(refused.value)
    assert restarted.register(b"a", info(node_id=node_id, lease=_lease(node_id, b"a")), now=3, wall_ms=3) \
        == (node_id, 0)
