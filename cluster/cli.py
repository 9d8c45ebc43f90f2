"""The `meshgate` command: click commands only; they parse options and call the modules."""

import sys
import time
import urllib.error
import urllib.request

import click
import ujson

from cluster import __version__, cluster_key, config as config_module
from cluster.config import ConfigError

_CONFIG_HELP = "YAML configuration file (default: built-in defaults)."


def _load(path, workers=None, coordinator=None):
    try:
        return config_module.override(config_module.load(path), workers=workers, coordinator=coordinator)
    except ConfigError as exc:
        _fail(str(exc))


def _fail(message: str) -> None:
    click.echo(f"meshgate: configuration error: {message}", err=True)
    sys.exit(2)


def _key(config, command: str, from_stdin: bool = False):
    """The cluster key: from the supervisor (standard input), from access.cluster_key_file, or (`start`) a fresh one."""
    try:
        if from_stdin:
            return cluster_key.ClusterKey.from_line(sys.stdin.readline(200).strip())
        if config.access.cluster_key_file:
            return cluster_key.read_file(config.resolve(config.access.cluster_key_file))
    except cluster_key.ClusterKeyError as exc:
        _fail(f"access.cluster_key_file: {exc}")
    if command == "start":
        return cluster_key.generate()   # one machine, one run: nobody else needs it
    _fail(f"access.cluster_key_file: required by meshgate {command} (make one with: meshgate keygen -o FILE)")


def _setup_supervisor_logging(config) -> None:
    from cluster import logs
    logs.setup(config.logging.level, config.logging.format, "supervisor")


@click.group()
@click.version_option(__version__, prog_name="meshgate")
def main():
    """meshgate: a distributed WebSocket long-connection gateway."""


@main.command()
@click.option("-c", "--config", "path", type=click.Path(dir_okay=False), help=_CONFIG_HELP)
@click.option("--workers", type=int, help="Node processes on this machine (0 = one per CPU core).")
def start(path, workers):
    """Run the whole cluster on this machine: coordinator and node processes."""
    _supervise(path, workers, coordinator_address=None, with_coordinator=True)


def _supervise(path, workers, coordinator_address, with_coordinator: bool) -> None:
    """`start` and `node`: check what can be checked before anything starts, then supervise."""
    from cluster.supervisor import Supervisor, resolve_workers
    config = _load(path, workers=workers, coordinator=coordinator_address)
    key = _key(config, "start" if with_coordinator else "node")
    _check_files(config)
    count = resolve_workers(config.node.workers)
    _check_startable(config, count)
    _setup_supervisor_logging(config)
    sys.exit(Supervisor(path, count, with_coordinator, key, coordinator_address=coordinator_address,
                        registry=config.node.coordinator, config=config).run())


@main.command()
@click.option("-c", "--config", "path", type=click.Path(dir_okay=False), help=_CONFIG_HELP)
@click.option("--pid-file", type=click.Path(dir_okay=False),
              help="The supervisor's pid file (default: node.pid_file, else beside the configuration file).")
def restart(path, pid_file):
    """Replace the node processes of a running `meshgate start` or `meshgate node` one at a time."""
    import os
    import signal
    from cluster import pidfile
    config = _load(path)
    where = pid_file or pidfile.path_for(config)
    try:
        pid = pidfile.find(where)
        os.kill(pid, signal.SIGUSR2)
    except (pidfile.NotFound, OSError) as exc:
        click.echo(f"meshgate: no rolling restart: {exc}", err=True)
        sys.exit(1)
    click.echo(f"sent SIGUSR2 to the supervisor (pid {pid}): it replaces its node processes one at a time; "
               "its log says when it is done")


_KEY_STDIN_HELP = "Read the cluster key from standard input (how a supervisor hands it over)."


@main.command()
@click.option("-c", "--config", "path", type=click.Path(dir_okay=False), help=_CONFIG_HELP)
@click.option("--fresh", is_flag=True, hidden=True, help="First start of a cluster: no node can hold an id yet.")
@click.option("--key-stdin", is_flag=True, hidden=True, help=_KEY_STDIN_HELP)
def coordinator(path, fresh, key_stdin):
    """Run the coordinator (the control plane) alone."""
    from coordinator.app import run
    config = _load(path)
    key = _key(config, "coordinator", key_stdin)
    if not key_stdin:   # started by hand: check what a supervisor would have checked
        _check_files(config)
    sys.exit(run(config, key, fresh=fresh))


@main.command()
@click.option("-c", "--config", "path", type=click.Path(dir_okay=False), help=_CONFIG_HELP)
@click.option("--coordinator", "coordinator_address", help="Registry address of the coordinator, HOST:PORT.")
@click.option("--workers", type=int, help="Node processes on this machine (0 = one per CPU core).")
def node(path, coordinator_address, workers):
    """Run this machine's node processes, joining the coordinator at --coordinator."""
    _supervise(path, workers, coordinator_address, with_coordinator=False)


@main.command("node-process", hidden=True)
@click.option("-c", "--config", "path", type=click.Path(dir_okay=False))
@click.option("--worker", type=int, default=0)
@click.option("--coordinator", "coordinator_address")
@click.option("--key-stdin", is_flag=True, help=_KEY_STDIN_HELP)
def node_process(path, worker, coordinator_address, key_stdin):
    """One node process (started by the supervisor)."""
    from node.app import run
    config = _load(path, coordinator=coordinator_address)
    sys.exit(run(config, worker, _key(config, "node", key_stdin)))


@main.command()
@click.option("-o", "--output", "path", required=True, type=click.Path(dir_okay=False),
              help="The key file to write (it must not exist yet).")
def keygen(path):
    """Make a new cluster key file (mode 0600) for access.cluster_key_file."""
    try:
        cluster_key.write_file(path, cluster_key.generate())
    except cluster_key.ClusterKeyError as exc:
        click.echo(f"meshgate: {exc}", err=True)
        sys.exit(1)
    click.echo(f"wrote {path}: give the same file (mode 0600) to every coordinator and node of the cluster")


def _check_startable(config, workers: int) -> None:
    """Checks that need the resolved worker count; exits 2 like any configuration error."""
    try:
        config_module.check_mesh_ports(config, workers)
    except ConfigError as exc:
        _fail(str(exc))


def _check_files(config) -> None:
    """Entries must compile (modules exist) and certificates load before anything starts; plain passwords warn."""
    from cluster import access, tls
    from cluster.entry_spec import EntryError, check_spec
    from cluster.token_keys import TokenKeyError, load_key
    for index, server in enumerate(config.node.servers):
        if server.entry:
            try:
                check_spec(server.entry, config.base_dir)
            except EntryError as exc:
                _fail(f"node.servers[{index}].entry: {exc}")
    for where, settings, _ in tls.listeners(config):
        try:
            tls.server_context(settings, config, where)
        except tls.TlsError as exc:
            _fail(str(exc))
    for index, server in enumerate(config.node.servers):   # each auth.jwt key readable, fit for its algorithms
        if server.auth and server.auth.jwt:
            try:
                load_key(server.auth.jwt, config.resolve)
            except TokenKeyError as exc:
                _fail(f"node.servers[{index}].auth.jwt.{exc}")
    for index, user in enumerate(config.access.users):
        if not access.is_hashed(user.password):
            click.echo(f"meshgate: warning: access.users[{index}].password is the password itself; "
                       "store the hash `meshgate passwd` prints instead", err=True)


def _status_url(config, address) -> str:
    api = config.coordinator.api
    if address is None:
        host = "127.0.0.1" if api.bind in ("0.0.0.0", "::", "") else api.bind
        address = f"{host}:{api.port}"
    return f"{'https' if api.tls else 'http'}://{address}/v1/status"


def _fetch_status(url: str, headers: dict, tls_context) -> dict:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=3, context=tls_context) as response:
        return ujson.loads(response.read())


def _password(prompt: str, confirm: bool) -> str:
    """A password from the terminal (asked, twice with `confirm`) or one line of standard input."""
    if sys.stdin.isatty():
        return click.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
    return sys.stdin.readline().rstrip("\r\n")


@main.command()
def passwd():
    """Read a password (twice on a terminal, once from a pipe) and print its hash for access.users[].password."""
    from cluster import access
    password = _password("Password", confirm=True)
    if not password:
        click.echo("meshgate: an empty password is not allowed", err=True)
        sys.exit(1)
    click.echo(access.hash_password(password))


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


# ADDRESS is the node's node.advertise: it tells apart machines that share a host name.
_COLUMNS = ("NODE", "HOST", "ADDRESS", "PID", "CPU%", "RSS", "CONNS", "CHANNELS", "CONSUMERS", "QUEUE", "IN/s", "OUT/s",
            "UPTIME")


def _advertised(api_server: str) -> str:
    """The host of a node's `api_server` (`HOST:PORT`, `[IPv6]:PORT`): its `node.advertise`."""
    host = api_server.rpartition(":")[0] or api_server
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def format_status(document: dict) -> str:
    """The `meshgate status` table (docs/operations.md, meshgate status)."""
    rows = [_COLUMNS]
    for n in document["nodes"]:
        rows.append((str(n["node_id"]), n["host"], _advertised(n["api_server"]), str(n["pid"]), f"{n['cpu']:.1f}",
                     _size(n["rss"]), str(n["clients"]), str(n["channels"]), str(n["consumers"]), str(n["queue_depth"]),
                     f"{n['in_rate']:.0f}", f"{n['out_rate']:.0f}", _duration(n["uptime"])))
    t = document["totals"]
    rows.append(("TOTAL", f"{t['nodes']} nodes", "", "", f"{t['cpu']:.1f}", _size(t["rss"]), str(t["clients"]),
                 str(t["channels"]), str(t["consumers"]), str(t["queue_depth"]), f"{t['in_rate']:.0f}",
                 f"{t['out_rate']:.0f}", _duration(document["coordinator"]["uptime"])))
    rows = [[_printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _printable(cell: str) -> str:
    """What a coordinator reports is shown, never obeyed by the terminal: control characters become '?'."""
    return "".join(char if char.isprintable() else "?" for char in cell)


@main.command()
@click.option("-c", "--config", "path", type=click.Path(dir_okay=False), help=_CONFIG_HELP)
@click.option("--coordinator", "address", help="Coordinator HTTP address, HOST:PORT (default from the config).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw /v1/status document.")
@click.option("--watch", is_flag=True, help="Refresh every 2 seconds until interrupted.")
@click.option("--user", help="API user (with access.users); the password comes from MESHGATE_PASSWORD or is asked.")
def status(path, address, as_json, watch, user):
    """Show every node of the cluster; exit 1 when the coordinator cannot be reached."""
    import base64
    import os
    import ssl
    config = _load(path)
    url = _status_url(config, address)
    headers = {}
    if user:
        password = os.environ.get("MESHGATE_PASSWORD")
        if password is None:
            password = _password(f"Password for {user}", confirm=False)
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    tls_context = None
    if config.coordinator.api.tls:   # a self-signed certificate of this cluster is trusted as its own
        tls_context = ssl.create_default_context(cafile=config.resolve(config.coordinator.api.tls.cert_file))
    try:
        _show_status(url, as_json, watch, headers, tls_context)
    except KeyboardInterrupt:   # the way out of --watch
        pass


def _show_status(url: str, as_json: bool, watch: bool, headers: dict, tls_context) -> None:
    while True:
        try:
            document = _fetch_status(url, headers, tls_context)
        except urllib.error.HTTPError as exc:
            click.echo(f"meshgate: the coordinator at {url} refused: HTTP {exc.code}"
                       f"{' (give --user NAME)' if exc.code == 401 else ''}", err=True)
            sys.exit(1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            click.echo(f"meshgate: coordinator not reachable at {url}: {getattr(exc, 'reason', exc)}", err=True)
            sys.exit(1)
        output = ujson.dumps(document, indent=2) if as_json else format_status(document)
        if watch:
            click.clear()
        click.echo(output)
        if not watch:
            return
        time.sleep(2)


def _claim(text: str) -> tuple:
    """`k=v` of `meshgate token --claim`: the value as JSON when it is JSON, else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"{text!r}: expected NAME=VALUE", param_hint="--claim")
    try:
        return name, ujson.loads(value)
    except ValueError:
        return name, value


@main.command()
@click.option("--secret", required=True, help="The server's auth.jwt.secret (HS256).")
@click.option("--sub", required=True, help="The sub claim: who the connection is.")
@click.option("--ttl", type=click.IntRange(min=1), default=3600, show_default=True,
              help="Seconds until the token expires (exp).")
@click.option("--claim", "claims", multiple=True, metavar="NAME=VALUE",
              help="One more claim (repeatable); VALUE is read as JSON when it is JSON (5, true, [1]), else text.")
@click.option("--channels", help="Channels to subscribe the connection to, comma-separated (the channels claim).")
def token(secret, sub, ttl, claims, channels):
    """Print an HS256 token for a client server with auth.jwt (for tests and demos)."""
    import jwt
    from cluster.protocol import ApiError, parse_name
    now = int(time.time())
    payload = dict(_claim(text) for text in claims)
    payload.update(sub=sub, iat=now, exp=now + ttl)
    if channels is not None:
        try:
            payload["channels"] = [parse_name(name, "--channels") for name in channels.split(",")]
        except ApiError as exc:
            raise click.BadParameter(exc.message.partition(": ")[2], param_hint="--channels") from None
    click.echo(jwt.encode(payload, secret, algorithm="HS256"))


if __name__ == "__main__":
    main()
