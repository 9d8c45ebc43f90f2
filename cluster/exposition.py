"""A process's metrics in Prometheus' text format: one collector of its own and the process's figures.

Used by node/metrics.py (what a node sends the coordinator) and coordinator/metrics.py (/metrics).
"""

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest


class Exposition:
    """Args:
        collector: an object whose `collect()` yields prometheus_client metric families.
        namespace: the prefix of the process's CPU, memory, fd and start-time figures
            (`meshgate_node` gives `meshgate_node_process_cpu_seconds_total`).
    """

    def __init__(self, collector, namespace: str):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        ProcessCollector(namespace=namespace, registry=self.registry)

    def text(self) -> bytes:
        return generate_latest(self.registry)
