"""This node's metrics in Prometheus' terms (docs/operations.md, Metrics).

The hot paths only count: plain integers (node/clients.py `Counters`) and
`Timings`, a bucket array per label set and one bisect per observation
(prometheus_client's own Histogram takes a lock and walks its buckets each
time). `node_metrics(node)` turns them and the node's live figures into
prometheus_client metric families and its text format, once a second
(node/coordinator_link.py sends it to the coordinator, whose /metrics shows
every node with `node_id` and `host` labels). Owned by the node's IOLoop.
"""

import bisect
import time
from functools import partial

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from cluster import __version__, speedups
from cluster.exposition import Exposition

# Upper bounds (seconds) of every duration histogram: half a millisecond to ten seconds.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BOUNDS = tuple(floatToGoString(bound) for bound in BUCKETS) + ("+Inf",)
# Per-topic series: the busiest topics by name, the rest summed as topic="other" (bounded cardinality).
TOP_TOPICS = 10
OTHER = "other"
# The `route` of an API request: answered by this node alone, or after waiting for a peer.
LOCAL, FORWARDED = "local", "forwarded"


def observe(series: dict, labels: tuple, seconds: float) -> None:
    """One duration into `series[labels]` (made when it is the first): its sum, and a count in the
    first bucket whose bound is not below it. (cluster/_speedups.c has the same function in C.)"""
    counts = series.get(labels)
    if counts is None:
        counts = series[labels] = [0.0] * (len(BUCKETS) + 2)
    counts[0] += seconds
    counts[1 + bisect.bisect_left(BUCKETS, seconds)] += 1   # a duration equal to a bound is in its bucket


observe_python = observe
if speedups.native is not None:
    speedups.native.set_buckets(BUCKETS)
    speedups.native.set_python("observe", observe_python)
    observe = speedups.native.observe


class Timings:
    """Durations by label values: per label tuple, its sum and a count per bucket.

    `observe(labels, seconds)` adds one (it runs once or twice per request: `observe` bound to the
    series, no Python frame of its own when the C version is there).
    """
    __slots__ = ("series", "observe")

    def __init__(self):
        self.series = {}   # label tuple -> [sum, count in bucket 0, ..., count over the last bound]
        self.observe = partial(observe, self.series)

    def family(self, name: str, documentation: str, label_names: tuple) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=label_names)
        for labels, series in sorted(self.series.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(_BOUNDS, series[1:]):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([str(label) for label in labels], buckets, series[0])
        return family


class Requests:
    """API requests: how many by method, transport and result, and how long, local or forwarded.

    One series per (method, ws, code, route) as they come, with no label made per request (this runs
    for every request); `counts` and `durations` turn them into Prometheus' label sets when read.
    """

    def __init__(self, methods):
        self.methods = frozenset(methods)
        self._series = Timings()   # (method, ws, code, route) -> durations; route None: refused, not timed

    def done(self, method: str, ws: bool, code, route: str, started: float) -> float:
        """One request answered: `code` None (success) or its ErrorCode; `started` its time.monotonic().
        Returns how long it took."""
        seconds = time.monotonic() - started
        self._series.observe((method if method in self.methods else "unknown", ws, code, route), seconds)
        return seconds

    def refused(self, method, ws: bool, code) -> None:
        """One request its transport refused before it ran (counted, not timed)."""
        self._series.observe((method if method in self.methods else "unknown", ws, code, None), 0.0)

    @property
    def counts(self) -> dict:
        """(method, transport, result) -> requests."""
        counts = {}
        for (method, ws, code, _), series in self._series.series.items():
            key = (method, "ws" if ws else "http", "ok" if code is None else str(int(code)))
            counts[key] = counts.get(key, 0) + int(sum(series[1:]))
        return counts

    @property
    def durations(self) -> Timings:
        """(method, route) -> durations of the requests that ran."""
        merged = Timings()
        for (method, _, _, route), series in self._series.series.items():
            if route is None:
                continue
            into = merged.series.setdefault((method, route), [0.0] * len(series))
            for index, value in enumerate(series):
                into[index] += value
        return merged


def top(figures: dict) -> list:
    """`(topic, figure)` of the TOP_TOPICS largest, then ("other", the rest summed) if any."""
    ranked = sorted(figures.items(), key=lambda item: (-item[1], item[0]))
    rows = ranked[:TOP_TOPICS]
    rest = sum(figure for _, figure in ranked[TOP_TOPICS:])
    if len(ranked) > TOP_TOPICS:
        rows.append((OTHER, rest))
    return rows


def _gauge(name: str, documentation: str, value=None, labels=(), rows=()) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, value, labels=labels or None)
    for row in rows:
        family.add_metric(row[:-1], row[-1])
    return family


def _counter(name: str, documentation: str, value=None, labels=(), rows=()) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, value, labels=labels or None)
    for row in rows:
        family.add_metric(row[:-1], row[-1])
    return family


class _NodeCollector:
    """The node's families, read from its parts when the exposition is made."""

    def __init__(self, node):
        self.node = node

    def collect(self):
        node = self.node
        counters, hub, queues, mesh_point = node.counters, node.hub, node.queues, node.mesh_point
        servers = {server.path: 0 for server in node.config.node.servers}
        servers.update(node.connections_by_server)
        yield _gauge("meshgate_node_info", "This node process (value 1), labelled with its version.",
                     labels=("version",), rows=[(__version__, 1)])
        yield _gauge("meshgate_connections", "Client WebSocket connections open on this node, per server path.",
                     labels=("server",), rows=sorted(servers.items()))
        yield _gauge("meshgate_api_connections", "Backend /ws/v1 connections open on this node.",
                     len(node.api_sockets))
        yield _gauge("meshgate_channels", "Channels with at least one subscriber on this node.", len(hub.subs))
        yield _gauge("meshgate_subscriptions", "Channel subscriptions of this node's clients.",
                     sum(len(members) for members in hub.subs.values()))
        yield _gauge("meshgate_consumers", "Queue consumers (/ws/v1 connections in queue.pop) on this node.",
                     queues.consumers.count())
        yield _gauge("meshgate_peers", "Other nodes this node has a mesh link to.", len(mesh_point.connected()))
        yield _gauge("meshgate_local_peers", "Peers on this host whose mesh messages go over a local link "
                     "(a Unix socket) rather than ZeroMQ.", mesh_point.links.local_count())
        buffers = queues.buffers
        yield _gauge("meshgate_queue_depth", "Queue events waiting on this node for a consumer, per topic "
                     f"(the {TOP_TOPICS} deepest; the rest as topic=\"other\").",
                     labels=("topic",), rows=top(buffers.depths()))
        yield _gauge("meshgate_queue_buffered_bytes", "Bytes of queue events waiting on this node.", buffers.bytes)
        yield _counter("meshgate_queue_dropped", "Queue events refused because a bound was reached, per topic "
                       f"(the {TOP_TOPICS} with most; the rest as topic=\"other\").",
                       labels=("topic",), rows=top(buffers.dropped_by))
        yield _counter("meshgate_queue_events_lost", "Queue events handed to a peer that did not answer in "
                       "time (maybe written, never retried).", queues.lost)
        yield _gauge("meshgate_queue_unacked", "Queue events this node holds until an at-least-once consumer "
                     "acknowledges them (they count against the topic bounds).", queues.acks.unacked())
        yield _counter("meshgate_queue_redeliveries", "Queue events this node delivered again, one attempt "
                       "higher: not acknowledged in time, or their consumer closed or stopped first.",
                       queues.acks.redeliveries)
        yield _counter("meshgate_messages", "Messages this node handled, by kind: client_message (received "
                       "from a client), send (written to one client), publish (fanned out to this node's "
                       "subscribers), queue_event (written to a consumer).",
                       labels=("kind",), rows=[("client_message", counters.in_total), ("send", counters.sends),
                                               ("publish", counters.publishes),
                                               ("queue_event", counters.queue_events)])
        yield _counter("meshgate_frames_written", "WebSocket frames handed to clients and consumers.",
                       counters.out_total)
        requests = node.api.requests
        yield _counter("meshgate_api_requests", "Backend API requests answered by this node, by method, "
                       "transport (http, ws) and result (ok or the error code).",
                       labels=("method", "transport", "result"),
                       rows=[(*key, count) for key, count in sorted(requests.counts.items())])
        yield requests.durations.family(
            "meshgate_api_request_duration_seconds", "Time from a backend API request to its answer, by method "
            "and route: local (answered by this node) or forwarded (waited for a peer).", ("method", "route"))
        yield mesh_point.round_trips.family(
            "meshgate_forward_round_trip_seconds", "Time from a request to a peer to its reply, per peer node.",
            ("peer",))
        yield counters.fanout.family(
            "meshgate_publish_fanout_duration_seconds", "Time to hand one publish to this node's subscribers "
            "(the writes leave within a few loop turns, node/clients.py).", ())
        yield counters.hooks.family("meshgate_hook_duration_seconds", "Time an entry hook took, by hook "
                                    "(a coroutine: until it returned).", ("hook",))
        yield _counter("meshgate_hook_errors", "Entry hooks that raised.", counters.hook_errors)
        yield _counter("meshgate_forward_timeouts", "Requests to a peer unanswered within node.forward_timeout.",
                       mesh_point.timeouts)
        yield _counter("meshgate_slow_client_closes", "Connections closed 1008 because their write buffer was "
                       "over its limit.", counters.slow_closed)
        yield _counter("meshgate_limit_closes", "Client connections closed for breaking a limit or the "
                       "protocol (size, rate, idle time, frames).", counters.limit_closed)
        yield _counter("meshgate_client_handshakes_refused", "Client WebSocket handshakes refused (401, 431, "
                       "503).", counters.handshakes_refused)
        yield _counter("meshgate_auth_failures", "Credentials refused, by port: api (HTTP basic on the "
                       "backend API) or client (a client server's token).", labels=("port",),
                       rows=[("api", node.access.refused), ("client", counters.client_auth_refused)])
        yield _counter("meshgate_mesh_messages_refused", "Messages from peers or the coordinator dropped "
                       "because they could not be read.", mesh_point.refused + node.link.refused)
        yield _counter("meshgate_mesh_handshakes_refused", "Mesh handshakes refused (another cluster key, "
                       "or a local link that broke its rules).", node.handshakes_refused())


def node_metrics(node) -> Exposition:
    """The node's families and its process's (CPU seconds, memory, fds, start time)."""
    return Exposition(_NodeCollector(node), "meshgate_node")
