"""Two machines on one: the layout of docs/operations.md, "Trying it on one machine", run as the docs write it.

The key, the two configuration files and the commands are read from that
section (only the port numbers are swapped for free ones), so the docs and
this test cannot drift apart. Machine A (127.0.0.2) runs the coordinator and
a `meshgate node` group, machine B (127.0.0.3) another group, and every API
call below crosses from one machine to the other.
"""

import itertools
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from cluster import cluster_key
from conftest import MESHGATE, WAIT, Cluster, free_port, stop_process, wait_until

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
HEADING = "### Trying it on one machine"
A, B = "127.0.0.2", "127.0.0.3"
# What the docs say differs between the two files: each machine's own addresses.
PER_MACHINE = {"node.advertise", "node.mesh.bind", "node.api.bind", "node.servers[0].bind"}


def _section() -> str:
    """The section's text, up to the next heading (a `#` line outside a code block)."""
    lines, fenced = DOC.read_text(encoding="utf-8").split(HEADING, 1)[1].splitlines(keepends=True), False
    for index, line in enumerate(lines):
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{1,3} ", line):
            return "".join(lines[:index])
    return "".join(lines)


def _files(section: str) -> dict:
    """The heredocs of the section, `cat > NAME <<'EOF' ... EOF`: name -> parsed YAML."""
    found = re.findall(r"^cat > (\S+) <<'EOF'\n(.*?)^EOF$", section, re.M | re.S)
    return {name: yaml.safe_load(body) for name, body in found}


def _commands(section: str) -> dict:
    """The `meshgate` command lines of the section's code blocks, by subcommand, as argv lists."""
    text = re.sub(r"<<'EOF'\n.*?^EOF$", "", section, flags=re.M | re.S)
    commands = {}
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S):
        for line in block.splitlines():
            if line.startswith("meshgate "):
                argv = list(itertools.takewhile(lambda word: word not in ("2>", "&"), shlex.split(line, comments=True)))
                commands.setdefault(argv[1], []).append(argv)
    return commands


def _differences(a, b, path: str = "") -> set:
    if isinstance(a, dict) and isinstance(b, dict):
        return {found for key in a.keys() | b.keys()
                for found in _differences(a.get(key), b.get(key), f"{path}.{key}" if path else key)}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return {found for index, (x, y) in enumerate(zip(a, b)) for found in _differences(x, y, f"{path}[{index}]")}
    return set() if a == b else {path}


def _rebased(value, port, key: str = None):
    """`value` (a configuration) with every port number N replaced by `port(N)`."""
    if isinstance(value, dict):
        return {name: _rebased(item, port, name) for name, item in value.items()}
    if isinstance(value, list):
        return [_rebased(item, port) for item in value]
    if key == "port" and isinstance(value, int) and value:
        return port(value)
    if key == "coordinator" and isinstance(value, str):
        host, _, number = value.rpartition(":")
        return f"{host}:{port(int(number))}"
    return value


class Machine(Cluster):
    """One "machine" of the layout, reached on its own address through the Cluster helpers; it starts nothing."""

    def __init__(self, config: dict, log_path: Path):
        node = config["node"]
        assert node["api"]["bind"] == node["servers"][0]["bind"] == node["advertise"], "one address per machine"
        self.host, self.api_port, self.client_port = node["advertise"], node["api"]["port"], node["servers"][0]["port"]
        self.coordinator_host = config["coordinator"]["api"]["bind"]
        self.coordinator_port = config["coordinator"]["api"]["port"]
        self.workers, self.mesh_port = node["workers"], node["mesh"]["port"]
        self.http_scheme, self.ws_scheme, self.ssl_context, self.sslopt = "http", "ws", None, None
        self.credentials, self.client_options, self._open = None, {}, []
        self.process, self.log_path = None, log_path

    def node_ids(self) -> set:
        """The node ids whose api_server is on this machine, from /v1/status."""
        return {n["node_id"] for n in self.status()["nodes"] if n["api_server"] == f"{self.host}:{self.api_port}"}


def _listening(pid: int) -> set:
    """`(address, port)` of every TCP socket that process `pid` and its children listen on."""
    parent = psutil.Process(pid)
    return {(conn.laddr.ip, conn.laddr.port) for process in (parent, *parent.children(recursive=True))
            for conn in process.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN}


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    """The docs' layout, started by the docs' commands: `(machine A, machine B, run details)`."""
    for address in (A, B):
        with socket.socket() as sock:
            try:
                sock.bind((address, 0))
            except OSError as exc:
                pytest.skip(f"cannot bind {address} ({exc}): the layout needs 127.0.0.0/8 on loopback, as Linux has it")
    section = _section()
    files, commands = _files(section), _commands(section)
    tmp = tmp_path_factory.mktemp("two-machines")
    ports = {}

    def port(number: int) -> int:   # the same number on either machine is the same free port (other address)
        if number not in ports:
            ports[number] = free_port(count=max(config["node"]["workers"] for config in files.values()))
        return ports[number]

    configs = {}
    for name, config in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        configs[name] = _rebased(config, port)
        (tmp / name).write_text(yaml.safe_dump(configs[name]))
    [keygen] = commands["keygen"]
    made = subprocess.run([MESHGATE, *keygen[1:]], cwd=tmp, capture_output=True, text=True, timeout=WAIT)
    assert made.returncode == 0, made.stderr
    log_path = tmp / "two-machines.log"
    by_address = {config["node"]["advertise"]: Machine(config, log_path) for config in configs.values()}
    a, b = by_address[A], by_address[B]
    started = []
    with open(log_path, "wb") as log:
        try:
            for argv in commands["coordinator"] + commands["node"]:
                started.append((argv, subprocess.Popen([MESHGATE, *argv[1:]], cwd=tmp, stdout=log,
                                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)))

            def ready():
                for argv, process in started:
                    assert process.poll() is None, f"{shlex.join(argv)} exited:\n{a.logs()}"
                try:
                    return len(a.status()["nodes"]) == a.workers + b.workers and all(
                        machine.http("/v1/mesh/publish", {"c": "readiness-probe", "d": "x"})[0] == 200
                        for machine in (a, b))
                except OSError:
                    return False

            wait_until(ready, what="both machines' nodes to register and serve")
            yield a, b, {"tmp": tmp, "commands": commands, "configs": configs, "started": started, "ports": ports}
        finally:
            for machine in (a, b):
                machine.stop()   # closes its clients; it started no process
            for _, process in reversed(started):   # the node groups first, then the coordinator
                stop_process(process)


def _group(run, name: str, address: str) -> subprocess.Popen:
    """The process started by `meshgate NAME` with machine ADDRESS's file."""
    [process] = [process for argv, process in run["started"]
                 if argv[1] == name and run["configs"][argv[argv.index("-c") + 1]]["node"]["advertise"] == address]
    return process


def test_the_files_differ_in_each_machines_addresses_only():
    """The docs' two files differ only in node.advertise and the binds of mesh, API and client server."""
    files = list(_files(_section()).values())
    assert len(files) == 2
    assert _differences(*files) == PER_MACHINE
    assert {config["node"]["advertise"] for config in files} == {A, B}


def test_each_machine_listens_on_its_own_address_only(machines):
    """Nothing listens on a wildcard address: coordinator and group A on 127.0.0.2, group B on 127.0.0.3."""
    a, b, run = machines
    ports, config = run["ports"], next(iter(run["configs"].values()))
    coordinator = _group(run, "coordinator", A)
    assert _listening(coordinator.pid) == {(A, config["coordinator"]["registry"]["port"]), (A, a.coordinator_port)}
    for machine in (a, b):
        mesh = {(machine.host, machine.mesh_port + worker) for worker in range(machine.workers)}
        expected = {(machine.host, machine.api_port), (machine.host, machine.client_port)} | mesh
        assert _listening(_group(run, "node", machine.host).pid) == expected
    assert sorted(ports) == [6786, 6787, 6789, 6790, 7000]   # what the docs' table and text name


def test_the_key_is_private_and_never_on_a_command_line(machines):
    """The key file is mode 0600, and no process of the layout has the key in its arguments or environment."""
    a, b, run = machines
    [keygen] = run["commands"]["keygen"]
    path = run["tmp"] / keygen[keygen.index("-o") + 1]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    secret = cluster_key.read_file(str(path)).secret.decode()
    for _, process in run["started"]:
        parent = psutil.Process(process.pid)
        for member in (parent, *parent.children(recursive=True)):
            assert not any(secret in word for word in member.cmdline())
            assert not any(secret in value for value in member.environ().values())


def test_status_tells_the_machines_apart(machines):
    """`meshgate status` as the docs run it: an ADDRESS per node, two nodes on each machine's address."""
    a, b, run = machines
    [command] = run["commands"]["status"]
    result = subprocess.run([MESHGATE, *command[1:]], cwd=run["tmp"], capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    header, *rows, total = [line.split() for line in result.stdout.strip().splitlines()]
    assert header[:4] == ["NODE", "HOST", "ADDRESS", "PID"] and total[0] == "TOTAL"
    shown = {int(row[0]): row[2] for row in rows}
    assert sorted(shown.values()) == [A, A, B, B]
    document = a.status()
    for node in document["nodes"]:   # the /v1/status document carries the same address
        address = shown[node["node_id"]]
        machine = a if address == A else b
        assert node["api_server"] == f"{address}:{machine.api_port}"
        assert node["mesh_point"].startswith(f"tcp://{address}:")
    other = command[:command.index("-c") + 1] + [name for name in run["configs"] if name not in command] + ["--json"]
    from_b = subprocess.run([MESHGATE, *other[1:]], cwd=run["tmp"], capture_output=True, text=True, timeout=WAIT)
    assert from_b.returncode == 0, from_b.stderr   # machine B's file reaches the same coordinator
    assert {n["node_id"] for n in json.loads(from_b.stdout)["nodes"]} == set(shown)


def test_send_crosses_both_ways(machines):
    """mesh.send through one machine's API reaches a client of the other machine (HTTP one way, /ws/v1 back)."""
    a, b, _ = machines
    [on_a], [on_b] = a.clients(1), b.clients(1)
    assert on_a.node in a.node_ids() and on_b.node in b.node_ids()
    assert b.http("/v1/mesh/send", {"c": on_a.client_id, "d": "from machine B"}) == (200, {"E": None, "r": {"s": True}})
    assert on_a.recv() == "from machine B"
    reply = a.api().request("mesh.send", {"c": on_b.client_id, "d": "from machine A"})
    assert reply["E"] is None and reply["r"] == {"s": True}
    assert on_b.recv() == "from machine A"


def test_conn_call_subscribes_and_publish_counts_both_machines(machines):
    """Clients of each machine subscribed through the other's API; a publish from either counts all of them."""
    a, b, _ = machines
    on_a, on_b = a.clients(2, nodes=2), b.clients(2, nodes=2)   # every node process of both machines
    room = f"room-{uuid.uuid4().hex[:8]}"
    for api, clients in ((b.api(), on_a), (a.api(), on_b)):
        for client in clients:
            reply = api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": [room]})
            assert reply["E"] is None and reply["r"] == {"s": True}, reply
    everyone = on_a + on_b
    reply = a.api().request("mesh.publish", {"c": room, "d": "over /ws/v1 of A"})
    assert reply["E"] is None and reply["r"] == {"s": len(everyone), "f": 0}
    assert b.http("/v1/mesh/publish", {"c": room, "d": "over HTTP of B"})[1]["r"] == {"s": len(everyone), "f": 0}
    for client in everyone:
        assert client.recv() == "over /ws/v1 of A"
        assert client.recv() == "over HTTP of B"
    first = on_b[0]
    reply = a.api().request("conn.call", {"c": first.client_id, "f": "unsubscribe", "a": [room]})
    assert reply["E"] is None
    assert b.http("/v1/mesh/publish", {"c": room, "d": "one less"})[1]["r"] == {"s": len(everyone) - 1, "f": 0}
    assert first.nothing_for(0.3)


def test_context_set_on_one_machine_is_read_on_the_other(machines):
    """conn.call set_context_value through machine A's API, get_context through machine B's, for a client of B."""
    a, b, _ = machines
    [client] = b.clients(1)
    value = uuid.uuid4().hex
    assert a.api().request("conn.call", {"c": client.client_id, "f": "set_context_value", "a": ["k", value]})["E"] is None
    reply = b.api().request("conn.call", {"c": client.client_id, "f": "get_context"})
    assert reply["r"] == {"s": True, "d": {"k": value}}


@pytest.mark.parametrize("consumer_on, client_on", [("B", "A"), ("A", "B")])
def test_queue_consumption_crosses_machines(machines, consumer_on, client_on):
    """A client on one machine sends; a consumer on the other machine's API receives its message."""
    a, b, _ = machines
    consumers, senders = {"A": a, "B": b}[consumer_on], {"A": a, "B": b}[client_on]
    [client] = senders.clients(1)
    topic = "default"   # the docs' client servers keep the default entry and topic
    consumer = consumers.api()
    assert consumer.request("queue.pop", {"t": [topic]})["E"] is None
    marker = f"across-{uuid.uuid4().hex[:8]}"
    client.ws.send(marker)

    def mine():
        event = consumer.event()
        return event if event["p"]["d"]["frame"]["data"] == marker else None   # others waited from earlier tests

    event = wait_until(mine, what="the client's message at the other machine's consumer")
    assert event["p"]["c"] == client.client_id and event["p"]["t"] == topic
    assert event["p"]["n"] == client.node and client.node in senders.node_ids()
    assert consumer.request("queue.unpop", {})["r"] == {"s": True}
    consumer.ws.close()
