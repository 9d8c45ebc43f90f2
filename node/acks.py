"""This node's at-least-once consumers: their windows, what each was written and has not acknowledged.

PURE: dictionaries; the caller passes `now`. Owned by the node's IOLoop.
(docs/protocol.md, Queue acknowledgements.)

Per consumer, at most `window` deliveries are outstanding: each is an event
some origin node holds (`origin`, its key `seq` there) written to the
consumer as attempt `attempt` under a delivery id. Ids are scoped to their
consumer: a connection acknowledges only what it was written, and an id it
was not given counts 0. A consumer's deliveries are kept in the order they
were written, which is also the order of their deadlines (one `ack_timeout`
per consumer), so the expired ones are always at the front.

An origin whose event found the window full is refused until it resumes
(`admit` with `resume`): events it sent before it heard of the refusal are
refused too, so none overtakes the first refused one. `rooms` names the
refused origins to tell once the window has room again.
"""

from collections import OrderedDict
from typing import NamedTuple


class Delivery(NamedTuple):
    origin: int       # the node that holds the event until it is acknowledged
    seq: int          # the event's key there
    attempt: int      # 1 the first time
    topic: str
    deadline: float   # monotonic seconds: released (delivered again) after it


class SettingsDiffer(Exception):
    """A connection's later at-least-once queue.pop asks for another window or ack_timeout."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class _Consumer:
    __slots__ = ("window", "ack_timeout", "deliveries", "refused")

    def __init__(self, window: int, ack_timeout: float):
        self.window = window
        self.ack_timeout = ack_timeout
        self.deliveries = OrderedDict()   # delivery id -> Delivery, in write (and deadline) order
        self.refused = {}                 # origin -> told of room already (refused until it resumes)


class AckTable:
    """Args:
        default_window, default_ack_timeout: what a consumer gets when it does not say.
    """

    def __init__(self, default_window: int, default_ack_timeout: float):
        self.default_window = default_window
        self.default_ack_timeout = default_ack_timeout
        self._consumers = {}   # consumer_id -> _Consumer
        self._made = 0         # delivery ids made (the next id is its successor, in hexadecimal)
        self.unacked = 0       # deliveries outstanding on every consumer of this node

    # --- consumers -----------------------------------------------------------------------

    def check(self, consumer_id: int, window, ack_timeout) -> None:
        """Raises SettingsDiffer when the consumer exists with another window or ack_timeout (None: any)."""
        consumer = self._consumers.get(consumer_id)
        if consumer is None:
            return
        if window is not None and window != consumer.window:
            raise SettingsDiffer("window", f"this connection consumes with window {consumer.window} already")
        if ack_timeout is not None and ack_timeout != consumer.ack_timeout:
            raise SettingsDiffer("ack_timeout", "this connection consumes with ack_timeout "
                                 f"{consumer.ack_timeout:g} already")

    def open(self, consumer_id: int, window=None, ack_timeout=None) -> None:
        """Makes the consumer, unless it exists (then `check` first)."""
        if consumer_id not in self._consumers:
            self._consumers[consumer_id] = _Consumer(window or self.default_window,
                                                     ack_timeout or self.default_ack_timeout)

    def has(self, consumer_id: int) -> bool:
        return consumer_id in self._consumers

    def ack_timeout(self, consumer_id: int) -> float:
        return self._consumers[consumer_id].ack_timeout

    def close(self, consumer_id: int) -> list:
        """Forgets a consumer; returns the deliveries it had outstanding (to deliver again)."""
        consumer = self._consumers.pop(consumer_id, None)
        if consumer is None:
            return []
        self.unacked -= len(consumer.deliveries)
        return list(consumer.deliveries.values())

    def release(self, consumer_id: int, topics) -> list:
        """Takes back the outstanding deliveries of `topics` (it stopped consuming them); returns them."""
        consumer = self._consumers.get(consumer_id)
        if consumer is None:
            return []
        topics = set(topics)
        gone = [(key, delivery) for key, delivery in consumer.deliveries.items() if delivery.topic in topics]
        for key, _ in gone:
            del consumer.deliveries[key]
        self.unacked -= len(gone)
        return [delivery for _, delivery in gone]

    # --- deliveries ----------------------------------------------------------------------

    def admit(self, consumer_id: int, origin: int, resume: bool) -> bool:
        """True when the consumer may be written one more event of `origin`; else `origin` is refused."""
        consumer = self._consumers[consumer_id]
        refused = consumer.refused
        if origin in refused:
            if not resume:
                return False
            del refused[origin]
        if len(consumer.deliveries) < consumer.window:
            return True
        refused[origin] = False
        return False

    def add(self, consumer_id: int, origin: int, seq: int, attempt: int, topic: str, now: float) -> str:
        """Records one event written to the consumer (after `admit`); returns its delivery id."""
        consumer = self._consumers[consumer_id]
        self._made += 1
        delivery_id = format(self._made, "x")
        consumer.deliveries[delivery_id] = Delivery(origin, seq, attempt, topic, now + consumer.ack_timeout)
        self.unacked += 1
        return delivery_id

    def drop(self, consumer_id: int, delivery_id: str) -> None:
        """Forgets a delivery that could not be written after all (its consumer may have closed meanwhile)."""
        consumer = self._consumers.get(consumer_id)
        if consumer is not None and consumer.deliveries.pop(delivery_id, None) is not None:
            self.unacked -= 1

    def ack(self, consumer_id: int, delivery_ids) -> list:
        """The consumer acknowledges `delivery_ids`; returns the deliveries that were outstanding among them."""
        consumer = self._consumers.get(consumer_id)
        if consumer is None:
            return []
        pop = consumer.deliveries.pop
        done = [delivery for delivery in map(lambda key: pop(key, None), delivery_ids) if delivery is not None]
        self.unacked -= len(done)
        return done

    def expired(self, now: float) -> list:
        """Takes back every delivery past its deadline; returns `(consumer_id, Delivery)` pairs."""
        late = []
        for consumer_id, consumer in self._consumers.items():
            deliveries = consumer.deliveries
            while deliveries:
                key = next(iter(deliveries))
                if deliveries[key].deadline > now:
                    break
                late.append((consumer_id, deliveries.pop(key)))
        self.unacked -= len(late)
        return late

    def rooms(self, consumer_id: int) -> list:
        """The refused origins to tell, once each, that the consumer's window has room."""
        consumer = self._consumers.get(consumer_id)
        if consumer is None or not consumer.refused or len(consumer.deliveries) >= consumer.window:
            return []
        told = [origin for origin, done in consumer.refused.items() if not done]
        for origin in told:
            consumer.refused[origin] = True
        return told

    def outstanding(self, consumer_id: int) -> int:
        consumer = self._consumers.get(consumer_id)
        return 0 if consumer is None else len(consumer.deliveries)
