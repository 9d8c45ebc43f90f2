"""Configuration: YAML -> defaults -> validated frozen dataclasses.

Every key is optional (docs/configuration.md). Unknown keys and wrong types
are refused with the key's path, e.g. `node.servers[0].port: expected an integer`.
No sockets here; reading the one file is the only I/O.
"""

import dataclasses
import ipaddress
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from cluster.access import HostPattern
from cluster.protocol import ApiError, parse_name


class ConfigError(ValueError):
    """The configuration is invalid; the message starts with the key's path."""


def _meta(**checks) -> dict:
    return {"checks": checks}


@dataclass(frozen=True)
class LoggingConfig:
    level: str = field(default="info", metadata=_meta(choices=("debug", "info", "warning", "error")))
    format: str = field(default="text", metadata=_meta(choices=("text", "json")))


@dataclass(frozen=True)
class UserConfig:
    username: str = field(default="", metadata=_meta(nonempty=True))
    password: str = ""
    roles: list = field(default_factory=lambda: ["read", "write"], metadata=_meta(items=str, choices=("read", "write")))
    host: str = "*"


@dataclass(frozen=True)
class AccessConfig:
    users: list = field(default_factory=list, metadata=_meta(items=UserConfig))
    # `meshgate keygen -o FILE`; None with `meshgate start` = a fresh key per run (relative to this file)
    cluster_key_file: Optional[str] = field(default=None, metadata=_meta(nonempty=True))


@dataclass(frozen=True)
class TlsConfig:
    """A listener that speaks TLS only (files relative to the configuration file; re-read on SIGHUP)."""
    cert_file: str = field(default="", metadata=_meta(required=True, nonempty=True))
    key_file: str = field(default="", metadata=_meta(required=True, nonempty=True))


@dataclass(frozen=True)
class Listen:
    bind: str = "127.0.0.1"
    port: int = field(default=0, metadata=_meta(min=0, max=65535))


@dataclass(frozen=True)
class CoordinatorApiConfig:
    bind: str = "127.0.0.1"
    port: int = field(default=6787, metadata=_meta(min=0, max=65535))
    tls: Optional[TlsConfig] = None


@dataclass(frozen=True)
class CoordinatorConfig:
    registry: Listen = field(default_factory=lambda: Listen("127.0.0.1", 6786))
    api: CoordinatorApiConfig = field(default_factory=CoordinatorApiConfig)
    node_timeout: float = field(default=3.0, metadata=_meta(min=0.1))


@dataclass(frozen=True)
class MeshConfig:
    bind: str = "127.0.0.1"
    port: int = field(default=0, metadata=_meta(min=0, max=65535))
    # Bytes of requests one peer has not answered yet; past it, requests to that peer fail at once.
    max_pending_bytes: int = field(default=67108864, metadata=_meta(min=1024))
    # Peers of the same host are reached over a Unix socket (node/local_links.py) instead of ZeroMQ.
    local_links: bool = True


@dataclass(frozen=True)
class ApiConfig:
    bind: str = "127.0.0.1"
    port: int = field(default=6789, metadata=_meta(min=0, max=65535))
    max_body: int = field(default=1048576, metadata=_meta(min=1024))
    # Requests of one /ws/v1 connection that wait for an answer; more are refused (501) until some finish.
    max_in_flight: int = field(default=10000, metadata=_meta(min=1))
    # Bytes waiting to be written to one /ws/v1 connection (replies and queue events); over it: close 1008.
    write_buffer_limit: int = field(default=16777216, metadata=_meta(min=1024))
    # Browser origins other than the request's own that may call the API (exact "scheme://host[:port]").
    allowed_origins: list = field(default_factory=list, metadata=_meta(items=str))
    # Host names (besides IP addresses and localhost) an open API (no users) answers to.
    allowed_hosts: list = field(default_factory=list, metadata=_meta(items=str))
    tls: Optional[TlsConfig] = None
    # One line per API request at info on `meshgate.access.requests` (docs/operations.md, Logs).
    access_log: bool = False


@dataclass(frozen=True)
class QueueConfig:
    topic_size: int = field(default=2000, metadata=_meta(min=1))
    max_topics: int = field(default=100, metadata=_meta(min=1))
    max_bytes: int = field(default=67108864, metadata=_meta(min=1024))   # all topic buffers of a node together


@dataclass(frozen=True)
class RateLimitConfig:
    """Messages per second a client may send, with bursts up to `burst`; faster: close 1008."""
    rate: float = field(default=100.0, metadata=_meta(min=0.001))
    burst: int = field(default=200, metadata=_meta(min=1))


JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                  "ES256", "ES384", "ES512", "EdDSA")


@dataclass(frozen=True)
class JwtConfig:
    secret: Optional[str] = field(default=None, metadata=_meta(nonempty=True))              # HS*
    public_key_file: Optional[str] = field(default=None, metadata=_meta(nonempty=True))     # RS*, PS*, ES*, EdDSA
    algorithms: list = field(default_factory=lambda: ["HS256"], metadata=_meta(items=str, choices=JWT_ALGORITHMS))
    audience: Optional[str] = None
    issuer: Optional[str] = None
    leeway: float = field(default=0.0, metadata=_meta(min=0))
    context_claims: list = field(default_factory=list, metadata=_meta(items=str))


@dataclass(frozen=True)
class AuthConfig:
    jwt: Optional[JwtConfig] = None


@dataclass(frozen=True)
class ServerConfig:
    port: int = field(default=6790, metadata=_meta(min=0, max=65535))
    bind: str = "0.0.0.0"
    path: str = field(default="/", metadata=_meta(startswith="/"))
    topic: str = field(default="default", metadata=_meta(nonempty=True))
    entry: Optional[str] = None
    max_message_size: int = field(default=1048576, metadata=_meta(min=1))
    read_timeout: float = field(default=60.0, metadata=_meta(min=0.1))
    write_buffer_limit: int = field(default=4194304, metadata=_meta(min=1024))
    allowed_origins: list = field(default_factory=list, metadata=_meta(items=str))
    reload: bool = False                 # reload the entry when its file changes
    demo: Optional[str] = field(default=None, metadata=_meta(startswith="/"))   # path of the chat demo page
    # Client messages (and their bytes) that may wait for one connection's running hook; over it: close 1008.
    max_pending: int = field(default=1000, metadata=_meta(min=1))
    max_pending_bytes: int = field(default=8388608, metadata=_meta(min=1024))
    handshake_timeout: float = field(default=10.0, metadata=_meta(min=0.1))   # for the whole upgrade request
    max_header_size: int = field(default=16384, metadata=_meta(min=1024))     # bytes of request headers
    max_connections: int = field(default=0, metadata=_meta(min=0))            # per node process; 0 = no limit
    rate_limit: Optional[RateLimitConfig] = None
    tls: Optional[TlsConfig] = None          # per port: servers sharing a port share it
    auth: Optional[AuthConfig] = None
    # Topic of an open and a close message per connection (docs/protocol.md, Lifecycle events); None: none.
    lifecycle_topic: Optional[str] = None


@dataclass(frozen=True)
class NodeConfig:
    coordinator: str = field(default="127.0.0.1:6786", metadata=_meta(address=True))
    advertise: str = field(default="127.0.0.1", metadata=_meta(nonempty=True, host=True))
    workers: int = field(default=0, metadata=_meta(min=0, max=1023))
    forward_timeout: float = field(default=2.0, metadata=_meta(min=0.01))
    # Seconds a node process has to drain when it stops or is replaced (docs/operations.md, Rolling restart).
    drain_timeout: float = field(default=5.0, metadata=_meta(min=0.1, max=600))
    # Where `meshgate start` / `meshgate node` write their pid (`meshgate restart` reads it); relative to this file.
    pid_file: Optional[str] = field(default=None, metadata=_meta(nonempty=True))
    # auto: uvloop when it is installed (cluster/event_loop.py), else asyncio's own loop
    event_loop: str = field(default="auto", metadata=_meta(choices=("auto", "uvloop", "asyncio")))
    mesh: MeshConfig = field(default_factory=MeshConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    servers: list = field(default_factory=lambda: [ServerConfig()], metadata=_meta(items=ServerConfig))


@dataclass(frozen=True)
class Config:
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    # Not a key of the file: where it was read from (entries are relative to it).
    path: Optional[str] = field(default=None, metadata={"internal": True})

    @property
    def base_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path)) if self.path else os.getcwd()

    def resolve(self, file: str) -> str:
        """A file named in the configuration, relative to the configuration file's directory."""
        return os.path.normpath(os.path.join(self.base_dir, file))


def is_loopback(bind: str) -> bool:
    """True when a bind address only takes connections from this machine."""
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list"}


def _check_scalar(value: Any, kind: type, path: str) -> Any:
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number")
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{path}: expected {_TYPE_WORDS.get(kind, kind.__name__)}")
    return value


def _apply_checks(value: Any, checks: dict, path: str) -> None:
    if "min" in checks and value < checks["min"]:
        raise ConfigError(f"{path}: must be at least {checks['min']}")
    if "max" in checks and value > checks["max"]:
        raise ConfigError(f"{path}: must be at most {checks['max']}")
    if "choices" in checks and not isinstance(value, list) and value not in checks["choices"]:
        raise ConfigError(f"{path}: must be one of {', '.join(checks['choices'])}")
    if checks.get("nonempty") and not value:
        raise ConfigError(f"{path}: must not be empty")
    if "startswith" in checks and not value.startswith(checks["startswith"]):
        raise ConfigError(f"{path}: must start with {checks['startswith']!r}")
    if checks.get("address"):
        parse_address(value, path)
    if checks.get("host") and not _HOST.match(value):
        raise ConfigError(f"{path}: expected a host name or IP address (no scheme, no port)")


_HOST = re.compile(r"[A-Za-z0-9.\-]+\Z|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\Z")


def parse_address(value: str, path: str = "address") -> tuple:
    """Splits `host:port`; raises ConfigError naming `path`."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{path}: expected host:port")
    return host, int(port)


def _build(cls, raw: Any, path: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{path + '.' if path else ''}{key}: unknown key")
    for name, spec in fields.items():
        if spec.metadata.get("checks", {}).get("required") and name not in raw:
            raise ConfigError(f"{path + '.' if path else ''}{name}: is required")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, spec in fields.items():
        if name not in raw:
            continue
        key_path = f"{path}.{name}" if path else name
        values[name] = _convert(raw[name], hints[name], spec.metadata.get("checks", {}), key_path)
    return cls(**values)


def _convert(value: Any, hint: Any, checks: dict, path: str) -> Any:
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list")
        item_kind = checks.get("items", str)
        items = []
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            if dataclasses.is_dataclass(item_kind):
                items.append(_build(item_kind, item, item_path))
            else:
                item = _check_scalar(item, item_kind, item_path)
                if "choices" in checks and item not in checks["choices"]:
                    raise ConfigError(f"{item_path}: must be one of {', '.join(checks['choices'])}")
                items.append(item)
        return items
    value = _check_scalar(value, hint, path)
    _apply_checks(value, checks, path)
    return value


def _validate(config: Config) -> None:
    names = set()
    for index, user in enumerate(config.access.users):
        if not user.username or ":" in user.username:
            raise ConfigError(f"access.users[{index}].username: is required and has no ':'")
        if user.username in names:
            raise ConfigError(f"access.users[{index}].username: {user.username!r} is listed twice")
        names.add(user.username)
        if not user.password:
            raise ConfigError(f"access.users[{index}].password: is required (meshgate passwd makes a hash)")
        try:
            HostPattern(user.host)
        except ValueError:
            raise ConfigError(f"access.users[{index}].host: expected *, a glob such as 172.*.*.*, a CIDR or an "
                              f"address, not {user.host!r}") from None
    if not config.node.servers:
        raise ConfigError("node.servers: at least one server is required")
    ports, binds = {}, {}
    for index, server in enumerate(config.node.servers):
        key = (server.port, server.path.rstrip("/") or "/")
        if key in ports:
            raise ConfigError(f"node.servers[{index}]: same port and path as node.servers[{ports[key]}]")
        ports[key] = index
        first = binds.setdefault(server.port, (server.bind, index))
        if first[0] != server.bind:
            raise ConfigError(f"node.servers[{index}].bind: servers on port {server.port} must share one bind "
                              f"address (node.servers[{first[1]}] has {first[0]})")
        try:
            parse_name(server.topic, f"node.servers[{index}].topic", "topic")
            if server.lifecycle_topic is not None:
                parse_name(server.lifecycle_topic, f"node.servers[{index}].lifecycle_topic", "topic")
        except ApiError as exc:
            raise ConfigError(exc.message) from None
    paths = {(s.port, s.path.rstrip("/") or "/") for s in config.node.servers}
    for index, server in enumerate(config.node.servers):
        if server.demo and (server.port, server.demo.rstrip("/") or "/") in paths:
            raise ConfigError(f"node.servers[{index}].demo: {server.demo} is the path of a WebSocket server")
    api_port = config.node.api.port
    if api_port and any(s.port == api_port for s in config.node.servers):
        raise ConfigError("node.api.port: the same port as a client server")
    tls_by_port = {}
    for index, server in enumerate(config.node.servers):
        first = tls_by_port.setdefault(server.port, (server.tls, index))
        if first[0] != server.tls:
            raise ConfigError(f"node.servers[{index}].tls: servers on port {server.port} must share one tls "
                              f"setting (node.servers[{first[1]}] has another)")
        if server.auth and server.auth.jwt:
            _validate_jwt(server.auth.jwt, f"node.servers[{index}].auth.jwt")
    if not config.access.users:   # docs/protocol.md, Access control: an open API listens on loopback only
        for key, bind in (("node.api.bind", config.node.api.bind), ("coordinator.api.bind", config.coordinator.api.bind)):
            if not is_loopback(bind):
                raise ConfigError(f"access.users: required when {key} is not a loopback address ({bind})")


def _validate_jwt(jwt: "JwtConfig", path: str) -> None:
    if (jwt.secret is None) == (jwt.public_key_file is None):
        raise ConfigError(f"{path}: give exactly one of secret (HS*) and public_key_file (RS*, PS*, ES*, EdDSA)")
    if not jwt.algorithms:
        raise ConfigError(f"{path}.algorithms: at least one algorithm is required")
    for index, algorithm in enumerate(jwt.algorithms):
        if algorithm.startswith("HS") != (jwt.secret is not None):
            needs = "secret" if algorithm.startswith("HS") else "public_key_file"
            raise ConfigError(f"{path}.algorithms[{index}]: {algorithm} needs {needs}")


def from_dict(raw: Any, path: Optional[str] = None) -> Config:
    """Builds a validated Config from a parsed YAML document.

    Raises:
        ConfigError: naming the first bad key's path.
    """
    config = _build(Config, raw, "")
    config = dataclasses.replace(config, path=path)
    _validate(config)
    return config


def load(path: Optional[str]) -> Config:
    """Reads and validates a YAML file; `None` gives the defaults.

    Raises:
        ConfigError: unreadable file, bad YAML, or a bad key (with its path).
    """
    if path is None:
        return from_dict({})
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    return from_dict(raw, path)


# What SIGHUP applies to running processes; every other change takes a restart.
LIVE_KEYS = ("access.users", "logging.level", "node.api.allowed_origins", "node.api.allowed_hosts")   # cluster/live.py


def _differences(old: Any, new: Any, path: str) -> list:
    if dataclasses.is_dataclass(old) and type(old) is type(new):
        found = []
        for spec in dataclasses.fields(old):
            if not spec.metadata.get("internal"):
                key = f"{path}.{spec.name}" if path else spec.name
                found += _differences(getattr(old, spec.name), getattr(new, spec.name), key)
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [key for index, (a, b) in enumerate(zip(old, new)) for key in _differences(a, b, f"{path}[{index}]")]
    return [] if old == new else [path]


def needs_restart(running: Config, new: Config) -> list:
    """Key paths that differ between the running and the new configuration and SIGHUP does not apply."""
    return [key for key in _differences(running, new, "")
            if not any(key == live or key.startswith(live + "[") for live in LIVE_KEYS)]


def override(config: Config, workers: Optional[int] = None, coordinator: Optional[str] = None) -> Config:
    """Applies command-line options over the file (docs/configuration.md, Command-line overrides)."""
    node = config.node
    if workers is not None:
        if not 0 <= workers <= 1023:
            raise ConfigError("--workers: must be 0..1023")
        node = dataclasses.replace(node, workers=workers)
    if coordinator is not None:
        parse_address(coordinator, "--coordinator")
        node = dataclasses.replace(node, coordinator=coordinator)
    return dataclasses.replace(config, node=node)


def check_mesh_ports(config: Config, workers: int) -> None:
    """With a fixed mesh port N, workers use N..N+workers-1, and their replacements in a rolling restart
    N+workers..N+2*workers-1: none may be another listening port.

    Raises:
        ConfigError: naming `node.mesh.port`.
    """
    base = config.node.mesh.port
    if not base:
        return
    if base + 2 * workers - 1 > 65535:
        raise ConfigError(f"node.mesh.port: {workers} workers need ports {base}..{base + 2 * workers - 1} "
                          "(two per worker, for rolling restarts)")
    taken = {config.node.api.port: "node.api.port", config.coordinator.registry.port: "coordinator.registry.port",
             config.coordinator.api.port: "coordinator.api.port"}
    taken.update({s.port: f"node.servers[{i}].port" for i, s in enumerate(config.node.servers)})
    for port in range(base, base + 2 * workers):
        if port in taken:
            worker = port - base
            who = f"worker {worker}" if worker < workers else f"the replacement of worker {worker - workers}"
            raise ConfigError(f"node.mesh.port: {who} would use port {port}, which is {taken[port]}")
