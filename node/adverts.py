"""What this node tells the mesh about itself: sequence numbers, coalesced changes, full state.

Interest (subscriber counts per channel) and consumers change on this node
only; each change carries the next number of this node's sequence
(cluster/interest_table.py). Peers hear of a channel's first subscriber or
last leaving, and of every consumer change, at once and directly; the
coordinator gets everything (and opened/closed clients) coalesced every
few milliseconds. Owned by the node's IOLoop.
"""

import asyncio

from cluster import mesh

FLUSH_S = 0.02
_PEER_ADVERT_ITEMS = 10000   # changes per advert when a peer is told everything (each well within the mesh bound)


class Adverts:
    """Args:
        routing: the node's Routing (peers to tell; this node's own consumers go in too).
        mesh_point: the MeshPoint to reach peers.
        forward_timeout: seconds; a silent peer is waited for at most half of it.
        to_coordinator: sends a `mesh.Advert` to the coordinator.
    """

    def __init__(self, routing, mesh_point, forward_timeout: float, to_coordinator):
        self.routing = routing
        self.mesh_point = mesh_point
        self.forward_timeout = forward_timeout
        self.to_coordinator = to_coordinator
        self._seq = 0
        self._interest = {}       # channel -> subscriber count not yet flushed
        self._consumers = []
        self._opened = []
        self._closed = []
        self._watched = []
        self._flush_handle = None
        self._interest_waits = {}  # channel -> future of the peers' acknowledgements

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def full_state(self, subscriptions: dict, consumers: dict, clients, watched: list) -> mesh.NodeState:
        """Everything this node advertises, for a (re-)registration.

        Args:
            subscriptions: channel -> its local subscribers.
            consumers: consumer_id -> its topics.
            clients: ids of the local clients.
            watched: `[client_id, lifecycle topic]` of those whose open message was pushed.
        """
        return mesh.NodeState(
            [[channel, len(members), self.next_seq()] for channel, members in subscriptions.items()],
            [[topic, consumer_id, 1, self.next_seq()] for consumer_id, topics in consumers.items() for topic in topics],
            list(clients), watched or None)

    # --- changes -----------------------------------------------------------------

    def client_opened(self, client_id: int) -> None:
        self._opened.append(client_id)
        self._schedule_flush()

    def client_closed(self, client_id: int) -> None:
        self._closed.append(client_id)
        self._schedule_flush()

    def client_watched(self, client_id: int, topic: str) -> None:
        """The client's open message went to lifecycle `topic`: if this node dies, another pushes its close."""
        self._watched.append([client_id, topic])
        self._schedule_flush()

    def interest_changed(self, changes: list) -> list:
        """Records `(channel, count)` changes; returns futures to await before a subscribe may reply.

        A channel's first subscriber (or its last leaving) is told to every
        peer at once, all channels of one call in one advert per peer; the
        first kind is acknowledged (docs/protocol.md, conn.call: once
        `subscribe` has replied, a publish from any node reaches the
        connection). Counts reach the coordinator in the next flush.
        """
        waits, gained, lost = [], [], []
        for channel, count in changes:
            self._interest[channel] = count
            if count == 1:
                gained.append([channel, 1, self.next_seq()])
            elif count == 0:
                lost.append([channel, 0, self.next_seq()])
            else:
                wait = self._interest_waits.get(channel)
                if wait is not None:
                    waits.append(wait)
        peers = self.routing.peer_ids()
        if lost:
            advert = mesh.advert_request(self.routing.node_id, interest=lost)
            for peer in peers:
                self.mesh_point.notify(peer, advert)
        if gained:
            advert = mesh.advert_request(self.routing.node_id, interest=gained)
            # A silent peer is waited for at most half the forward timeout: it is
            # likely dead, and a dead peer cannot publish.
            wait = asyncio.gather(*[self.mesh_point.request(peer, advert, timeout=self.forward_timeout / 2)
                                    for peer in peers], return_exceptions=True)
            names = [channel for channel, _, _ in gained]
            for channel in names:
                self._interest_waits[channel] = wait
            wait.add_done_callback(lambda _: self._forget_waits(names, wait))
            waits.append(wait)
        if changes:
            self._schedule_flush()
        return waits

    def _forget_waits(self, channels: list, wait) -> None:
        for channel in channels:
            if self._interest_waits.get(channel) is wait:
                del self._interest_waits[channel]

    def consumers_changed(self, consumer_id: int, topics: list, present: bool) -> None:
        """A local consumer took or left `topics`: this node's routing, every peer and the coordinator learn it."""
        items = [[topic, consumer_id, int(present), self.next_seq()] for topic in topics]
        node_id = self.routing.node_id
        self.routing.apply_changes((), [[node_id, *item] for item in items])
        advert = mesh.advert_request(node_id, consumers=items)
        for peer in self.routing.peer_ids():
            self.mesh_point.notify(peer, advert)
        self._consumers.extend(items)
        self._schedule_flush()

    def tell_peer(self, peer: int, state: mesh.NodeState) -> None:
        """Tells one peer everything this node advertises (`full_state`): its mesh link is back after a drop,
        and what was told meanwhile did not reach it."""
        origin = self.routing.node_id
        interest, consumers = list(state.interest), list(state.consumers)
        while interest or consumers:
            self.mesh_point.notify(peer, mesh.advert_request(origin, interest[:_PEER_ADVERT_ITEMS],
                                                             consumers[:_PEER_ADVERT_ITEMS]))
            del interest[:_PEER_ADVERT_ITEMS], consumers[:_PEER_ADVERT_ITEMS]

    def handle_peer_advert(self, advert: mesh.PeerAdvert) -> set:
        """Applies what a peer said of itself; returns the topics whose consumers changed."""
        origin = advert.origin
        if origin not in self.routing.nodes:
            # A node we do not know, and so cannot reach: nothing it says is kept (the coordinator relays
            # the same changes once it lists that node), so a key holder cannot fill this table.
            return set()
        return self.routing.apply_changes([[origin, *item] for item in advert.interest],
                                          [[origin, *item] for item in advert.consumers])

    # --- to the coordinator ---------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        """Sends the coalesced changes of the last few milliseconds to the coordinator."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not (self._interest or self._consumers or self._opened or self._closed or self._watched):
            return
        interest = [[channel, count, self.next_seq()] for channel, count in self._interest.items()]
        advert = mesh.Advert(interest, self._consumers, self._opened, self._closed, self._watched or None)
        self._interest, self._consumers, self._opened, self._closed, self._watched = {}, [], [], [], []
        self.to_coordinator(advert)
