"""Per-topic bounded buffers and this node's consumers.

PURE: deques and dictionaries; no I/O. Owned by the node's IOLoop.

Messages pushed on this node wait here, as `(seq, ...)` tuples in arrival
order, while their topic has no consumer anywhere in the mesh
(docs/protocol.md, queue.pop delivery semantics): at most
`topic_size` per topic and `max_topics` topics; over either bound the push is
refused and counted, and what already waits is kept. All buffers of a node
together hold at most `max_bytes`. Events delivered to an at-least-once
consumer and not yet acknowledged (node/held.py) count against the same
bounds (`hold`), except `max_topics` (docs/protocol.md, Queue acknowledgements).
"""

from collections import deque


class QueueFull(Exception):
    """The topic's buffer (or the node's topic count or byte budget) is at its bound."""


class AlreadyConsuming(Exception):
    """The consumer already consumes one of the topics it asked for."""


class TooManyTopics(Exception):
    """The consumer would consume more topics than its limit."""


# Topics whose drops are counted by name (node/metrics.py shows the top ones); a bound, as topics come
# from entries and clients.
_DROP_TOPICS = 1000


class Buffers:
    """Args:
        topic_size: items per topic.
        max_topics: topics with waiting items.
        max_bytes: bytes of all waiting items together (a slow or absent consumer
            must not grow the node's memory without bound, however big the messages).
        size_of: the size in bytes of one item.
    """

    def __init__(self, topic_size: int, max_topics: int, max_bytes: int = 1 << 62, size_of=lambda item: 0):
        self.topic_size = topic_size
        self.max_topics = max_topics
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._topics = {}
        self.bytes = 0
        self.dropped = 0
        self.dropped_by = {}   # topic -> drops (the first _DROP_TOPICS topics by name; later ones as "other")
        self.held = {}         # topic -> its events held until acknowledged (not waiting here)
        self.held_bytes = 0

    def depth(self) -> int:
        return sum(len(queue) for queue in self._topics.values())

    def depths(self) -> dict:
        return {topic: len(queue) for topic, queue in self._topics.items()}

    def count_drop(self, topic: str) -> None:
        """One message of `topic` refused (here, or by the dispatch for a bound of its own)."""
        self.dropped += 1
        by = self.dropped_by
        if topic not in by and len(by) >= _DROP_TOPICS:
            topic = "other"
        by[topic] = by.get(topic, 0) + 1

    def waiting(self, topic: str) -> bool:
        queue = self._topics.get(topic)
        return bool(queue)

    def push(self, topic: str, item) -> None:
        """Appends at the tail.

        Raises:
            QueueFull: the topic holds `topic_size` items, or it is new and `max_topics` topics wait.
        """
        size = self._size_of(item)
        queue = self._topics.get(topic)
        self._check(topic, queue, size)
        if queue is None:
            if len(self._topics) >= self.max_topics:
                self.count_drop(topic)
                raise QueueFull(f"topic {topic!r}: node already buffers {self.max_topics} topics")
            queue = self._topics[topic] = deque()
        queue.append(item)
        self.bytes += size

    def admit(self, topic: str, size: int) -> None:
        """Checks a push that goes straight to a consumer while events of its topic are held.

        Raises:
            QueueFull: the topic's waiting and held events are `topic_size`, or the bytes `max_bytes`.
        """
        self._check(topic, self._topics.get(topic), size)

    def _check(self, topic: str, queue, size: int) -> None:
        if self.bytes + self.held_bytes + size > self.max_bytes:
            self.count_drop(topic)
            raise QueueFull(f"topic {topic!r}: the node's buffers hold {self.max_bytes} bytes already")
        if (len(queue) if queue else 0) + self.held.get(topic, 0) >= self.topic_size:
            self.count_drop(topic)
            raise QueueFull(f"topic {topic!r}: buffer full ({self.topic_size} messages)")

    def hold(self, topic: str, size: int) -> None:
        """One event of `topic` (`size` bytes) is held until acknowledged: it counts against the bounds."""
        self.held[topic] = self.held.get(topic, 0) + 1
        self.held_bytes += size

    def unhold(self, topic: str, size: int) -> None:
        """A held event was acknowledged, or comes back to wait (`put_back`)."""
        left = self.held[topic] - 1
        if left:
            self.held[topic] = left
        else:
            del self.held[topic]
        self.held_bytes -= size

    def put_back(self, topic: str, item) -> None:
        """Puts an item that could not be delivered back in arrival order.

        Items are tuples whose first element is their arrival sequence number.
        Everything that was handed out is older than everything still waiting,
        so the item goes in among the other returned ones at the head, before
        the first item that arrived after it. May exceed `topic_size` briefly.
        """
        queue = self._topics.setdefault(topic, deque())
        seq = item[0]
        index = 0
        for index, waiting in enumerate(queue):
            if waiting[0] > seq:
                break
        else:
            index = len(queue)
        queue.insert(index, item)
        self.bytes += self._size_of(item)

    def pop(self, topic: str):
        """Removes and returns the oldest item of `topic`, or None."""
        queue = self._topics.get(topic)
        if not queue:
            return None
        item = queue.popleft()
        self.bytes -= self._size_of(item)
        if not queue:
            del self._topics[topic]
        return item

    def topics(self) -> list:
        return list(self._topics)


class Consumers:
    """API connections of this node that consume topics (docs/protocol.md, queue.pop)."""

    def __init__(self, max_topics_per_consumer: int = 1000):
        self.max_topics_per_consumer = max_topics_per_consumer
        self.by_id = {}       # consumer_id -> connection
        self.topics = {}      # consumer_id -> set of topics
        self._next_id = 0

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def add(self, consumer_id: int, connection, topics: list, sibling: int = 0) -> list:
        """Adds topics to a consumer; returns them. Nothing changes on error.

        `sibling` is the connection's other consumer id, if any (an at-least-once consumer's and an
        at-most-once one's): the topics of both count together.

        Raises:
            AlreadyConsuming: it (or its sibling) already consumes one of them.
            TooManyTopics: it would consume more than `max_topics_per_consumer`.
        """
        current = self.topics.get(consumer_id, set())
        other = self.topics.get(sibling, ())
        if current.intersection(topics) or other and other.intersection(topics):
            raise AlreadyConsuming(f"consumer {consumer_id} already consumes one of {topics}")
        if len(current) + len(other) + len(topics) > self.max_topics_per_consumer:
            raise TooManyTopics(f"a consumer may consume at most {self.max_topics_per_consumer} topics")
        self.by_id[consumer_id] = connection
        self.topics[consumer_id] = current | set(topics)
        return topics

    def remove(self, consumer_id: int, topics=None) -> list:
        """Removes topics (all when None) of a consumer; returns the ones it had."""
        current = self.topics.get(consumer_id)
        if not current:
            return []
        gone = list(current) if topics is None else [t for t in topics if t in current]
        current.difference_update(gone)
        if not current:
            self.topics.pop(consumer_id, None)
            self.by_id.pop(consumer_id, None)
        return gone

    def connection(self, consumer_id: int, topic: str):
        """The connection of a consumer that still consumes `topic`, or None."""
        if topic in self.topics.get(consumer_id, ()):
            return self.by_id.get(consumer_id)
        return None

    def count(self) -> int:
        return len(self.by_id)
