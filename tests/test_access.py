"""API users, roles, host patterns and the browser rules, on a real cluster (docs/protocol.md, Access control).

One module cluster with users; every row of the access rules is a request by
a real HTTP or WebSocket client. The pure parts (host patterns, password
hashes, the browser rules, the credential cache) are tested by calling them.
"""

import asyncio
import base64
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from types import SimpleNamespace

import pytest
import websocket
import yaml
from tornado.httputil import HTTPHeaders

from cluster import access
from cluster.config import from_dict
from conftest import Client, Cluster, MESHGATE, WAIT, assert_error, running, wait_until

ADMIN = ("admin", "s3cret-admin")
READER = ("reader", "plain-reader")          # stored as the password itself (accepted, with a warning)
WRITER = ("writer", "writer-pw")             # write only: no coordinator GETs
FAR = ("far", "far-pw")                      # may connect from 10.0.0.0/8 only
LOOPBACK = ("loop", "loop-pw")               # a glob on the dotted address
ORIGIN = "http://app.example"


def _users() -> list:
    return [
        {"username": ADMIN[0], "password": access.hash_password(ADMIN[1], n=2 ** 10)},
        {"username": READER[0], "password": READER[1], "roles": ["read"]},
        {"username": WRITER[0], "password": access.hash_password(WRITER[1], n=2 ** 10), "roles": ["write"]},
        {"username": FAR[0], "password": FAR[1], "host": "10.0.0.0/8"},
        {"username": LOOPBACK[0], "password": LOOPBACK[1], "host": "127.*.*.*"},
    ]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two node processes with API users; the helpers of conftest send the admin's credentials."""
    with running(Cluster(tmp_path_factory.mktemp("access"), workers=2, access={"users": _users()},
                         credentials=ADMIN, api={"allowed_origins": [ORIGIN]})) as instance:
        yield instance


def _http(cluster, path, credentials=None, body=None, headers=None, port=None, method=None):
    """`(status, headers, decoded body)` of one request to the node API (or another port), with these credentials."""
    data = json.dumps(body if body is not None else {"c": "news", "d": "x"}).encode() if method != "GET" else None
    request = urllib.request.Request(f"http://127.0.0.1:{port or cluster.api_port}{path}", data=data,
                                     method=method or "POST",
                                     headers={**({"Content-Type": "application/json"} if data else {}),
                                              **(cluster.auth(credentials) if credentials else {}),
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read() or b"null")


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# --- the backend API over HTTP -------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {},
    _basic(ADMIN[0], "wrong"),
    _basic("nobody", "x"),
    {"Authorization": "Basic !!!not-base64"},
    {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
    {"Authorization": "Bearer abc"},
], ids=["none", "wrong-password", "unknown-user", "not-base64", "no-colon", "not-basic"])
def test_missing_or_wrong_credentials_are_401_with_a_challenge(cluster, headers):
    """No, wrong or malformed credentials: HTTP 401, WWW-Authenticate Basic realm="meshgate", error 102."""
    status, response_headers, body = _http(cluster, "/v1/mesh/publish", headers=headers)
    assert status == 401 and response_headers["WWW-Authenticate"] == 'Basic realm="meshgate"'
    assert_error((status, body), 102, http_status=401)


def test_unknown_paths_are_checked_first(cluster):
    """An unknown path without credentials is 401, not 404 (nothing is learnt without a user)."""
    assert _http(cluster, "/v1/nope")[0] == 401
    assert _http(cluster, "/v1/nope", ADMIN)[0] == 404


@pytest.mark.parametrize("credentials", [ADMIN, WRITER, LOOPBACK])
def test_users_with_write_publish(cluster, credentials):
    """A user with the write role whose host pattern matches publishes (hashed, plain, glob host)."""
    status, _, body = _http(cluster, "/v1/mesh/publish", credentials)
    assert (status, body) == (200, {"E": None, "r": {"s": 0, "f": 0}})


def test_a_read_only_user_may_not_publish_or_send(cluster):
    """The read role does not allow mesh.publish or mesh.send: HTTP 403, error 102 naming the role."""
    for path, body in (("/v1/mesh/publish", None), ("/v1/mesh/send", {"c": "1", "d": "x"})):
        status, _, reply = _http(cluster, path, READER, body=body)
        assert "write" in assert_error((status, reply), 102, http_status=403)


def test_a_host_pattern_that_does_not_match_is_403(cluster):
    """A user whose host pattern (10.0.0.0/8) does not match the peer (127.0.0.1) gets 403, error 102."""
    status, _, body = _http(cluster, "/v1/mesh/publish", FAR)
    assert "may not connect from 127.0.0.1" in assert_error((status, body), 102, http_status=403)


@pytest.mark.parametrize("origin, allowed", [
    ("http://evil.example", False), ("null", False), (ORIGIN, True), (None, True),
])
def test_origin_of_another_site_is_refused_even_with_credentials(cluster, origin, allowed):
    """A cross-site Origin not in node.api.allowed_origins is 403 (102) whatever the credentials; listed ones pass."""
    headers = {"Origin": origin} if origin else {}
    status, _, body = _http(cluster, "/v1/mesh/publish", ADMIN, headers=headers)
    if allowed:
        assert status == 200
    else:
        assert "Origin" in assert_error((status, body), 102, http_status=403)


def test_remembered_credentials_still_meet_every_rule(cluster):
    """Once credentials were verified (and remembered), a wrong password, a missing role, a host
    pattern and a cross-site Origin are still refused, on every node, request after request."""
    for _ in range(4):   # fresh connections: both node processes, each one's cache warm after the first
        assert _http(cluster, "/v1/mesh/publish", ADMIN)[0] == 200
        assert _http(cluster, "/v1/mesh/publish", READER)[0] == 403
        assert _http(cluster, "/v1/mesh/publish", headers=_basic(ADMIN[0], ADMIN[1] + "x"))[0] == 401
        assert _http(cluster, "/v1/mesh/publish", FAR)[0] == 403
        assert _http(cluster, "/v1/mesh/publish", ADMIN, headers={"Origin": "http://evil.example"})[0] == 403


def test_the_requests_own_origin_is_not_cross_site(cluster):
    """An Origin equal to the request's own scheme, host and port is the same site, not refused."""
    own = f"http://127.0.0.1:{cluster.api_port}"
    assert _http(cluster, "/v1/mesh/publish", ADMIN, headers={"Origin": own})[0] == 200


# --- /ws/v1 --------------------------------------------------------------------------------------

def _ws(cluster, credentials=None, **options):
    headers = cluster.auth(credentials) if credentials else {}
    return websocket.create_connection(f"ws://127.0.0.1:{cluster.api_port}/ws/v1", timeout=WAIT,
                                       header=headers, **options)


@pytest.mark.parametrize("credentials, status", [(None, 401), (("admin", "wrong"), 401), (FAR, 403)])
def test_ws_upgrade_needs_credentials(cluster, credentials, status):
    """The /ws/v1 upgrade without (good) credentials, or from a host the user may not use, is refused, no socket."""
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        _ws(cluster, credentials)
    assert refused.value.status_code == status


def test_ws_upgrade_from_another_site_is_refused(cluster):
    """A browser's /ws/v1 upgrade from another site is 403 even with credentials."""
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        _ws(cluster, ADMIN, origin="http://evil.example")
    assert refused.value.status_code == 403


def test_ws_method_a_user_may_not_call_is_102_and_the_connection_stays(cluster, clients):
    """Over /ws/v1 a read-only user's publish and subscribe are 102 with their i; reads work on the same connection."""
    [client] = clients(1)
    api = cluster.api(READER)
    assert_error(api.request("mesh.publish", {"c": "news", "d": "x"}, req_id="p1"), 102, req_id="p1")
    assert_error(api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": ["x"]}, req_id=7),
                 102, req_id=7)
    assert api.request("conn.call", {"c": client.client_id, "f": "get_context"})["r"] == {"s": True, "d": {}}
    assert api.request("queue.pop", {"t": ["access-topic"]})["E"] is None
    assert api.request("queue.unpop", {})["E"] is None


# --- the coordinator HTTP ------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/status", "/v1/nodes", "/metrics"])
def test_coordinator_http_needs_a_reader(cluster, path):
    """Coordinator GETs need credentials (401) of a user with the read role (a write-only user: 403)."""
    port = cluster.coordinator_port
    assert _http(cluster, path, port=port, method="GET")[0] == 401
    assert _http(cluster, path, WRITER, port=port, method="GET")[0] == 403
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=cluster.auth(READER))
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        assert response.status == 200


def test_coordinator_version_is_open(cluster):
    """GET /version needs no credentials (the connmix SDK reads it first)."""
    status, _, body = _http(cluster, "/version", port=cluster.coordinator_port, method="GET")
    assert status == 200 and body["apis"] == ["v1"]


def test_meshgate_status_with_user_and_password_from_the_environment(cluster):
    """`meshgate status --user NAME` takes the password from MESHGATE_PASSWORD; without a user it exits 1."""
    args = [MESHGATE, "status", "-c", str(cluster.config_path)]
    env = {**os.environ, "MESHGATE_PASSWORD": READER[1]}
    done = subprocess.run([*args, "--user", READER[0]], capture_output=True, text=True, timeout=WAIT, env=env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("NODE") and "TOTAL" in done.stdout
    refused = subprocess.run(args, capture_output=True, text=True, timeout=WAIT, stdin=subprocess.DEVNULL)
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr


def test_plain_passwords_are_warned_about_at_start(cluster):
    """A password stored as itself is accepted with a warning naming the key."""
    assert "access.users[1].password is the password itself" in cluster.logs()


# --- SIGHUP ----------------------------------------------------------------------------------------

def test_sighup_adds_a_user_and_closes_a_removed_users_connections(cluster):
    """After SIGHUP a new user works, a removed user's open /ws/v1 is closed 1008, others stay open."""
    kept, doomed = cluster.api(ADMIN), cluster.api(LOOPBACK)
    config = yaml.safe_load(cluster.config_path.read_text())
    newcomer = ("newcomer", "new-pw")
    config["access"]["users"] = [u for u in config["access"]["users"] if u["username"] != LOOPBACK[0]] + [
        {"username": newcomer[0], "password": newcomer[1]}]
    cluster.config_path.write_text(yaml.safe_dump(config))
    assert _http(cluster, "/v1/mesh/publish", newcomer)[0] == 401
    os.kill(cluster.process.pid, signal.SIGHUP)
    wait_until(lambda: _http(cluster, "/v1/mesh/publish", newcomer)[0] == 200
               and _http(cluster, "/v1/mesh/publish", LOOPBACK)[0] == 401, what="every node to reload its users")
    closed = Client(doomed.ws)
    assert closed.close_code() == 1008 and closed.close_reason == "user removed"
    assert kept.request("mesh.publish", {"c": "news", "d": "still"})["E"] is None
    assert "SIGHUP: reloaded" in cluster.logs()


# --- start-up rules ----------------------------------------------------------------------------------

def test_an_open_api_on_a_non_loopback_address_does_not_start(tmp_path):
    """Without users, node.api.bind 0.0.0.0 is refused at start naming access.users."""
    layout = Cluster(tmp_path, workers=1)
    config = yaml.safe_load(layout.config_path.read_text())
    config["node"]["api"]["bind"] = "0.0.0.0"
    layout.config_path.write_text(yaml.safe_dump(config))
    done = subprocess.run([MESHGATE, "start", "-c", str(layout.config_path)], capture_output=True, text=True,
                          timeout=WAIT, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert "access.users: required when node.api.bind is not a loopback address" in done.stderr


def test_passwd_prints_a_hash_that_verifies():
    """`meshgate passwd` with the password on a pipe prints a scrypt hash that checks it, and only it."""
    done = subprocess.run([MESHGATE, "passwd"], input="correct horse\n", capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    stored = done.stdout.strip()
    assert stored.startswith("scrypt$") and access.is_hashed(stored)
    assert access.verify_password("correct horse", stored) and not access.verify_password("correct", stored)
    empty = subprocess.run([MESHGATE, "passwd"], input="\n", capture_output=True, text=True, timeout=WAIT)
    assert empty.returncode == 1


# --- the pure parts --------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, address, matches", [
    ("*", "203.0.113.5", True),
    ("172.*.*.*", "172.16.0.1", True), ("172.*.*.*", "10.172.0.1", False),
    ("10.0.0.0/8", "10.1.2.3", True), ("10.0.0.0/8", "11.0.0.1", False),
    ("10.0.0.0/8", "::ffff:10.1.2.3", True),
    ("192.168.1.7", "192.168.1.7", True), ("192.168.1.7", "192.168.1.8", False),
    ("::1", "::1", True), ("fd00::/8", "fd12::1", True), ("fd00::/8", "fe80::1", False),
    ("10.0.0.0/8", "not-an-address", False),
])
def test_host_patterns(pattern, address, matches):
    """`*`, a glob on the dotted address, a CIDR (IPv4-mapped IPv6 included) and one address."""
    assert access.HostPattern(pattern).matches(address) is matches


@pytest.mark.parametrize("pattern", ["10.0.0.0/33", "hello", "300.1.1.1", ""])
def test_bad_host_patterns_are_refused(pattern):
    """A pattern that is no glob, CIDR or address raises ValueError (config.py names the key)."""
    with pytest.raises(ValueError):
        access.HostPattern(pattern)


@pytest.mark.parametrize("origin, host, scheme, open_api, refused", [
    (None, "127.0.0.1:6789", "http", True, False),
    ("http://127.0.0.1:6789", "127.0.0.1:6789", "http", True, False),
    ("HTTP://127.0.0.1:6789", "127.0.0.1:6789", "http", True, False),
    ("http://localhost", "localhost:80", "http", True, False),
    ("https://127.0.0.1:6789", "127.0.0.1:6789", "http", True, True),     # another scheme is another origin
    ("http://127.0.0.1:6790", "127.0.0.1:6789", "http", True, True),
    ("http://evil.example", "127.0.0.1:6789", "http", True, True),
    (ORIGIN, "127.0.0.1:6789", "http", True, False),                        # listed
    ("http://evil.example", "evil.example", "http", True, True),            # DNS rebinding: Host = Origin
    (None, "evil.example:6789", "http", True, True),
    (None, "evil.example:6789", "http", False, False),                     # with users, any host name
    (None, "api.internal:6789", "http", True, False),                      # listed in allowed_hosts
    (None, "[::1]:6789", "http", True, False),
    (None, None, "http", True, True),
])
def test_browser_rules(origin, host, scheme, open_api, refused):
    """Cross-site Origins are refused unless listed; an open API answers IP addresses, localhost and listed names."""
    problem = access.browser_problem(origin, host, scheme, {ORIGIN}, {"api.internal"}, open_api)
    assert (problem is not None) is refused, problem


def test_password_hashes_verify_in_constant_time_forms():
    """A hash checks its password only; a plain stored password is compared as it is."""
    stored = access.hash_password("pw", n=2 ** 10)
    assert access.verify_password("pw", stored) and not access.verify_password("pW", stored)
    assert access.verify_password("plain", "plain") and not access.verify_password("plain ", "plain")
    assert not access.is_hashed("scrypt$1$8$1$$") and not access.is_hashed("plain")


def _config_users(*pairs):
    from cluster.config import UserConfig
    return [UserConfig(name, stored) for name, stored in pairs]


def test_a_verified_credential_is_remembered(monkeypatch):
    """The hash is computed once per good credential; wrong ones are checked every time."""
    users = access.Users(_config_users(("u", access.hash_password("pw", n=2 ** 10))))
    calls = []
    real = access.verify_password
    monkeypatch.setattr(access, "verify_password", lambda *args: calls.append(args) or real(*args))
    header = "Basic " + base64.b64encode(b"u:pw").decode()

    async def many():
        for _ in range(5):
            assert (await users.authenticate(header, "127.0.0.1")).name == "u"
        for _ in range(2):
            with pytest.raises(access.Denied):
                await users.authenticate("Basic " + base64.b64encode(b"u:bad").decode(), "127.0.0.1")
    asyncio.run(many())
    assert len(calls) == 3


def test_a_reloaded_table_keeps_only_unchanged_users():
    """still_valid: a user whose password entry changed, or who is gone, is no longer valid after a reload."""
    before = access.Users(_config_users(("a", "1"), ("b", "2")))
    after = access.Users(_config_users(("a", "1"), ("b", "changed")))
    assert after.still_valid(before.by_name["a"]).name == "a"
    assert after.still_valid(before.by_name["b"]) is None
    assert access.Users([]).still_valid(before.by_name["a"]) is None


# --- the shipped examples take credentials ---------------------------------------------------------

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _example(name, cluster, *args, user=None, password=None, **options):
    env = {**os.environ, **({"MESHGATE_PASSWORD": password} if password is not None else {})}
    command = [sys.executable, os.path.join(EXAMPLES, name), *args, "--api", f"ws://127.0.0.1:{cluster.api_port}/ws/v1"]
    return command + (["--user", user] if user else []), env


def test_examples_send_credentials_from_user_and_environment(cluster, clients):
    """call.py and consumer.py with --user and MESHGATE_PASSWORD work; call.py without credentials is refused."""
    [client] = clients(1)
    params = json.dumps({"c": client.client_id, "f": "get_context"})
    command, env = _example("call.py", cluster, "conn.call", params, user=READER[0], password=READER[1])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=WAIT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and json.loads(done.stdout)["r"] == {"s": True, "d": {}}, done.stderr
    command, env = _example("call.py", cluster, "conn.call", params)
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=WAIT, stdin=subprocess.DEVNULL)
    assert refused.returncode != 0 and "401" in refused.stderr
    command, env = _example("consumer.py", cluster, user=ADMIN[0], password=ADMIN[1])
    consumer = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
    try:
        assert "consuming topic 'default'" in consumer.stderr.readline()
        marker = f"example-{uuid.uuid4().hex}"
        cluster.client().ws.send(marker)
        deadline, got = time.monotonic() + WAIT, None
        while got != marker and time.monotonic() < deadline:   # skip what other tests left for topic default
            if select.select([consumer.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                got = json.loads(consumer.stdout.readline())["p"]["d"]["frame"]["data"]
        assert got == marker
    finally:
        consumer.terminate()
        consumer.wait(timeout=WAIT)


def _api_request(host, origin=None):
    """What Access reads of an HTTP request: its headers (Tornado's, which take a name in any case), scheme
    and peer."""
    headers = HTTPHeaders({"Host": host, **({"Origin": origin} if origin else {})})
    return SimpleNamespace(headers=headers, protocol="http", remote_ip="127.0.0.1")


def test_the_remembered_browser_rules_follow_a_reload():
    """Access remembers its answers per set of headers; a reload that changes the allowed hosts or origins,
    or closes the API, is honoured at once."""
    request = _api_request
    checks = access.Access(from_dict({}))
    assert checks._browser_problem(request("api.internal:6789")) is not None
    assert checks._browser_problem(request("127.0.0.1:6789", ORIGIN)) is not None
    checks.load(from_dict({"node": {"api": {"allowed_hosts": ["api.internal"], "allowed_origins": [ORIGIN]}}}))
    assert checks._browser_problem(request("api.internal:6789")) is None
    assert checks._browser_problem(request("127.0.0.1:6789", ORIGIN)) is None
    checks.load(from_dict({}))
    assert checks._browser_problem(request("api.internal:6789")) is not None


def test_long_headers_are_checked_but_not_remembered():
    """A stranger's long Origin or Host is answered like any other, and is not kept (the memory is bounded in
    entries and in what each holds)."""
    checks = access.Access(from_dict({}))
    before = access._remembered_browser_problem.cache_info().currsize
    assert "is not an address" in checks._browser_problem(_api_request("h" * 4000 + ".example"))
    assert access._remembered_browser_problem.cache_info().currsize == before
