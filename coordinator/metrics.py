"""The coordinator's /metrics: every live node's metrics and its own, in one scrape.

Each node sends its metrics (node/metrics.py) once a second; the registry
keeps the latest text (coordinator/registry.py). A scrape parses them with
prometheus_client's parser (what a node sent is checked before it is used:
only `meshgate_` families of a known type), labels every sample with the node's `node_id` and `host` (whatever
labels of those names the text had are replaced), merges the nodes' families
by name, and adds the coordinator's own. A node whose text cannot be parsed
is left out of that scrape, counted and logged (throttled).
"""

import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from cluster import __version__
from cluster.exposition import Exposition
from cluster.logs import Throttled

log = logging.getLogger("meshgate.coordinator")

PREFIX = "meshgate_"
_TYPES = frozenset(("counter", "gauge", "histogram"))


class BadMetrics(ValueError):
    pass


def node_families(text: str) -> list:
    """The metric families of one node's text, checked.

    Raises:
        BadMetrics: the text does not parse, or a family is not meshgate's or not of a known type
            (an untyped sample is a family of unknown type).
    """
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:   # the parser raises ValueError and friends on any malformed line
        raise BadMetrics(f"unreadable: {exc}") from None
    for family in families:   # the parser names each sample after its family, or makes an untyped family of it
        if not family.name.startswith(PREFIX) or family.type not in _TYPES:
            raise BadMetrics(f"family {family.name[:80]!r} of type {family.type!r} is not one of meshgate's")
    return families


class ClusterCollector:
    """Every live node's families (labels node_id and host) and the coordinator's own.

    Args:
        control: the coordinator's Control (its registry, tables and refusal counts).
    """

    def __init__(self, control):
        self.control = control
        self.unreadable = 0   # node metrics left out of a scrape because they did not parse
        self._bad_log = Throttled(log)

    def collect(self):
        merged = {}
        for info in sorted(self.control.registry.nodes.values(), key=lambda i: i.node_id):
            if not info.metrics:
                continue   # registered less than a second ago
            try:
                families = node_families(info.metrics)
            except BadMetrics as exc:
                self.unreadable += 1
                self._bad_log.warning("metrics of node %d left out: %s", info.node_id, exc)
                continue
            labels = {"node_id": str(info.node_id), "host": info.host}
            for family in families:
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type)
                elif into.type != family.type:
                    continue   # nodes of two versions disagree: the first node's family stands
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, **labels}, sample.value)
        yield from merged.values()
        yield from self._own()

    def _own(self):
        control = self.control
        info = GaugeMetricFamily("meshgate_coordinator_info", "The coordinator (value 1), labelled with its version.",
                                 labels=("version",))
        info.add_metric((__version__,), 1)
        yield info
        yield GaugeMetricFamily("meshgate_nodes", "Live nodes the coordinator knows.", len(control.registry.nodes))
        yield GaugeMetricFamily("meshgate_coordinator_tables_version", "Version of the cluster's routing tables "
                                "(grows with every change).", control.tables.version)
        yield CounterMetricFamily("meshgate_coordinator_messages_refused", "Control messages from nodes dropped "
                                  "because they could not be read.", control.refused)
        yield CounterMetricFamily("meshgate_coordinator_handshakes_refused", "Registry handshakes refused "
                                  "(another cluster key).", control.zap.refused)
        yield CounterMetricFamily("meshgate_coordinator_node_metrics_unreadable", "Node metrics left out of a "
                                  "scrape because they could not be parsed.", self.unreadable)


def cluster_metrics(control) -> Exposition:
    """/metrics: ClusterCollector and the coordinator process's own figures."""
    return Exposition(ClusterCollector(control), "meshgate_coordinator")
