"""Snowflake-style client ids: millisecond timestamp, node id, sequence.

PURE: no I/O; the generator takes the clock as a function so tests can step it.

Layout (64 bits, exchanged with backends: never change):

    | 1 bit zero | 41 bits ms since EPOCH_MS | 10 bits node id | 12 bits sequence |

The owning node is read from the id (`node_id_of`). Ids from one generator
strictly increase. When the clock steps back the generator keeps its own
logical time (the last timestamp it used) and borrows from the sequence; when
the sequence of a millisecond runs out it moves its logical time forward one
millisecond instead of waiting. Across restarts of a node id, the coordinator
hands the new process `not_before_ms` (the last time the previous holder of
that id may have used), so a clock that went back between two processes cannot
repeat an id either.
"""

import time
from typing import Callable

EPOCH_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z
NODE_BITS = 10
SEQUENCE_BITS = 12
MAX_NODE_ID = (1 << NODE_BITS) - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
_TIME_SHIFT = NODE_BITS + SEQUENCE_BITS
MAX_ID_MS = EPOCH_MS + (1 << (63 - _TIME_SHIFT)) - 1   # the last millisecond an id can hold


def now_ms() -> int:
    return int(time.time() * 1000)


class IdGenerator:
    """Makes unique client ids for one node.

    Owned by the node's IOLoop: not thread-safe.

    Args:
        node_id: 1..1023.
        not_before_ms: unix milliseconds the generator's logical time starts after.
        clock: returns unix milliseconds.
    """

    def __init__(self, node_id: int, not_before_ms: int = 0, clock: Callable[[], int] = now_ms):
        if isinstance(node_id, bool) or not isinstance(node_id, int) or not 1 <= node_id <= MAX_NODE_ID:
            raise ValueError(f"node_id must be 1..{MAX_NODE_ID}")
        if not 0 <= not_before_ms < MAX_ID_MS:
            raise ValueError(f"not_before_ms must be 0..{MAX_ID_MS - 1}")
        self.node_id = node_id
        self._clock = clock
        self._last_ms = max(not_before_ms, EPOCH_MS)
        self._sequence = MAX_SEQUENCE  # first id moves to a fresh millisecond

    @property
    def last_ms(self) -> int:
        """The logical time of the last id made (unix ms)."""
        return self._last_ms

    def make(self) -> int:
        """Returns the next client id."""
        current = self._clock()
        if current > self._last_ms:
            self._last_ms = current
            self._sequence = 0
        elif self._sequence < MAX_SEQUENCE:
            self._sequence += 1
        else:
            self._last_ms += 1
            self._sequence = 0
        return ((self._last_ms - EPOCH_MS) << _TIME_SHIFT) | (self.node_id << SEQUENCE_BITS) | self._sequence


def node_id_of(client_id: int) -> int:
    """The node id inside a client id."""
    return (client_id >> SEQUENCE_BITS) & MAX_NODE_ID


def timestamp_ms_of(client_id: int) -> int:
    """The unix millisecond timestamp inside a client id."""
    return (client_id >> _TIME_SHIFT) + EPOCH_MS


def to_wire(client_id: int) -> str:
    """Client ids are always emitted as decimal strings (docs/protocol.md, Identifiers)."""
    return str(client_id)
