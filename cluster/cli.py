"""The `meshgate` command: click commands only; they parse options and call the modules."""

import sys
import time
import urllib.error
import urllib.request

import click
import ujson

from cluster import __version__, config as config_module
from cluster.config import ConfigError

_CONFIG_HELP = "YAML configuration file (default: built-in defaults)."


def _load(path, workers=None, coordinator=None):
    try:
        return config_module.override(config_module.load(path), workers=workers, coordinator=coordinator)
    except ConfigError as exc:
        click.echo(f"meshgate: configuration error: {exc}", err=True)
        sys.exit(2)


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
    _check_entries(config)
    _check_token_keys(config)
    count = resolve_workers(config.node.workers)
    _check_startable(config, count)
    _setup_supervisor_logging(config)
    sys.exit(Supervisor(path, count, coordinator=with_coordinator, coordinator_address=coordinator_address).run())


@main.command()
@click.option("-c", "--config", "path", type=click.Path(dir_okay=False), help=_CONFIG_HELP)
@click.option("--fresh", is_flag=True, hidden=True, help="First start of a cluster: no node can hold an id yet.")
def coordinator(path, fresh):
    """Run the coordinator (the control plane) alone."""
    from coordinator.app import run
    run(_load(path), fresh=fresh)


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
def node_process(path, worker, coordinator_address):
    """One node process (started by the supervisor)."""
    from node.app import run
    sys.exit(run(_load(path, coordinator=coordinator_address), worker))


def _check_startable(config, workers: int) -> None:
    """Checks that need the resolved worker count; exits 2 like any configuration error."""
    try:
        config_module.check_mesh_ports(config, workers)
    except ConfigError as exc:
        click.echo(f"meshgate: configuration error: {exc}", err=True)
        sys.exit(2)
    if config.access.users:
        click.echo("meshgate: warning: access.users is not enforced in this version; "
                   "the API is open to anyone who can reach its port", err=True)


def _check_entries(config) -> None:
    """Entry files must compile (and modules exist) before anything starts."""
    from cluster.entry_spec import EntryError, check_spec
    for index, server in enumerate(config.node.servers):
        if server.entry:
            try:
                check_spec(server.entry, config.base_dir)
            except EntryError as exc:
                click.echo(f"meshgate: configuration error: node.servers[{index}].entry: {exc}", err=True)
                sys.exit(2)


def _check_token_keys(config) -> None:
    """Each `auth.jwt` key must be readable and fit its algorithms before anything starts."""
    from cluster.token_keys import TokenKeyError, load_key
    for index, server in enumerate(config.node.servers):
        if server.auth and server.auth.jwt:
            try:
                load_key(server.auth.jwt, config.resolve)
            except TokenKeyError as exc:
                click.echo(f"meshgate: configuration error: node.servers[{index}].auth.jwt.{exc}", err=True)
                sys.exit(2)


def _status_url(config, address) -> str:
    if address is None:
        api = config.coordinator.api
        host = "127.0.0.1" if api.bind in ("0.0.0.0", "::", "") else api.bind
        address = f"{host}:{api.port}"
    return f"http://{address}/v1/status"


def _fetch_status(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=3) as response:
        return ujson.loads(response.read())


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


_COLUMNS = ("NODE", "HOST", "PID", "CPU%", "RSS", "CONNS", "CHANNELS", "CONSUMERS", "QUEUE", "IN/s", "OUT/s", "UPTIME")


def format_status(document: dict) -> str:
    """The `meshgate status` table (docs/operations.md, meshgate status)."""
    rows = [_COLUMNS]
    for n in document["nodes"]:
        rows.append((str(n["node_id"]), n["host"], str(n["pid"]), f"{n['cpu']:.1f}", _size(n["rss"]),
                     str(n["clients"]), str(n["channels"]), str(n["consumers"]), str(n["queue_depth"]),
                     f"{n['in_rate']:.0f}", f"{n['out_rate']:.0f}", _duration(n["uptime"])))
    t = document["totals"]
    rows.append(("TOTAL", f"{t['nodes']} nodes", "", f"{t['cpu']:.1f}", _size(t["rss"]), str(t["clients"]),
                 str(t["channels"]), str(t["consumers"]), str(t["queue_depth"]), f"{t['in_rate']:.0f}",
                 f"{t['out_rate']:.0f}", _duration(document["coordinator"]["uptime"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


@main.command()
@click.option("-c", "--config", "path", type=click.Path(dir_okay=False), help=_CONFIG_HELP)
@click.option("--coordinator", "address", help="Coordinator HTTP address, HOST:PORT (default from the config).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw /v1/status document.")
@click.option("--watch", is_flag=True, help="Refresh every 2 seconds until interrupted.")
def status(path, address, as_json, watch):
    """Show every node of the cluster; exit 1 when the coordinator cannot be reached."""
    url = _status_url(_load(path), address)
    try:
        _show_status(url, as_json, watch)
    except KeyboardInterrupt:   # the way out of --watch
        pass


def _show_status(url: str, as_json: bool, watch: bool) -> None:
    while True:
        try:
            document = _fetch_status(url)
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
