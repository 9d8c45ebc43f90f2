"""Tests of cluster/config.py: defaults, validation with key paths, loading and command-line overrides."""

import dataclasses
from pathlib import Path

import pytest

from cluster import config
from cluster.config import Config, ConfigError, ServerConfig, UserConfig

SHIPPED = Path(__file__).resolve().parent.parent / "conf" / "meshgate.yaml"


def assert_refused(raw, prefix: str) -> ConfigError:
    """Checks that `raw` is refused with a message starting with `prefix`."""
    with pytest.raises(ConfigError) as info:
        config.from_dict(raw)
    assert str(info.value).startswith(prefix), str(info.value)
    return info.value


# --- defaults ----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [{}, None])
def test_defaults(raw):
    """Every key is optional and takes the documented default."""
    cfg = config.from_dict(raw)
    assert (cfg.logging.level, cfg.logging.format) == ("info", "text")
    assert cfg.access.users == []
    assert (cfg.coordinator.registry.bind, cfg.coordinator.registry.port) == ("127.0.0.1", 6786)
    assert (cfg.coordinator.api.bind, cfg.coordinator.api.port) == ("127.0.0.1", 6787)
    assert cfg.coordinator.node_timeout == 3
    node = cfg.node
    assert (node.coordinator, node.advertise, node.workers, node.forward_timeout) == ("127.0.0.1:6786", "127.0.0.1", 0, 2)
    assert (node.mesh.bind, node.mesh.port) == ("127.0.0.1", 0)
    assert (node.api.bind, node.api.port, node.api.max_body) == ("127.0.0.1", 6789, 1048576)
    assert (node.queue.topic_size, node.queue.max_topics) == (2000, 100)
    assert node.servers == [ServerConfig()]
    server = node.servers[0]
    assert (server.port, server.bind, server.path, server.topic, server.entry) == (6790, "0.0.0.0", "/", "default", None)
    assert (server.max_message_size, server.read_timeout, server.write_buffer_limit) == (1048576, 60, 4194304)
    assert server.allowed_origins == []
    assert cfg.path is None


def test_load_none_is_defaults():
    """load(None) gives the built-in defaults."""
    assert config.load(None) == config.from_dict({})


def test_partial_sections_keep_other_defaults():
    """Setting one key of a section leaves the others at their defaults."""
    cfg = config.from_dict({"node": {"api": {"port": 7000}, "servers": [{"port": 7001}]},
                            "coordinator": {"api": {"port": 7002}}})
    assert (cfg.node.api.bind, cfg.node.api.port, cfg.node.api.max_body) == ("127.0.0.1", 7000, 1048576)
    assert cfg.node.servers == [ServerConfig(port=7001)]
    assert cfg.coordinator.api.port == 7002 and cfg.coordinator.api.bind == "127.0.0.1"
    assert cfg.coordinator.registry.port == 6786


def test_full_config_read():
    """Every key is read from the file with its value."""
    cfg = config.from_dict({
        "logging": {"level": "debug", "format": "json"},
        "access": {"users": [{"username": "u", "password": "p", "roles": ["read"], "host": "172.*.*.*"}]},
        "coordinator": {"registry": {"bind": "0.0.0.0", "port": 1}, "api": {"port": 2}, "node_timeout": 0.5},
        "node": {"coordinator": "10.0.0.1:16786", "advertise": "10.0.0.2", "workers": 4, "forward_timeout": 1,
                 "mesh": {"port": 9000}, "api": {"max_body": 2048}, "queue": {"topic_size": 5, "max_topics": 6},
                 "servers": [{"port": 8000, "path": "/ws", "topic": "in", "entry": "app.entry",
                              "max_message_size": 10, "read_timeout": 1.5, "write_buffer_limit": 4096,
                              "allowed_origins": ["https://a.example"]},
                             {"port": 8000, "path": "/other"}]},
    })
    assert cfg.logging.format == "json"
    assert cfg.access.users == [UserConfig("u", "p", ["read"], "172.*.*.*")]
    assert cfg.coordinator.node_timeout == 0.5
    assert cfg.node.workers == 4 and cfg.node.forward_timeout == 1.0
    assert isinstance(cfg.node.forward_timeout, float)
    assert cfg.node.servers[0].entry == "app.entry"
    assert cfg.node.servers[0].allowed_origins == ["https://a.example"]
    assert cfg.node.servers[1] == ServerConfig(port=8000, path="/other")


def test_user_defaults():
    """A user without roles or host gets both roles and any host."""
    cfg = config.from_dict({"access": {"users": [{"username": "u", "password": "p"}]}})
    assert cfg.access.users[0] == UserConfig("u", "p", ["read", "write"], "*")


def test_config_is_frozen():
    """The configuration cannot be changed after it is built."""
    cfg = config.from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node.api.port = 1


def test_shipped_config_loads():
    """conf/meshgate.yaml loads: the defaults plus the chat and message center servers on the same port."""
    cfg = config.load(str(SHIPPED))
    defaults = config.from_dict({})
    assert dataclasses.replace(cfg, path=None, node=dataclasses.replace(cfg.node, servers=defaults.node.servers)) \
        == defaults
    assert cfg.node.servers[0] == defaults.node.servers[0]
    extra = {server.path: server for server in cfg.node.servers[1:]}
    assert set(extra) == {"/chat", "/messages"}
    assert extra["/chat"].entry == "entries/chat.py" and extra["/chat"].reload and extra["/chat"].demo == "/demo"
    assert extra["/messages"].entry == "entries/message_center.py"
    for server in cfg.node.servers[1:]:
        assert server.port == 6790 and (SHIPPED.parent / server.entry).is_file()
    assert cfg.path == str(SHIPPED)
    assert cfg.base_dir == str(SHIPPED.parent)


# --- wrong keys and types ------------------------------------------------------------------------

@pytest.mark.parametrize("raw, prefix", [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"path": "/x"}, "path: unknown key"),
    ({"node": {"bogus": 1}}, "node.bogus: unknown key"),
    ({"node": {"servers": [{"bogus": 1}]}}, "node.servers[0].bogus: unknown key"),
    ({"node": {"servers": [{"port": 1}, {"prot": 2}]}}, "node.servers[1].prot: unknown key"),
    ({"node": {"api": {"maxbody": 1}}}, "node.api.maxbody: unknown key"),
    ({"node": {"queue": {"size": 1}}}, "node.queue.size: unknown key"),
    ({"node": {"mesh": {"host": "x"}}}, "node.mesh.host: unknown key"),
    ({"coordinator": {"registry": {"address": "x"}}}, "coordinator.registry.address: unknown key"),
    ({"coordinator": {"timeout": 3}}, "coordinator.timeout: unknown key"),
    ({"access": {"users": [{"username": "u", "role": "read"}]}}, "access.users[0].role: unknown key"),
    ({"access": {"roles": []}}, "access.roles: unknown key"),
    ({"logging": {"lvl": "info"}}, "logging.lvl: unknown key"),
])
def test_unknown_keys(raw, prefix):
    """An unknown key is refused, naming its path."""
    assert_refused(raw, prefix)


@pytest.mark.parametrize("raw, prefix", [
    ([], "config: expected a mapping"),
    ("text", "config: expected a mapping"),
    ({"node": []}, "node: expected a mapping"),
    ({"node": "x"}, "node: expected a mapping"),
    ({"node": {"api": 6789}}, "node.api: expected a mapping"),
    ({"node": {"servers": {"port": 1}}}, "node.servers: expected a list"),
    ({"node": {"servers": None}}, "node.servers: expected a list"),
    ({"node": {"servers": [6790]}}, "node.servers[0]: expected a mapping"),
    ({"node": {"servers": [{"port": "6790"}]}}, "node.servers[0].port: expected an integer"),
    ({"node": {"servers": [{"port": 6790.0}]}}, "node.servers[0].port: expected an integer"),
    ({"node": {"servers": [{}, {"port": None}]}}, "node.servers[1].port: expected an integer"),
    ({"node": {"servers": [{"bind": 0}]}}, "node.servers[0].bind: expected a string"),
    ({"node": {"servers": [{"path": None}]}}, "node.servers[0].path: expected a string"),
    ({"node": {"servers": [{"entry": 5}]}}, "node.servers[0].entry: expected a string"),
    ({"node": {"servers": [{"read_timeout": "60"}]}}, "node.servers[0].read_timeout: expected a number"),
    ({"node": {"servers": [{"allowed_origins": "*"}]}}, "node.servers[0].allowed_origins: expected a list"),
    ({"node": {"servers": [{"allowed_origins": ["a", 5]}]}}, "node.servers[0].allowed_origins[1]: expected a string"),
    ({"node": {"api": {"port": "x"}}}, "node.api.port: expected an integer"),
    ({"node": {"api": {"max_body": 1.5}}}, "node.api.max_body: expected an integer"),
    ({"node": {"queue": {"topic_size": "2000"}}}, "node.queue.topic_size: expected an integer"),
    ({"node": {"queue": {"max_topics": None}}}, "node.queue.max_topics: expected an integer"),
    ({"node": {"workers": "4"}}, "node.workers: expected an integer"),
    ({"node": {"forward_timeout": "2"}}, "node.forward_timeout: expected a number"),
    ({"node": {"coordinator": 6786}}, "node.coordinator: expected a string"),
    ({"node": {"advertise": None}}, "node.advertise: expected a string"),
    ({"node": {"mesh": {"port": [1]}}}, "node.mesh.port: expected an integer"),
    ({"coordinator": {"node_timeout": "3"}}, "coordinator.node_timeout: expected a number"),
    ({"coordinator": {"registry": {"port": "6786"}}}, "coordinator.registry.port: expected an integer"),
    ({"coordinator": {"api": {"bind": 127}}}, "coordinator.api.bind: expected a string"),
    ({"logging": {"level": 10}}, "logging.level: expected a string"),
    ({"access": {"users": {"username": "u"}}}, "access.users: expected a list"),
    ({"access": {"users": ["u:p"]}}, "access.users[0]: expected a mapping"),
    ({"access": {"users": [{"username": "u", "password": 1234}]}}, "access.users[0].password: expected a string"),
    ({"access": {"users": [{"username": "u", "roles": "read"}]}}, "access.users[0].roles: expected a list"),
    ({"access": {"users": [{"username": "u", "roles": [1]}]}}, "access.users[0].roles[0]: expected a string"),
])
def test_wrong_types(raw, prefix):
    """A value of the wrong type is refused, naming its path and the expected type."""
    assert_refused(raw, prefix)


@pytest.mark.parametrize("raw, prefix", [
    ({"node": {"servers": [{"port": True}]}}, "node.servers[0].port: expected an integer"),
    ({"node": {"workers": False}}, "node.workers: expected an integer"),
    ({"node": {"api": {"max_body": True}}}, "node.api.max_body: expected an integer"),
    ({"node": {"queue": {"topic_size": True}}}, "node.queue.topic_size: expected an integer"),
    ({"node": {"forward_timeout": True}}, "node.forward_timeout: expected a number"),
    ({"coordinator": {"node_timeout": True}}, "coordinator.node_timeout: expected a number"),
    ({"node": {"servers": [{"read_timeout": False}]}}, "node.servers[0].read_timeout: expected a number"),
    ({"logging": {"level": True}}, "logging.level: expected a string"),
])
def test_bool_is_not_a_number(raw, prefix):
    """YAML booleans are not accepted where an integer or number is expected."""
    assert_refused(raw, prefix)


@pytest.mark.parametrize("raw, prefix", [
    ({"node": {"servers": [{"port": -1}]}}, "node.servers[0].port: must be at least 0"),
    ({"node": {"servers": [{"port": 65536}]}}, "node.servers[0].port: must be at most 65535"),
    ({"node": {"api": {"port": 70000}}}, "node.api.port: must be at most 65535"),
    ({"node": {"api": {"max_body": 1023}}}, "node.api.max_body: must be at least 1024"),
    ({"node": {"workers": -1}}, "node.workers: must be at least 0"),
    ({"node": {"workers": 1024}}, "node.workers: must be at most 1023"),
    ({"node": {"forward_timeout": 0}}, "node.forward_timeout: must be at least"),
    ({"node": {"queue": {"topic_size": 0}}}, "node.queue.topic_size: must be at least 1"),
    ({"node": {"queue": {"max_topics": 0}}}, "node.queue.max_topics: must be at least 1"),
    ({"coordinator": {"node_timeout": 0}}, "coordinator.node_timeout: must be at least"),
    ({"coordinator": {"registry": {"port": 65536}}}, "coordinator.registry.port: must be at most 65535"),
    ({"node": {"servers": [{"path": "ws"}]}}, "node.servers[0].path: must start with '/'"),
    ({"node": {"servers": [{"path": ""}]}}, "node.servers[0].path: must start with '/'"),
    ({"node": {"servers": [{"topic": ""}]}}, "node.servers[0].topic: must not be empty"),
    ({"node": {"servers": [{"max_message_size": 0}]}}, "node.servers[0].max_message_size: must be at least 1"),
    ({"node": {"servers": [{"read_timeout": 0}]}}, "node.servers[0].read_timeout: must be at least"),
    ({"node": {"servers": [{"write_buffer_limit": 100}]}}, "node.servers[0].write_buffer_limit: must be at least 1024"),
    ({"node": {"advertise": ""}}, "node.advertise: must not be empty"),
    ({"logging": {"level": "verbose"}}, "logging.level: must be one of debug, info, warning, error"),
    ({"node": {"event_loop": "trio"}}, "node.event_loop: must be one of auto, uvloop, asyncio"),
    ({"logging": {"format": "xml"}}, "logging.format: must be one of text, json"),
    ({"access": {"users": [{"username": ""}]}}, "access.users[0].username: must not be empty"),
    ({"access": {"users": [{"username": "u", "roles": ["admin"]}]}}, "access.users[0].roles[0]: must be one of read, write"),
    ({"access": {"users": [{"username": "u"}, {"username": "v", "roles": ["read", "x"]}]}},
     "access.users[1].roles[1]: must be one of read, write"),
])
def test_out_of_range(raw, prefix):
    """Values outside their allowed range or choices are refused, naming the key path."""
    assert_refused(raw, prefix)


def test_user_without_username_refused():
    """A user entry without a username is refused (the username must not be empty)."""
    assert_refused({"access": {"users": [{"password": "p"}]}}, "access.users[0].username")


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:", ":6786", "host:port", "host:0", "host:65536",
                                     "host:-1", "host: 6786", ""])
def test_bad_coordinator_address(address):
    """node.coordinator must be host:port with a port in 1..65535."""
    assert_refused({"node": {"coordinator": address}}, "node.coordinator: expected host:port")


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:6786", ("127.0.0.1", 6786)),
    ("coordinator.example:1", ("coordinator.example", 1)),
    ("[::1]:65535", ("[::1]", 65535)),
])
def test_parse_address(address, expected):
    """parse_address splits host and port."""
    assert config.parse_address(address) == expected
    assert config.from_dict({"node": {"coordinator": address}}).node.coordinator == address


@pytest.mark.parametrize("raw, prefix", [
    ({"node": {"servers": []}}, "node.servers: at least one server is required"),
    ({"node": {"servers": [{"port": 7000}, {"port": 7000}]}}, "node.servers[1]: same port and path as node.servers[0]"),
    ({"node": {"servers": [{"port": 7000}, {"port": 7001}, {"port": 7000, "path": "/"}]}},
     "node.servers[2]: same port and path as node.servers[0]"),
    ({"node": {"api": {"port": 7000}, "servers": [{"port": 7000}]}}, "node.api.port: the same port as a client server"),
    ({"node": {"api": {"port": 6790}}}, "node.api.port: the same port as a client server"),
])
def test_cross_checks(raw, prefix):
    """Server lists and ports that clash are refused, naming the key."""
    assert_refused(raw, prefix)


def test_same_port_different_paths_allowed():
    """Two servers may share a port when their paths differ."""
    cfg = config.from_dict({"node": {"servers": [{"port": 7000, "path": "/a"}, {"port": 7000, "path": "/b"}]}})
    assert [s.path for s in cfg.node.servers] == ["/a", "/b"]


def test_integer_accepted_as_number():
    """An integer is accepted where a number is expected and read as a float."""
    cfg = config.from_dict({"coordinator": {"node_timeout": 5}, "node": {"servers": [{"read_timeout": 30}]}})
    assert cfg.coordinator.node_timeout == 5.0 and isinstance(cfg.coordinator.node_timeout, float)
    assert cfg.node.servers[0].read_timeout == 30.0


def test_null_section_is_defaults():
    """A section written but left empty (null in YAML) takes its defaults."""
    cfg = config.from_dict({"logging": None, "node": {"queue": None}})
    assert cfg.logging == config.from_dict({}).logging
    assert cfg.node.queue.topic_size == 2000


# --- load ------------------------------------------------------------------------------------------

def test_load_file(tmp_path):
    """A YAML file is read, validated and remembers its path."""
    path = tmp_path / "m.yaml"
    path.write_text("node:\n  workers: 2\n  servers:\n    - port: 7100\n      entry: entry.py\n")
    cfg = config.load(str(path))
    assert cfg.node.workers == 2
    assert cfg.node.servers[0].entry == "entry.py"
    assert cfg.path == str(path)
    assert cfg.base_dir == str(tmp_path)


def test_load_empty_file(tmp_path):
    """An empty file gives the defaults."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert dataclasses.replace(config.load(str(path)), path=None) == config.from_dict({})


def test_load_missing_file(tmp_path):
    """A missing file is a ConfigError naming the file."""
    path = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: cannot read")


def test_load_directory(tmp_path):
    """A directory instead of a file is a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}:")


@pytest.mark.parametrize("text", ["node: [unclosed\n", "node:\n  workers: 1\n bad indent: 2\n", "a: b: c\n",
                                  "key: 'open\n", "\t- tab\n"])
def test_load_bad_yaml(tmp_path, text):
    """Invalid YAML is a ConfigError naming the file."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert str(info.value).startswith(f"{path}: invalid YAML")


def test_load_bad_key_in_file(tmp_path):
    """A bad key in a file is refused with its key path."""
    path = tmp_path / "m.yaml"
    path.write_text("node:\n  servers:\n    - port: yes\n")
    with pytest.raises(ConfigError, match=r"^node\.servers\[0\]\.port: expected an integer"):
        config.load(str(path))


def test_load_top_level_not_mapping(tmp_path):
    """A file whose document is not a mapping is refused."""
    path = tmp_path / "m.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        config.load(str(path))


# --- command-line overrides ----------------------------------------------------------------------

def test_override_nothing():
    """With no options the configuration is unchanged."""
    cfg = config.from_dict({"node": {"workers": 3}})
    assert config.override(cfg) == cfg


@pytest.mark.parametrize("workers", [0, 1, 8, 1023])
def test_override_workers(workers):
    """--workers wins over the file."""
    cfg = config.override(config.from_dict({"node": {"workers": 3}}), workers=workers)
    assert cfg.node.workers == workers


def test_override_coordinator():
    """--coordinator wins over the file and keeps the other keys."""
    base = config.from_dict({"node": {"coordinator": "a:1", "workers": 2}})
    cfg = config.override(base, coordinator="10.1.2.3:6786")
    assert cfg.node.coordinator == "10.1.2.3:6786"
    assert cfg.node.workers == 2
    assert base.node.coordinator == "a:1"


@pytest.mark.parametrize("kwargs, prefix", [
    ({"workers": -1}, "--workers:"),
    ({"workers": 1024}, "--workers:"),
    ({"coordinator": "nohost"}, "--coordinator: expected host:port"),
    ({"coordinator": "h:0"}, "--coordinator: expected host:port"),
    ({"coordinator": ":6786"}, "--coordinator: expected host:port"),
])
def test_override_bad(kwargs, prefix):
    """Bad command-line values are refused naming the option, with the same bounds as the file."""
    with pytest.raises(ConfigError) as info:
        config.override(config.from_dict({}), **kwargs)
    assert str(info.value).startswith(prefix), str(info.value)


def test_default_config_type():
    """from_dict returns a Config."""
    assert isinstance(config.from_dict({}), Config)


@pytest.mark.parametrize("raw, prefix", [
    ({"node": {"queue": {"max_bytes": 10}}}, "node.queue.max_bytes: must be at least 1024"),
    ({"node": {"queue": {"max_bytes": "big"}}}, "node.queue.max_bytes: expected an integer"),
    ({"node": {"servers": [{"reload": "yes"}]}}, "node.servers[0].reload: expected a boolean"),
    ({"node": {"servers": [{"demo": "demo"}]}}, "node.servers[0].demo: must start with '/'"),
    ({"node": {"servers": [{"demo": 1}]}}, "node.servers[0].demo: expected a string"),
    ({"node": {"servers": [{"path": "/chat", "demo": "/chat"}]}}, "node.servers[0].demo: /chat is the path"),
    ({"node": {"advertise": "http://host"}}, "node.advertise: expected a host name or IP address"),
    ({"node": {"mesh": {"local_links": "yes"}}}, "node.mesh.local_links: expected a boolean"),
    ({"node": {"mesh": {"local_links": 1}}}, "node.mesh.local_links: expected a boolean"),
])
def test_newer_keys_refused_with_their_path(raw, prefix):
    """queue.max_bytes, servers[].reload/demo and advertise are checked like every other key."""
    assert_refused(raw, prefix)


def test_newer_keys_defaults():
    """Defaults: 64 MiB of buffered queue data, no reload, no demo page."""
    server = config.from_dict({}).node.servers[0]
    assert config.from_dict({}).node.queue.max_bytes == 64 * 1024 * 1024
    assert server.reload is False and server.demo is None


@pytest.mark.parametrize("raw, prefix", [
    ({"handshake_timeout": 0}, "node.servers[0].handshake_timeout: must be at least 0.1"),
    ({"max_header_size": 100}, "node.servers[0].max_header_size: must be at least 1024"),
    ({"max_connections": -1}, "node.servers[0].max_connections: must be at least 0"),
    ({"rate_limit": {"rate": 0}}, "node.servers[0].rate_limit.rate: must be at least 0.001"),
    ({"rate_limit": {"burst": 0}}, "node.servers[0].rate_limit.burst: must be at least 1"),
    ({"rate_limit": 5}, "node.servers[0].rate_limit: expected a mapping"),
    ({"auth": {"jwt": {}}}, "node.servers[0].auth.jwt: give exactly one of secret"),
    ({"auth": {"jwt": {"secret": "s", "public_key_file": "k.pem"}}}, "node.servers[0].auth.jwt: give exactly one"),
    ({"auth": {"jwt": {"secret": "s", "algorithms": []}}}, "node.servers[0].auth.jwt.algorithms: at least one"),
    ({"auth": {"jwt": {"secret": "s", "algorithms": ["none"]}}},
     "node.servers[0].auth.jwt.algorithms[0]: must be one of"),
    ({"auth": {"jwt": {"secret": "s", "algorithms": ["RS256"]}}},
     "node.servers[0].auth.jwt.algorithms[0]: RS256 needs public_key_file"),
    ({"auth": {"jwt": {"public_key_file": "k.pem"}}}, "node.servers[0].auth.jwt.algorithms[0]: HS256 needs secret"),
    ({"auth": {"jwt": {"secret": "s", "leeway": -1}}}, "node.servers[0].auth.jwt.leeway: must be at least 0"),
    ({"auth": {"jwt": {"secret": "s", "context_claims": "role"}}},
     "node.servers[0].auth.jwt.context_claims: expected a list"),
])
def test_client_server_limits_and_jwt_refused_with_their_path(raw, prefix):
    """handshake_timeout, max_header_size, max_connections, rate_limit and auth.jwt are checked with their path."""
    assert_refused({"node": {"servers": [raw]}}, prefix)


def test_client_server_limits_and_jwt_defaults():
    """Defaults: 10 s handshake, 16 KiB headers, no connection or rate limit, no auth; jwt takes HS256, no leeway."""
    server = config.from_dict({}).node.servers[0]
    assert (server.handshake_timeout, server.max_header_size, server.max_connections) == (10, 16384, 0)
    assert server.rate_limit is None and server.auth is None
    limited = config.from_dict({"node": {"servers": [{"rate_limit": {}, "auth": {"jwt": {"secret": "s"}}}]}})
    jwt = limited.node.servers[0].auth.jwt
    assert (limited.node.servers[0].rate_limit.rate, limited.node.servers[0].rate_limit.burst) == (100, 200)
    assert (jwt.algorithms, jwt.audience, jwt.issuer, jwt.leeway, jwt.context_claims) == (["HS256"], None, None, 0, [])


@pytest.mark.parametrize("raw, prefix", [
    ({"node": {"drain_timeout": 0}}, "node.drain_timeout: must be at least 0.1"),
    ({"node": {"drain_timeout": 601}}, "node.drain_timeout: must be at most 600"),
    ({"node": {"drain_timeout": "5"}}, "node.drain_timeout: expected a number"),
    ({"node": {"pid_file": ""}}, "node.pid_file: must not be empty"),
    ({"node": {"pid_file": 5}}, "node.pid_file: expected a string"),
])
def test_rolling_restart_keys_refused_with_their_path(raw, prefix):
    """node.drain_timeout and node.pid_file (docs/operations.md, Rolling restart) are checked with their path."""
    assert_refused(raw, prefix)


def test_rolling_restart_keys_defaults(tmp_path):
    """Defaults: a 5 s drain; the pid file beside the configuration file, or where node.pid_file says."""
    from cluster import pidfile
    assert config.from_dict({}).node.drain_timeout == 5
    path = tmp_path / "site.yaml"
    path.write_text("node: {workers: 1}\n")
    assert pidfile.path_for(config.load(str(path))) == str(tmp_path / "site.pid")
    path.write_text("node: {pid_file: run/mg.pid}\n")
    assert pidfile.path_for(config.load(str(path))) == str(tmp_path / "run" / "mg.pid")


@pytest.mark.parametrize("workers, mesh_port, message", [
    (2, 7000, None),                                    # 7000..7003
    (2, 6788, "node.mesh.port: worker 1 would use port 6789, which is node.api.port"),
    (1, 6788, "node.mesh.port: the replacement of worker 0 would use port 6789, which is node.api.port"),
    (2, 65533, "node.mesh.port: 2 workers need ports 65533..65536 (two per worker, for rolling restarts)"),
])
def test_fixed_mesh_ports_leave_room_for_replacements(workers, mesh_port, message):
    """With node.mesh.port N, N..N+2*workers-1 must be free: a replacement binds N+workers+k."""
    cfg = config.from_dict({"node": {"mesh": {"port": mesh_port}}})
    if message is None:
        config.check_mesh_ports(cfg, workers)
        return
    with pytest.raises(ConfigError) as caught:
        config.check_mesh_ports(cfg, workers)
    assert str(caught.value) == message


def test_what_a_reload_applies_is_not_reported_as_needing_a_restart():
    """SIGHUP applies the users, the log level and the API's allowed origins and hosts (cluster/live.py);
    any other change is named as taking effect after a restart."""
    from cluster.config import from_dict, needs_restart
    before = from_dict({})
    after = from_dict({"node": {"api": {"allowed_origins": ["https://app.example"], "allowed_hosts": ["api.internal"]},
                                "forward_timeout": 3},
                       "logging": {"level": "debug"}})
    assert needs_restart(before, after) == ["node.forward_timeout"]
