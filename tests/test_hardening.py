"""What a stranger (or a broken key holder) could once make a process do, and now cannot.

Real processes where the behaviour is a process's (request bodies read before
the credentials check, a reload that would open the API); the pure parts
(the connection budget, the per-address limit on failed credentials, the
figure bounds, the log formatter) are called directly.
"""

import asyncio
import base64
import logging
import socket
import time

import pytest
import yaml
from tornado.httpserver import HTTPServer

from cluster import access, config as config_module, http_server, ids, live, logs, mesh
from cluster.config import UserConfig
from coordinator.registry import Registry
from conftest import Cluster, WAIT, running

USER = ("admin", "admin-pw")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One node process with a user, and a client server."""
    with running(Cluster(tmp_path_factory.mktemp("hardening"), workers=1, credentials=USER,
                         access={"users": [{"username": USER[0], "password": USER[1]}]})) as instance:
        yield instance


def _bytes_taken(port: int, head: bytes, total: int = 24 * 1024 * 1024) -> int:
    """Sends `head` and then up to `total` bytes of body; returns how many went before the server stopped it."""
    sent = 0
    chunk = b"x" * (256 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(head)
        deadline = time.monotonic() + WAIT
        try:
            while sent < total and time.monotonic() < deadline:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:   # reset or broken pipe: the server closed without reading the body
            pass
    return sent


@pytest.mark.parametrize("where, path", [
    ("api_port", "/nope"), ("api_port", "/ws/v1"), ("api_port", "/v1/mesh/publish"),
    ("coordinator_port", "/v1/status"), ("coordinator_port", "/version"), ("client_port", "/"),
])
def test_a_stranger_cannot_make_a_process_read_a_big_body(cluster, where, path):
    """A 24 MiB body without credentials is not read: the connection ends long before it is sent."""
    port = getattr(cluster, where)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {24 * 1024 * 1024}\r\n\r\n").encode()
    assert _bytes_taken(port, head) < 12 * 1024 * 1024
    assert cluster.http("/v1/mesh/publish", {"c": "after", "d": "x"})[0] == 200   # and it goes on serving


def test_a_reload_cannot_open_an_api_that_listens_beyond_loopback(tmp_path):
    """SIGHUP with no users while the running API bind is not loopback changes nothing (the users stay)."""
    path = tmp_path / "meshgate.yaml"
    users = [{"username": "u", "password": "p"}]
    path.write_text(yaml.safe_dump({"access": {"users": users}, "node": {"api": {"bind": "0.0.0.0"}}}))
    running = config_module.load(str(path))
    gate = access.Access(running)
    path.write_text(yaml.safe_dump({"node": {"api": {"bind": "127.0.0.1"}}}))   # no users, a loopback bind
    assert live.reload(running, gate, []) is None
    assert not gate.users.open and "u" in gate.users.by_name


def test_failed_credentials_are_limited_per_address():
    """After ten failures an address is answered 401 without a check; another address is not held up."""
    users = access.Users([UserConfig("u", "right")])
    wrong = "Basic " + base64.b64encode(b"u:wrong").decode()
    right = "Basic " + base64.b64encode(b"u:right").decode()

    async def go():
        messages = []
        for _ in range(12):
            with pytest.raises(access.Denied) as refused:
                await users.authenticate(wrong, "203.0.113.9")
            messages.append(refused.value.message)
        assert messages[:10] == ["wrong user name or password"] * 10
        assert all("too many failed" in message for message in messages[10:])
        with pytest.raises(access.Denied):   # even the right password, from that address, waits its turn
            await users.authenticate(right, "203.0.113.9")
        assert (await users.authenticate(right, "198.51.100.1")).name == "u"
    asyncio.run(go())


def test_a_reload_keeps_what_was_remembered_of_unchanged_users():
    """A verified credential of a user that did not change is still remembered by the reloaded table."""
    first = access.Users([UserConfig("u", "pw"), UserConfig("v", "pw")])
    header = "Basic " + base64.b64encode(b"u:pw").decode()
    asyncio.run(first.authenticate(header, "127.0.0.1"))
    second = access.Users([UserConfig("u", "pw"), UserConfig("v", "changed")], previous=first)
    assert list(second._verified.values()) == [second.by_name["u"]]


def test_figures_are_bounded_so_totals_stay_json():
    """A heartbeat figure over 2**53 (or 1e308) is refused; one at the bound reads."""
    for figure in (10 ** 19, 1.7e308):
        with pytest.raises(mesh.FrameError):
            mesh.read_control(mesh.encode_control(mesh.Heartbeat(1, {"rss": figure})), mesh.FROM_NODE)
    assert mesh.read_control(mesh.encode_control(mesh.Heartbeat(1, {"rss": mesh.MAX_FIGURE})), mesh.FROM_NODE)


def test_a_node_id_released_with_a_far_future_id_ms_does_not_push_ids_out_of_range():
    """id_ms far ahead of the clock is not believed: the id's next holder starts at most a minute ahead."""
    registry = Registry()
    info = mesh.Register(5, "h", 1, "h:1", "tcp://h:1", 0.0, mesh.NodeState())
    registry.register(b"a", info, now=0, wall_ms=1_800_000_000_000)
    registry.heartbeat(b"a", 5, {"id_ms": 9e15}, now=1)
    registry.remove(5, wall_ms=1_800_000_000_000)
    node_id, not_before = registry.register(b"b", info._replace(node_id=0), now=2, wall_ms=1_800_000_000_000)
    assert not_before <= 1_800_000_000_000 + 60_000
    generator = ids.IdGenerator(node_id, not_before)
    assert generator.make() < 2 ** 63
    with pytest.raises(ValueError):
        ids.IdGenerator(1, ids.MAX_ID_MS)


def test_log_lines_cannot_be_forged_through_what_they_quote(capsys):
    """A message quoting a newline (a token's header, a name) stays on one line; a traceback keeps its lines."""
    logs.setup("info", "text", "test")
    logging.getLogger("meshgate.test").info("refused: %s", "x\n2026-01-01 00:00:00 FORGED INFO line")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\\x0a2026-01-01" in err


def test_a_process_takes_no_connection_beyond_its_budget():
    """Past the budget a new connection is closed at once (never an EMFILE spin); below it, it is served."""
    async def go():
        saved = http_server.BUDGET.limit
        server = http_server.BoundedHTTPServer(lambda request: None)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        server.add_socket(sock)
        port = sock.getsockname()[1]
        try:
            http_server.BUDGET.limit = http_server.BUDGET.held() + 1
            refused_before = http_server.BUDGET.refused
            loop = asyncio.get_running_loop()
            held = socket.create_connection(("127.0.0.1", port))
            await asyncio.sleep(0.1)
            extra = socket.create_connection(("127.0.0.1", port))
            extra.settimeout(WAIT)
            assert await loop.run_in_executor(None, extra.recv, 1) == b""   # closed at once
            assert http_server.BUDGET.refused == refused_before + 1
            held.close()
            extra.close()
        finally:
            http_server.BUDGET.limit = saved
            server.stop()
    asyncio.run(go())
    assert issubclass(http_server.BoundedHTTPServer, HTTPServer)
