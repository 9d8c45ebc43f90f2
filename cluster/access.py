"""Who may use the backend API and the coordinator HTTP (docs/protocol.md, Access control).

`Users` holds `access.users`: it reads HTTP basic credentials, checks the
password (a `meshgate passwd` scrypt hash, or the password itself) in
constant time, the peer address against the user's host pattern, and
remembers a verified credential by a digest so that a busy backend pays the
hash once. `browser_problem` closes the API to web pages of other sites and,
while the API is open, to DNS rebinding. Both transports (node/api_http.py,
node/api_ws.py) and the coordinator HTTP call them before anything else.

No sockets here. Hashing runs off the IOLoop (`Users.authenticate` awaits a
thread), so a stranger guessing passwords cannot stall a node.
"""

import asyncio
import base64
import binascii
import concurrent.futures
import fnmatch
import functools
import hashlib
import hmac
import ipaddress
import os
import time
from collections import OrderedDict
from typing import NamedTuple, Optional

READ, WRITE = "read", "write"
ALL_ROLES = frozenset((READ, WRITE))
REALM = 'Basic realm="meshgate"'

_SCHEME = "scrypt"
_N, _R, _P = 2 ** 14, 8, 1          # about 50 ms and 16 MiB per hash
_VERIFIED_MAX = 1024                # credentials remembered after a good check
_HASHING_MAX = 16                   # checks waiting for the hashing thread; more are answered "busy"
_PEER_BURST, _PEER_RATE = 10, 1.0   # failed checks one peer address may make at once, and per second after
_PEER_IN_FLIGHT = 2                 # checks of one peer address under way at once
_PEERS_MAX = 4096                   # peer addresses remembered


def hash_password(password: str, n: int = _N, r: int = _R, p: int = _P) -> str:
    """What `meshgate passwd` prints: `scrypt$n$r$p$salt$hash` (base64)."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r, p), dklen=32)
    return "$".join((_SCHEME, str(n), str(r), str(p), base64.b64encode(salt).decode(), base64.b64encode(digest).decode()))


def is_hashed(stored: str) -> bool:
    """True for a `meshgate passwd` hash; anything else is taken as the password itself."""
    return _parse_hash(stored) is not None


def _maxmem(n: int, r: int, p: int) -> int:
    return 128 * r * (n + p + 2) + 1024 * 1024


def _parse_hash(stored: str):
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        return None
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        return None
    if not (2 <= n <= 2 ** 20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16 and salt and digest):
        return None
    return n, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of a password against its stored form (hash or plain)."""
    parsed = _parse_hash(stored)
    if parsed is None:
        return hmac.compare_digest(password.encode("utf-8"), stored.encode("utf-8"))
    n, r, p, salt, digest = parsed
    got = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r, p),
                         dklen=len(digest))
    return hmac.compare_digest(got, digest)


class HostPattern:
    """Where a user may connect from: `*`, a glob on the dotted address (`172.*.*.*`), a CIDR, or one address.

    Raises:
        ValueError: the pattern is none of these (config.py reports it with the key's path).
    """

    def __init__(self, pattern: str):
        self.pattern = pattern
        self._network = None
        if pattern == "*" or any(c in pattern for c in "*?["):
            return
        self._network = ipaddress.ip_network(pattern, strict=False)   # one address is a /32 or /128

    def matches(self, address: str) -> bool:
        if self._network is None:
            return fnmatch.fnmatchcase(address, self.pattern)
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None and self._network.version == 4:
            ip = ip.ipv4_mapped
        return ip in self._network


class User(NamedTuple):
    name: str
    roles: frozenset
    host: HostPattern
    password: str        # as configured (hash or plain)


OPEN = User("", ALL_ROLES, HostPattern("*"), "")   # every caller, while no users are configured


class Denied(Exception):
    """A request that may not go on: `status` 401 (who?), 403 (not you, not from there) or 503 (busy)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _credentials(authorization: Optional[str]):
    if not authorization:
        raise Denied(401, "credentials required (HTTP basic)")
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        raise Denied(401, "credentials required (HTTP basic)")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (ValueError, binascii.Error):
        raise Denied(401, "malformed basic credentials") from None
    name, colon, password = decoded.partition(":")
    if not colon:
        raise Denied(401, "malformed basic credentials")
    return name, password


def _digest(name: str, password: str) -> bytes:
    """What a verified credential is remembered by (never the password itself)."""
    return hashlib.sha256(name.encode("utf-8") + b"\0" + password.encode("utf-8")).digest()


class Users:
    """The users of one configuration (rebuilt on SIGHUP).

    A check that is not a remembered good credential costs a hash (or, for
    a plain password, a comparison). Each peer address may fail only a few:
    `_PEER_BURST`, then `_PEER_RATE` a second, with 2 checks in flight at
    most; past that it is answered 401 (or 503) without a check, and other
    peers are not held up.

    Args:
        configs: the `access.users` entries (config.UserConfig).
        previous: the table this one replaces; what it remembered of users that
            did not change is kept (a reload does not make every backend pay again).
    """

    _pool = None   # one hashing thread per process, made on first use

    def __init__(self, configs, previous: "Users" = None):
        self.by_name = {c.username: User(c.username, frozenset(c.roles), HostPattern(c.host), c.password)
                        for c in configs}
        self.open = not self.by_name   # no users: every caller is let in (read on every request: no property)
        self._verified = OrderedDict()   # digest of (name, password) -> User
        self._hashing = 0
        self._peers = OrderedDict()      # peer address -> [tokens, monotonic time, checks in flight]
        # Checked for a name nobody has, made like the first hashed user's (in the hashing thread, on
        # first use), so that its answer takes as long as a wrong password's.
        model = next((_parse_hash(u.password) for u in self.by_name.values() if is_hashed(u.password)), None)
        self._decoy_params = model[:3] if model else (_N, _R, _P)
        self._decoy = None
        if previous is not None:
            for digest, user in previous._verified.items():
                kept = self.still_valid(user)
                if kept is not None:
                    self._verified[digest] = kept

    def known(self, authorization: Optional[str], peer: str) -> Optional[User]:
        """The user these credentials name when that is known without waiting: the API is open, or
        they were verified before and the user may connect from `peer`. None: `authenticate` decides."""
        if self.open:
            return OPEN
        try:
            name, password = _credentials(authorization)
        except Denied:
            return None
        user = self.by_name.get(name)
        if user is None or not user.host.matches(peer):
            return None
        digest = _digest(name, password)
        return user if self._verified.get(digest) is user else None

    async def authenticate(self, authorization: Optional[str], peer: str) -> User:
        """The user these credentials (the `Authorization` header) name, if they may connect from `peer`.

        Raises:
            Denied: 401 missing or wrong credentials (or too many checks from `peer`), 403 a host the
                user may not use, 503 too many checks at once.
        """
        if self.open:
            return OPEN
        name, password = _credentials(authorization)
        user = self.by_name.get(name)
        digest = _digest(name, password)
        if user is None or self._verified.get(digest) is not user:
            state = self._admit(peer)
            state[2] += 1
            try:
                good = await self._check(user, password)
            finally:
                state[2] -= 1
            if user is None or not good:
                state[0] -= 1   # a failure costs the peer a token
                raise Denied(401, "wrong user name or password")
            self._verified[digest] = user
            while len(self._verified) > _VERIFIED_MAX:
                self._verified.popitem(last=False)
        if not user.host.matches(peer):
            raise Denied(403, f"user {name!r} may not connect from {peer}")
        return user

    def _admit(self, peer: str) -> list:
        """The peer's state `[tokens, time, in flight]`, once it may have one more check."""
        now = time.monotonic()
        state = self._peers.pop(peer, None) or [float(_PEER_BURST), now, 0]
        self._peers[peer] = state   # most recent last; the oldest are forgotten past _PEERS_MAX
        while len(self._peers) > _PEERS_MAX:
            self._peers.popitem(last=False)
        state[0] = min(float(_PEER_BURST), state[0] + (now - state[1]) * _PEER_RATE)
        state[1] = now
        if state[2] >= _PEER_IN_FLIGHT or state[0] < 1:
            raise Denied(401, "too many failed credential checks from this address; retry in a few seconds")
        return state

    async def _check(self, user: Optional[User], password: str) -> bool:
        if user is not None and not is_hashed(user.password):
            return verify_password(password, user.password)
        if self._hashing >= _HASHING_MAX:
            raise Denied(503, "too many credential checks at once; retry")
        if Users._pool is None:
            Users._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meshgate-hash")
        self._hashing += 1
        try:
            check = (verify_password, password, user.password) if user is not None else (self._decoy_check, password)
            return await asyncio.get_running_loop().run_in_executor(Users._pool, *check)
        finally:
            self._hashing -= 1

    def _decoy_check(self, password: str) -> bool:
        """In the hashing thread: the check a wrong password of an existing user would cost."""
        if self._decoy is None:
            self._decoy = hash_password("", *self._decoy_params)
        verify_password(password, self._decoy)
        return False

    def still_valid(self, user: User) -> Optional[User]:
        """`user` as this (reloaded) table has it, or None when it is gone or its password changed."""
        current = self.by_name.get(user.name)
        if current is None or current.password != user.password:
            return None
        return current


class Access:
    """What one process checks every API request against; `load` takes a new configuration (SIGHUP).

    Args:
        config: the cluster Config (access.users, node.api.allowed_origins and allowed_hosts).
    """

    def __init__(self, config):
        self.refused = 0   # requests refused with 102 (counted for the figures)
        self.load(config)

    def load(self, config) -> None:
        self.users = Users(config.access.users, getattr(self, "users", None))
        self.allowed_origins = frozenset(config.node.api.allowed_origins)
        self.allowed_hosts = frozenset(config.node.api.allowed_hosts)

    def _browser_problem(self, request) -> Optional[str]:
        headers = request.headers
        origin, host = headers.get("origin"), headers.get("host")   # lower case: a plain dict or Tornado's headers
        ask = _remembered_browser_problem if len(origin or "") + len(host or "") <= _REMEMBERED_HEADERS else \
            browser_problem
        return ask(origin, host, request.protocol, self.allowed_origins, self.allowed_hosts, self.users.open)

    def check_now(self, request) -> Optional[User]:
        """The user making `request` when `check` would let it in without waiting; else None (call `check`)."""
        if self._browser_problem(request) is not None:
            return None
        return self.users.known(request.headers.get("authorization"), request.remote_ip)

    async def check(self, request, role: str = None, credentials: bool = True) -> User:
        """The user making `request` (a Tornado HTTP request: headers, remote_ip, protocol).

        Args:
            role: a role the user must have for anything this request may do (READ for the
                coordinator HTTP); the executor (node/api.py) checks each API method's own.
            credentials: False for what needs none (`GET /version`): only the browser rules apply.

        Raises:
            Denied: 403 for a web page of another site, a rebound host name or a missing role,
                else as Users.authenticate.
        """
        problem = self._browser_problem(request)
        try:
            if problem is not None:
                raise Denied(403, problem)
            if not credentials:
                return OPEN
            user = await self.users.authenticate(request.headers.get("authorization"), request.remote_ip)
            if role is not None and role not in user.roles:
                raise Denied(403, f"user {user.name!r} lacks the {role} role")
            return user
        except Denied:
            self.refused += 1
            raise


def refuse(handler, denied: Denied, body: str) -> None:
    """Answers a Tornado handler's request with `denied`'s status and `body` (an envelope with error 102)."""
    handler.set_status(denied.status)
    if denied.status == 401:
        handler.set_header("WWW-Authenticate", REALM)
    handler.set_header("Content-Type", "application/json")
    handler.finish(body)


def _default_port(scheme: str) -> str:
    return {"http": "80", "https": "443", "ws": "80", "wss": "443"}.get(scheme, "")


def _origin_of(scheme: str, host: str) -> str:
    host = host.lower()
    if host.endswith(":" + _default_port(scheme)):
        host = host[: -len(_default_port(scheme)) - 1]
    return f"{scheme}://{host}"


def _host_name(host: str) -> str:
    """The host of a Host header, without its port (`[::1]:80` -> `::1`)."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def browser_problem(origin: Optional[str], host: Optional[str], scheme: str, allowed_origins,
                    allowed_hosts, open_api: bool) -> Optional[str]:
    """Why a request must be refused as a web page's (HTTP 403, 102), or None.

    A browser always sends `Origin` on a cross-site request: one that is not
    the request's own origin nor listed is refused. While the API is open (no
    users), the `Host` must be an IP address, `localhost` or a listed name,
    which closes DNS rebinding against an API bound to loopback.
    """
    if origin is not None:
        scheme_of, _, rest = origin.lower().partition("://")
        same = host is not None and rest and _origin_of(scheme_of, rest) == _origin_of(scheme, host)
        if not same and origin not in allowed_origins:
            return f"Origin {origin[:200]!r} may not call this API (node.api.allowed_origins)"
    if open_api:
        name = _host_name(host or "")
        try:
            ipaddress.ip_address(name)
            return None
        except ValueError:
            pass
        if name.lower() != "localhost" and name not in allowed_hosts:
            return f"Host {(host or '')[:200]!r} is not an address, localhost or in node.api.allowed_hosts"
    return None


# Asked of every API request, nearly always with the same headers: a hit takes 0.1 us, parsing the Host as
# an address again several. Bounded in entries and in what each holds (longer headers are not remembered:
# 1,024 of 64 KiB would be a stranger's 64 MiB); the allowed sets are frozensets, so every argument is hashable.
_REMEMBERED_HEADERS = 512
_remembered_browser_problem = functools.lru_cache(maxsize=1024)(browser_problem)
