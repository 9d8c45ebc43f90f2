"""meshgate: shared parts of every process (config, protocol, ids, mesh framing) and the CLI."""

__version__ = "0.1.0"
