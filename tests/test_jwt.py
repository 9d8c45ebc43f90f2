"""JSON Web Tokens on client servers (auth.jwt): what is accepted, what is refused 401, what a token grants,
and its expiry, against a real 2-process cluster with keys made at test time."""

import base64
import hashlib
import hmac
import json
import subprocess
import time
import uuid

import jwt
import pytest
import websocket
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from cluster import cluster_key
from conftest import MESHGATE, SCALE, WAIT, Cluster, wait_until

SECRET = "test-secret-of-at-least-32-bytes-0123456789"
AUDIENCE = "meshgate-test"
ISSUER = "https://issuer.test"

ENTRY = '''
import json
from node.entry import queue

def on_handshake(conn, request):
    queue.push("jwt-handshakes", {"query": request.query})
    return True

def on_open(conn):
    conn.send(json.dumps({"claims": dict(conn.claims), "context": conn.context, "channels": sorted(conn.channels)}))
'''


def public_pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


KEYS = {   # path -> (algorithm, private key)
    "/rs": ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    "/es": ("ES256", ec.generate_private_key(ec.SECP256R1())),
    "/ed": ("EdDSA", ed25519.Ed25519PrivateKey.generate()),
}


def claims(**changes) -> dict:
    """Good claims for the `/` server; a change to None leaves that claim out."""
    now = int(time.time())
    base = {"sub": "alice", "aud": AUDIENCE, "iss": ISSUER, "exp": now + 300, "role": "admin", "extra": 7}
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def hs256(payload: dict, secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict, payload: dict, sign) -> str:
    """A token built without PyJWT (which refuses to make the hostile ones)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jwt")
    for path, (_, private_key) in KEYS.items():
        (folder / f"{path[1:]}.pem").write_bytes(public_pem(private_key))
    (folder / "entry.py").write_text(ENTRY)
    hs = {"secret": SECRET, "algorithms": ["HS256"]}
    instance = Cluster(folder, workers=2, server={
        "topic": "jwt", "auth": {"jwt": {**hs, "audience": AUDIENCE, "issuer": ISSUER,
                                          "context_claims": ["role", "room"]}},
    }, extra_servers=[
        {"path": "/entry", "topic": "jwt-entry", "entry": str(folder / "entry.py"),
         "auth": {"jwt": {**hs, "context_claims": ["role"]}}},
        {"path": "/lenient", "topic": "jwt-lenient", "auth": {"jwt": {**hs, "leeway": 30}}},
        # Relative to the configuration file, which the cluster writes into the same folder.
        *({"path": path, "topic": f"jwt-{path[1:]}",
           "auth": {"jwt": {"public_key_file": f"{path[1:]}.pem", "algorithms": [algorithm]}}}
          for path, (algorithm, _) in KEYS.items()),
    ])
    instance.start()
    yield instance
    instance.stop()


def connect(cluster: Cluster, path: str, token: str = None, **options) -> websocket.WebSocket:
    query = f"?token={token}" if token is not None else ""
    ws = websocket.create_connection(f"ws://127.0.0.1:{cluster.client_port}{path}{query}", timeout=WAIT, **options)
    cluster._open.append(ws)
    return ws


def refused_status(cluster: Cluster, path: str, token: str = None, **options) -> int:
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        connect(cluster, path, token, **options)
    return refused.value.status_code


def alive(ws: websocket.WebSocket) -> bool:
    ws.ping(b"alive?")
    opcode, _ = ws.recv_data_frame(True)
    return opcode == websocket.ABNF.OPCODE_PONG


def logged(cluster: Cluster, text: str) -> bool:
    return wait_until(lambda: text in cluster.logs(), what=f"the log to say {text!r}")


def client_id_of(cluster: Cluster, ws: websocket.WebSocket, topic: str) -> str:
    """Sends a marker and reads the client id from its queue event."""
    consumer = cluster.api()
    assert consumer.request("queue.pop", [topic])["E"] is None
    marker = f"who-{uuid.uuid4().hex[:8]}"
    ws.send(marker)
    deadline = time.monotonic() + WAIT
    event = consumer.event()
    while event["p"]["d"]["frame"]["data"] != marker:
        event = consumer.event(max(deadline - time.monotonic(), 0.001))
    consumer.ws.close()
    return event["p"]["c"]


# --- accepted ------------------------------------------------------------------


def test_good_token_in_the_query_opens_and_the_context_starts_from_its_claims(secured):
    """A valid token in `?token=`: the context is sub plus the context_claims it has, as conn.call get_context shows."""
    ws = connect(secured, "/", hs256(claims()))
    client_id = client_id_of(secured, ws, "jwt")
    reply = secured.api().request("conn.call", {"c": client_id, "f": "get_context"})
    assert reply["r"] == {"s": True, "d": {"sub": "alice", "role": "admin"}}


def test_good_token_in_an_authorization_bearer_header_opens(secured):
    """A valid token in `Authorization: Bearer` opens the connection; a Basic header with no token does not."""
    assert alive(connect(secured, "/", header=[f"Authorization: Bearer {hs256(claims())}"]))
    assert refused_status(secured, "/", header=["Authorization: Basic YWxpY2U6cGFzcw=="]) == 401


@pytest.mark.parametrize("path", sorted(KEYS))
def test_tokens_signed_with_the_private_key_open_rs_es_and_eddsa_servers(secured, path):
    """RS256, ES256 and EdDSA servers accept a token signed with the private key of their public_key_file."""
    algorithm, private_key = KEYS[path]
    assert alive(connect(secured, path, jwt.encode({"sub": "bob"}, private_key, algorithm=algorithm)))


def test_entry_sees_every_claim_as_conn_claims(secured):
    """The entry's conn.claims holds all claims; its context has sub and the server's context_claims."""
    payload = claims(aud=None, iss=None, channels=[f"jwt-{uuid.uuid4().hex[:8]}"])
    ws = connect(secured, "/entry", hs256(payload))
    opened = json.loads(ws.recv())
    assert opened == {"claims": payload, "context": {"sub": "alice", "role": "admin"},
                      "channels": payload["channels"]}


def test_leeway_accepts_a_token_just_expired_or_not_yet_valid(secured):
    """leeway 30: a token expired 10 s ago, or valid only in 10 s, is accepted; without leeway it is refused."""
    now = int(time.time())
    for payload in ({"sub": "a", "exp": now - 10}, {"sub": "a", "nbf": now + 10}):
        assert alive(connect(secured, "/lenient", hs256(payload)))
        assert refused_status(secured, "/", hs256({**claims(), **payload})) == 401


# --- refused ------------------------------------------------------------------

def _signed_by_hand(payload: dict) -> str:
    return hand_made({"alg": "HS256", "typ": "JWT"}, payload,
                     lambda data: hmac.new(SECRET.encode(), data, hashlib.sha256).digest())


REFUSED = {   # name -> (the token, made when the test runs; what the log says)
    "missing": (lambda: None, "no token"),
    "malformed": (lambda: "not-a-token", "invalid token: Not enough segments"),
    "wrong-secret": (lambda: hs256(claims(), "another-secret-of-at-least-32-bytes-000"), "Signature verification"),
    "expired": (lambda: hs256(claims(exp=int(time.time()) - 10)), "token expired"),
    "not-yet-valid": (lambda: hs256(claims(nbf=int(time.time()) + 60)), "not yet valid"),
    "wrong-audience": (lambda: hs256(claims(aud="someone-else")), "Audience"),
    "no-audience": (lambda: hs256(claims(aud=None)), '"aud"'),
    "wrong-issuer": (lambda: hs256(claims(iss="https://other.test")), "issuer"),
    "no-sub": (lambda: hs256(claims(sub=None)), '"sub"'),
    "sub-not-a-string": (lambda: _signed_by_hand(claims(sub=42)), "must be a string"),
    "alg-none": (lambda: hand_made({"alg": "none", "typ": "JWT"}, claims(), lambda data: b""), "alg"),
    "bad-channel": (lambda: hs256(claims(channels=["ok", "two words"])), "channels[1]: channel name must not"),
    "channels-not-a-list": (lambda: hs256(claims(channels="room")), "channels must be a list"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_handshake_without_a_valid_token_is_refused_401(secured, name):
    """No token, or a malformed, badly signed, expired, not yet valid, misaddressed or ill-claimed one: 401, logged."""
    make, why = REFUSED[name]
    assert refused_status(secured, "/", make()) == 401
    wait_until(lambda: any("on /: " in line and why in line and "(401)" in line
                           for line in secured.logs().splitlines()), what=f"the refusal logged with {why!r}")
    assert alive(connect(secured, "/", hs256(claims())))   # the node goes on serving


def test_rs_server_refuses_hs_tokens_even_signed_with_its_own_public_key(secured):
    """An RS256 server refuses HS256 tokens: signed with a secret, or with its public key as the HMAC secret."""
    pem = public_pem(KEYS["/rs"][1])
    payload = {"sub": "mallory"}
    assert refused_status(secured, "/rs", hs256(payload)) == 401
    attack = hand_made({"alg": "HS256", "typ": "JWT"}, payload,
                       lambda data: hmac.new(pem, data, hashlib.sha256).digest())
    assert refused_status(secured, "/rs", attack) == 401
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refused_status(secured, "/rs", jwt.encode(payload, other, algorithm="RS256")) == 401
    logged(secured, "on /rs: invalid token: The specified alg value is not allowed")


def test_refused_handshake_never_reaches_the_entry(secured):
    """The token is checked before on_handshake: only the accepted handshake is seen by the entry."""
    consumer = secured.api()
    assert consumer.request("queue.pop", ["jwt-handshakes"])["E"] is None
    refused_marker, accepted_marker = uuid.uuid4().hex, uuid.uuid4().hex
    assert refused_status(secured, f"/entry?m={refused_marker}&token=bad", None) == 401
    connect(secured, f"/entry?m={accepted_marker}&token={hs256({'sub': 'a'})}").recv()
    deadline = time.monotonic() + WAIT
    seen = []
    while accepted_marker not in " ".join(seen):
        seen.append(consumer.event(max(deadline - time.monotonic(), 0.001))["p"]["d"]["query"])
    assert refused_marker not in " ".join(seen)
    consumer.ws.close()


# --- what a token grants ------------------------------------------------------------------


def test_channels_claim_subscribes_mesh_wide_before_on_open(secured):
    """With a channels claim, a publish from any node right after on_open ran reaches the connection."""
    channel = f"jwt-{uuid.uuid4().hex[:8]}"
    for attempt in range(4):   # new connections, on either node process
        ws = connect(secured, "/entry", hs256({"sub": f"c{attempt}", "channels": [channel]}))
        assert json.loads(ws.recv())["channels"] == [channel]   # on_open ran
        for index in range(3):   # each HTTP request may land on either node process
            status, body = secured.http("/v1/mesh/publish", {"c": channel, "d": f"m{attempt}-{index}"})
            assert status == 200 and body["r"]["f"] == 0
            assert ws.recv() == f"m{attempt}-{index}"
        ws.close()


def test_channels_claim_subscribes_before_the_first_message_is_handled(secured):
    """With the default entry, once the client's first message is handled a publish from any node reaches it."""
    channel = f"jwt-{uuid.uuid4().hex[:8]}"
    ws = connect(secured, "/", hs256(claims(channels=[channel])))
    client_id_of(secured, ws, "jwt")
    for index in range(4):
        assert secured.http("/v1/mesh/publish", {"c": channel, "d": f"m{index}"})[1]["r"] == {"s": 1, "f": 0}
        assert ws.recv() == f"m{index}"


def test_connection_is_closed_4001_when_its_token_expires(secured):
    """At exp the connection is closed 4001 `token expired`; with leeway it lives on until exp + leeway."""
    exp = int(time.time()) + 2
    lenient = connect(secured, "/lenient", hs256({"sub": "a", "exp": exp}))
    strict = connect(secured, "/", hs256(claims(exp=exp)))
    strict.settimeout(WAIT)
    opcode, frame = strict.recv_data_frame(True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(frame.data[:2], "big") == 4001 and frame.data[2:] == b"token expired"
    assert exp <= time.time() < exp + 2 * SCALE   # the sweep runs every half second
    assert alive(lenient)


# --- key files and the token command ------------------------------------------------------------------


def _start_with_key(tmp_path, key_file: str, algorithm: str = "RS256", command: str = "start"):
    config = {"node": {"workers": 1, "servers": [
        {"port": 0, "auth": {"jwt": {"public_key_file": key_file, "algorithms": [algorithm]}}}]}}
    path = tmp_path / "meshgate.yaml"
    path.write_text(yaml.safe_dump(config))
    alone = command == "node-process"   # as a supervisor starts it: the cluster key on standard input
    args = [MESHGATE, command, "-c", str(path)] + (["--worker", "0", "--key-stdin"] if alone else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=WAIT * 3,
                          input=cluster_key.generate().line() + "\n" if alone else "")


@pytest.mark.parametrize("content,why", [
    (None, "cannot read: No such file or directory"),
    (b"not a key", "not a key for RS256"),
    ("ec", "not a key for RS256"),
    ("private", "holds a private key"),
], ids=["missing", "garbage", "wrong-kind", "private"])
def test_unusable_public_key_file_refuses_to_start_with_exit_2(tmp_path, content, why):
    """A missing, unparsable, wrong-kind or private public_key_file: meshgate start exits 2 naming the key."""
    key = tmp_path / "key.pem"
    if content == "ec":
        content = public_pem(ec.generate_private_key(ec.SECP256R1()))
    elif content == "private":
        content = KEYS["/rs"][1].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption())
    if content is not None:
        key.write_bytes(content)
    result = _start_with_key(tmp_path, "key.pem")
    assert result.returncode == 2, result.stderr
    assert "meshgate: configuration error: node.servers[0].auth.jwt.public_key_file: " in result.stderr
    assert str(key) in result.stderr and why in result.stderr


def test_node_process_with_an_unreadable_key_exits_2(tmp_path):
    """A node process whose key file is gone by the time it starts exits 2, so the supervisor stops the cluster."""
    result = _start_with_key(tmp_path, "gone.pem", command="node-process")
    assert result.returncode == 2
    assert "cannot start: auth.jwt key public_key_file: " in result.stderr and "cannot read" in result.stderr


def test_token_command_prints_a_token_the_server_accepts(secured):
    """meshgate token: an HS256 token with sub, exp = now + ttl, the claims given and channels, that opens /entry."""
    channel = f"jwt-{uuid.uuid4().hex[:8]}"
    result = subprocess.run([MESHGATE, "token", "--secret", SECRET, "--sub", "carol", "--ttl", "120",
                             "--claim", "role=ops", "--claim", "level=3", "--claim", "tags=[\"a\"]",
                             "--channels", f"{channel},lobby"], capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    payload = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert payload["exp"] - payload["iat"] == 120 and abs(payload["iat"] - time.time()) < 5
    assert {k: payload[k] for k in ("sub", "role", "level", "tags", "channels")} == {
        "sub": "carol", "role": "ops", "level": 3, "tags": ["a"], "channels": [channel, "lobby"]}
    opened = json.loads(connect(secured, "/entry", token).recv())
    assert opened["context"] == {"sub": "carol", "role": "ops"} and opened["channels"] == sorted([channel, "lobby"])


@pytest.mark.parametrize("args,message", [
    (["--channels", "ok,two words"], "--channels"),
    (["--claim", "novalue"], "expected NAME=VALUE"),
    (["--ttl", "0"], "--ttl"),
], ids=["bad-channel", "bad-claim", "bad-ttl"])
def test_token_command_refuses_bad_options_with_exit_2(args, message):
    """meshgate token: a bad channel name, a claim without `=` or a ttl under 1 exit 2 and say which option."""
    result = subprocess.run([MESHGATE, "token", "--secret", SECRET, "--sub", "a", *args],
                            capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2 and message in result.stderr
