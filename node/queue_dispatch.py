"""Which consumer gets which queue event, wherever it is in the mesh (docs/protocol.md, queue.pop).

Uses the pure parts next to it: node/queues.py (per-topic buffers, this
node's consumers) and node/routing.py (every consumer in the mesh, the pick
that keeps one client's messages on one consumer). An event goes straight to
its consumer when its topic has nothing waiting; otherwise it waits in arrival
order and is drained oldest first. At most once: an event written (or handed
to a peer that then did not answer) is not delivered again. Consumers whose
ids carry `mesh.ACK_CONSUMER` acknowledge their events: those go through
node/ack_dispatch.py, which holds them until then (docs/protocol.md, Queue
acknowledgements); the rest never touches it. Owned by the node's IOLoop.
"""

import asyncio

from cluster import mesh, protocol
from cluster.mesh import ACK_CONSUMER
from node.ack_dispatch import SENT, WAIT, AckDispatch
from node.clients import write_to_backend
from node.mesh_point import LinkDown, PeerTimeout
from node.queues import Buffers, Consumers, QueueFull

_DRAIN_BATCH = 10000
_RETRY_S = 0.05     # pause before handing out events again after a peer could not be reached
_PICK_TRIES = 64    # consumers tried for one event before it waits again
_HEAD_ROOM = 1024   # the request's header around an event


def _item(seq: int, client_id: int, event: bytes, attempt: int) -> tuple:
    """What waits in node/queues.py: the attempt only when it is not the first (node/held.py)."""
    return (seq, client_id, event) if attempt == 1 else (seq, client_id, event, attempt)


class QueueDispatch:
    """Args:
        queue: the node's QueueConfig (buffer bounds).
        routing: the node's Routing.
        mesh_point: the MeshPoint for consumers on other nodes.
        adverts: the node's Adverts (consumer changes are advertised).
        counters: the node's Counters.
    """

    def __init__(self, queue, routing, mesh_point, adverts, counters):
        self.routing = routing
        self.mesh_point = mesh_point
        self.adverts = adverts
        self.counters = counters
        self.buffers = Buffers(queue.topic_size, queue.max_topics, queue.max_bytes, size_of=lambda item: len(item[2]))
        self.consumers = Consumers()
        self.lost = 0          # events handed to a peer that did not answer in time
        self.in_flight = 0     # events handed to a peer, not answered yet (a draining node waits for them)
        self._arrivals = 0     # arrival sequence of pushes (keeps per-client order on retries)
        self.acks = AckDispatch(self)

    # --- pushes ------------------------------------------------------------------------

    def push(self, topic: str, client_id: int, data, holder: int = 0) -> None:
        """Pushes what a client sent (`data`, any JSON value) to a topic; the event's `n` is `holder`, the
        node that holds (or held) the client, when not this one.

        Raises:
            QueueFull: no consumer can take it now and the topic's buffer is full, or it is
                larger than the mesh carries.
        """
        event = protocol.queue_event(holder or self.routing.node_id, client_id, topic, data)
        if len(event) + _HEAD_ROOM > self.mesh_point.max_bytes:   # it could not reach a consumer on another node
            self.buffers.count_drop(topic)
            raise QueueFull(f"topic {topic!r}: a {len(event)}-byte event is larger than the mesh carries")
        self._arrivals += 1
        if self.buffers.waiting(topic) or not self.routing.has_consumers(topic):
            self.buffers.push(topic, (self._arrivals, client_id, event))
            if self.routing.has_consumers(topic):
                self.drain(topic)
            return
        if topic in self.buffers.held:   # events of it wait for acknowledgements: they count against its bounds
            self.buffers.admit(topic, len(event))
        self.dispatch(topic, self._arrivals, client_id, event)

    def dispatch(self, topic: str, seq: int, client_id: int, event: bytes, attempt: int = 1) -> bool:
        """Hands one event to the consumer its client maps to; puts it back in order when none can take it.

        `attempt` is above 1 for an event an at-least-once consumer had and did not acknowledge.
        """
        # Consumers behind a link that is down are passed over; with every link up there is nothing to ask.
        reachable = self.mesh_point.reachable if self.mesh_point.links.down_count else None
        for _ in range(_PICK_TRIES):
            target = self.routing.pick_consumer(topic, client_id, reachable)
            if target is None:
                break
            origin, consumer_id = target
            if consumer_id & ACK_CONSUMER:
                done = self.acks.dispatch(topic, seq, client_id, event, attempt, origin, consumer_id)
                if done is SENT:
                    return True
                if done is WAIT:
                    break
            elif origin != self.routing.node_id:
                item = _item(seq, client_id, event, attempt)
                self.in_flight += 1
                self.mesh_point.request(origin, mesh.queue_event_request(topic, consumer_id, event),
                                        then=lambda f: self._on_event_reply(f, topic, item, origin, consumer_id))
                return True
            elif self.write_local(consumer_id, topic, event):
                return True
            self.routing.forget_consumer(origin, topic, consumer_id)
        self.buffers.put_back(topic, _item(seq, client_id, event, attempt))
        return False

    def write_local(self, consumer_id: int, topic: str, event: bytes) -> bool:
        conn = self.consumers.connection(consumer_id, topic)
        if conn is None or not write_to_backend(conn, protocol.encode_ws_frame(event), self.counters):
            return False
        self.counters.queue_events += 1
        return True

    def _on_event_reply(self, future, topic: str, item: tuple, origin: int, consumer_id: int) -> None:
        self.in_flight -= 1
        error = future.exception()
        if isinstance(error, (PeerTimeout, LinkDown)):
            self.lost += 1   # at most once: it may have been written
            return
        if error is None and future.result() is True:
            return
        # Not there any more (or no link to its node): stop choosing it; its
        # node's advert or the coordinator will say the rest.
        self.routing.forget_consumer(origin, topic, consumer_id)
        self.buffers.put_back(topic, item)
        loop = asyncio.get_running_loop()
        if error is None:
            loop.call_soon(self.drain, topic)
        else:
            loop.call_later(_RETRY_S, self.drain, topic)

    def drain(self, topic: str) -> None:
        """Delivers what waits for `topic`, oldest first, while it has consumers."""
        for _ in range(_DRAIN_BATCH):
            if not self.routing.has_consumers(topic):
                return
            item = self.buffers.pop(topic)
            if item is None:
                return
            if not self.dispatch(topic, *item):
                return
        asyncio.get_running_loop().call_soon(self.drain, topic)

    def drain_all(self, topics) -> None:
        self.acks.on_routing()
        for topic in topics:
            self.drain(topic)

    # --- consumers ---------------------------------------------------------------------

    def consume(self, consumer_id: int, conn, topics: list, ack=None) -> None:
        """Registers a consumer's topics; what waits for them follows after the caller's reply.

        With `ack` (protocol.AckOptions) they are the connection's at-least-once consumer's, whose id is
        `consumer_id` with ACK_CONSUMER; one connection may consume other topics at most once.

        Raises:
            AlreadyConsuming, TooManyTopics (node/queues.py), SettingsDiffer (node/acks.py): nothing changed.
        """
        sibling = consumer_id | ACK_CONSUMER
        if ack is not None:
            consumer_id, sibling = sibling, consumer_id
            self.acks.table.check(consumer_id, ack.window, ack.ack_timeout)
        self.consumers.add(consumer_id, conn, topics, sibling)
        if ack is not None:
            self.acks.open(consumer_id, ack)
        self.adverts.consumers_changed(consumer_id, topics, True)
        loop = asyncio.get_running_loop()   # docs/protocol.md, queue.pop: the reply, then the events
        for topic in topics:
            loop.call_soon(self.drain, topic)

    def stop_consuming(self, consumer_id: int, topics=None) -> None:
        """Stops `topics` of a consumer (all when None); idempotent."""
        gone = self.consumers.remove(consumer_id, topics)
        if gone:
            self.adverts.consumers_changed(consumer_id, gone, False)
        acked = consumer_id | ACK_CONSUMER
        if self.acks.table.has(acked):
            gone = self.consumers.remove(acked, topics)
            if gone:
                self.adverts.consumers_changed(acked, gone, False)
            self.acks.stop(acked, gone, acked not in self.consumers.topics)

    def ack(self, consumer_id: int, delivery_ids: list) -> int:
        """queue.ack of the connection whose consumer id is `consumer_id`: how many were outstanding."""
        return self.acks.ack(consumer_id | ACK_CONSUMER, delivery_ids)

    def handle_queue_event(self, event: mesh.QueueEvent) -> bytes:
        """A peer hands an event to a consumer of this node."""
        return mesh.queue_event_result(self.write_local(event.consumer_id, event.topic, event.event))
