"""At-least-once queue delivery (docs/protocol.md, Queue acknowledgements): the tables, the mesh, the timers.

Two sides, both in every node:
- Origin: the node that received an event from its client holds it
  (node/held.py) while an at-least-once consumer, here or on another node,
  has it unacknowledged, and delivers it again, one attempt higher, when
  that consumer's node releases it (timeout, close, unpop), when that node
  stays silent past the consumer's `ack_timeout` plus a grace, or when it
  leaves the mesh. A consumer whose window is full gets nothing more from
  this node until it has room; what waits for it waits in node/queues.py.
- Consumer: this node's at-least-once consumers (node/acks.py): the window,
  the delivery ids (`k`) and attempts (`a`) written into their events,
  `queue.ack`, the deadlines. What becomes of an origin's events goes back to
  it in a `QACK` (or a call, when it is this node).

Nothing here is on the path of at-most-once consumers. Owned by the node's IOLoop.
"""

import asyncio
import time
from functools import partial

from tornado.ioloop import PeriodicCallback

from cluster import mesh, protocol
from node.acks import AckTable
from node.clients import write_to_backend
from node.held import Held
from node.mesh_point import PeerTimeout

SENT, WAIT, GONE = "sent", "wait", "gone"   # what `dispatch` did: handed over, the window is full, no consumer
_SWEEP_S = 0.1    # how often deadlines are looked at (ack_timeout is at least 1 s)
_PROBE_S = 1.0    # a target whose window was full is tried again after this long, room announced or not
_RETRY_S = 0.05   # pause before delivering again after a peer could not be reached


class AckDispatch:
    """Args:
        queues: the node's QueueDispatch (its buffers, consumers, routing, mesh point, counters, drain).
    """

    def __init__(self, queues):
        self.queues = queues
        self.routing = queues.routing
        self.mesh_point = queues.mesh_point
        self.counters = queues.counters
        self.table = AckTable(protocol.DEFAULT_WINDOW, protocol.DEFAULT_ACK_TIMEOUT)
        self.held = Held(queues.buffers)
        self.redeliveries = 0   # events this node handed out again, one attempt higher
        # How long past a consumer's ack_timeout its node may stay silent about an event: its own
        # release, sent at the deadline, must have had the time to arrive.
        self.grace = 2 * self.mesh_point.timeout + 1
        self._sweeper = None
        self._to_drain = set()

    def _start(self) -> None:
        if self._sweeper is None:
            self._sweeper = PeriodicCallback(self.sweep, _SWEEP_S * 1000)
            self._sweeper.start()

    # --- origin: handing out and taking back ---------------------------------------------

    def dispatch(self, topic: str, seq: int, client_id: int, event: bytes, attempt: int, node_id: int,
                 consumer_id: int) -> str:
        """Hands one event to the at-least-once consumer `(node_id, consumer_id)` and holds it: SENT, WAIT
        (its window is full: the caller puts the event back) or GONE (no such consumer)."""
        target = (node_id, consumer_id)
        held = self.held
        if target in held.blocked:
            return WAIT
        self._start()
        own = self.routing.node_id
        resume = held.take_resume(target)
        if node_id == own:
            status = self.deliver(topic, consumer_id, own, seq, attempt, resume, event)
            if status == mesh.WRITTEN:
                held.add(seq, topic, client_id, event, attempt, target)
                return SENT
            if status == mesh.FULL:
                self._block(target, topic)
                return WAIT
            return GONE
        entry = held.add(seq, topic, client_id, event, attempt, target)
        held.sent(target)
        future = self.mesh_point.request(node_id, mesh.queue_delivery_request(
            topic, consumer_id, own, seq, attempt, resume, event))
        future.add_done_callback(partial(self._on_reply, entry, not future.done()))
        return SENT

    def _on_reply(self, entry, sent: bool, future) -> None:
        """The consumer's node answered a QAEV (or it failed; `sent`: it may have been written)."""
        target, held = entry.target, self.held
        error = future.exception()
        result = None if error is not None else future.result()
        status = result.status if type(result) is mesh.DeliveryOutcome else None
        if status == mesh.WRITTEN:
            held.written(entry, time.monotonic() + result.ack_timeout + self.grace)
        elif status == mesh.FULL:
            if held.take(entry.seq, entry) is not None:
                self._wait_again(entry, entry.attempt)
            self._block(target, entry.topic)
        else:   # gone, or no usable answer: it may have been written (then it counts as an attempt)
            if not isinstance(error, PeerTimeout):   # as for at-most-once events: stop choosing it
                self.routing.forget_consumer(target[0], entry.topic, target[1])
            if held.take(entry.seq, entry) is not None:
                maybe_written = status is None and sent
                self._wait_again(entry, entry.attempt + 1 if maybe_written else entry.attempt)
                if status == mesh.GONE:
                    self._drain_soon((entry.topic,))
                else:
                    asyncio.get_running_loop().call_later(_RETRY_S, self.queues.drain, entry.topic)
        if held.answered(target):
            self._unblock(target)

    def _wait_again(self, entry, attempt: int) -> None:
        """A held event waits in node/queues.py again, in arrival order, to go out as `attempt`."""
        if attempt > entry.attempt:
            self.redeliveries += 1
        self.queues.buffers.put_back(entry.topic, entry.item(attempt))

    def on_acks(self, node_id: int, consumer_id: int, acked, released, room: bool) -> None:
        """What became of events this node handed to a consumer of node `node_id` (a QACK, or this node's own)."""
        held, target, topics = self.held, (node_id, consumer_id), set()
        for seq in acked:
            held.take(seq)
        for seq, attempt in released:
            entry = held.entries.get(seq)
            if entry is not None and entry.target == target and entry.attempt == attempt:
                held.take(seq)
                self._wait_again(entry, attempt + 1)
                topics.add(entry.topic)
        if room and held.room(target):
            self._unblock(target)
        self._drain_soon(topics)

    def handle_acks(self, message: mesh.QueueAcks) -> bytes:
        """A peer's QACK (cluster/mesh.py)."""
        self.on_acks(message.node, message.consumer_id, message.acked, message.released, message.room)
        return mesh.queue_acks_result()

    def on_routing(self) -> None:
        """After a routing change: what consumers of nodes that left the mesh had is delivered again."""
        if len(self.held):
            self._taken_back(self.held.on_nodes(self.routing.nodes))

    def _taken_back(self, entries: list) -> None:
        for entry in entries:
            self._wait_again(entry, entry.attempt + 1)
        self._drain_soon({entry.topic for entry in entries})

    # --- origin: flow --------------------------------------------------------------------

    def _block(self, target: tuple, topic: str) -> None:
        if self.held.block(target, topic):
            asyncio.get_running_loop().call_later(_PROBE_S, self._probe, target)

    def _probe(self, target: tuple) -> None:
        if self.held.room(target, announced=False):
            self._unblock(target)

    def _unblock(self, target: tuple) -> None:
        self._drain_soon(self.held.unblock(target))

    def _drain_soon(self, topics) -> None:
        if topics:
            if not self._to_drain:
                asyncio.get_running_loop().call_soon(self._drain)
            self._to_drain.update(topics)

    def _drain(self) -> None:
        topics, self._to_drain = self._to_drain, set()
        self.queues.drain_all(topics)

    # --- consumer side -------------------------------------------------------------------

    def deliver(self, topic: str, consumer_id: int, origin: int, seq: int, attempt: int, resume: bool,
                event: bytes) -> str:
        """Writes an event to an at-least-once consumer of this node: WRITTEN, FULL or GONE (cluster/mesh.py)."""
        conn = self.queues.consumers.connection(consumer_id, topic)
        table = self.table
        if conn is None or not table.has(consumer_id):
            return mesh.GONE
        if not table.admit(consumer_id, origin, resume):
            return mesh.FULL
        delivery_id = table.add(consumer_id, origin, seq, attempt, topic, time.monotonic())
        frame = protocol.encode_ws_frame(protocol.acked_event(event, delivery_id, attempt))
        if not write_to_backend(conn, frame, self.counters):
            table.drop(consumer_id, delivery_id)
            return mesh.GONE
        self.counters.queue_events += 1
        return mesh.WRITTEN

    def handle_delivery(self, message: mesh.QueueDelivery) -> bytes:
        """A peer's QAEV (cluster/mesh.py)."""
        status = self.deliver(message.topic, message.consumer_id, message.origin, message.seq, message.attempt,
                              message.resume, message.event)
        timeout = self.table.ack_timeout(message.consumer_id) if status == mesh.WRITTEN else 0.0
        return mesh.queue_delivery_result(status, timeout)

    def open(self, consumer_id: int, options: protocol.AckOptions) -> None:
        self.table.open(consumer_id, options.window, options.ack_timeout)
        self._start()

    def stop(self, consumer_id: int, topics: list, closed: bool) -> None:
        """The consumer stopped `topics` (`closed`: all it had): what it has unacknowledged of them is released."""
        table = self.table
        released = table.close(consumer_id) if closed else table.release(consumer_id, topics)
        self._report(consumer_id, released=released)

    def ack(self, consumer_id: int, delivery_ids: list) -> int:
        """queue.ack: returns how many of `delivery_ids` were outstanding on the consumer."""
        done = self.table.ack(consumer_id, delivery_ids)
        self._report(consumer_id, acked=done)
        return len(done)

    def _report(self, consumer_id: int, acked=(), released=()) -> None:
        """Tells each origin what became of its events, and the refused ones whether there is room now."""
        news = {}   # origin -> [acked keys, released (key, attempt), room]
        for delivery in acked:
            news.setdefault(delivery.origin, [[], [], False])[0].append(delivery.seq)
        for delivery in released:
            news.setdefault(delivery.origin, [[], [], False])[1].append((delivery.seq, delivery.attempt))
        for origin in self.table.rooms(consumer_id):
            news.setdefault(origin, [[], [], False])[2] = True
        own = self.routing.node_id
        for origin, (keys, pairs, room) in news.items():
            if origin == own:
                self.on_acks(own, consumer_id, keys, pairs, room)
            else:
                self.mesh_point.notify(origin, mesh.queue_acks_request(own, consumer_id, keys, pairs, room))

    # --- deadlines -----------------------------------------------------------------------

    def sweep(self) -> None:
        """Releases what consumers here did not acknowledge in time; takes back what silent nodes had."""
        now = time.monotonic()
        late = {}
        for consumer_id, delivery in self.table.expired(now):
            late.setdefault(consumer_id, []).append(delivery)
        for consumer_id, deliveries in late.items():
            self._report(consumer_id, released=deliveries)
        if len(self.held):
            self._taken_back(self.held.expired(now))

    def unacked(self) -> int:
        """Events this node holds until a consumer acknowledges them."""
        return len(self.held)
