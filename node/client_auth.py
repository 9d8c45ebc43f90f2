"""JSON Web Tokens on client servers (`auth.jwt`): which handshakes carry a valid one, and what it grants.

docs/protocol.md, Client WebSocket server, JWT. The token comes in an
`Authorization: Bearer` header or, without one, in the query parameter
`token`. Its signature is checked with the configured key and algorithms
only (the token's own `alg` never chooses; `none` is never among them),
then `exp` and `nbf` with `leeway`, `aud` and `iss` when configured. `sub`
must be a string, and a `channels` claim a list of channel names. Nothing
here runs once the connection is open. No sockets here.
"""

import jwt

from cluster.protocol import ApiError, parse_name
from cluster.token_keys import load_key


class TokenRefused(Exception):
    """The handshake has no valid token; the message says why (for the log only)."""


def token_of(request) -> str:
    """The handshake's token: the `Authorization: Bearer` header's, else the last `token` query parameter."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    values = request.query_arguments.get("token")
    if not values:
        return ""
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        return ""


class TokenChecker:
    """Checks the tokens of one client server.

    Args:
        settings: its JwtConfig.
        resolve: turns `public_key_file` into a path relative to the configuration file.

    Raises:
        TokenKeyError: the key cannot be read or does not fit the algorithms (the node refuses to start).
    """

    def __init__(self, settings, resolve):
        self.key = load_key(settings, resolve)
        self.algorithms = list(settings.algorithms)
        self.audience = settings.audience
        self.issuer = settings.issuer
        self.leeway = settings.leeway
        self.context_claims = tuple(settings.context_claims)
        # Without a configured audience a token's `aud` is not checked (PyJWT would refuse any).
        self.options = {"require": ["sub"], "verify_aud": settings.audience is not None}

    def check(self, request) -> dict:
        """The claims of the handshake's token.

        Raises:
            TokenRefused: no token, or one that is malformed, badly signed,
                expired, not yet valid, for another audience or issuer, or
                with a bad `sub` or `channels` claim.
        """
        token = token_of(request)
        if not token:
            raise TokenRefused("no token")
        try:
            claims = jwt.decode(token, self.key, algorithms=self.algorithms, audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway, options=self.options)
        except jwt.ExpiredSignatureError:
            raise TokenRefused("token expired") from None
        except jwt.PyJWTError as exc:
            raise TokenRefused(f"invalid token: {exc}") from None
        if not isinstance(claims.get("sub"), str):
            raise TokenRefused("invalid token: sub must be a string")
        channels = claims.get("channels")
        if channels is not None:
            if not isinstance(channels, list):
                raise TokenRefused("invalid token: channels must be a list of channel names")
            try:
                for index, channel in enumerate(channels):
                    parse_name(channel, f"channels[{index}]")
            except ApiError as exc:
                raise TokenRefused(f"invalid token: {exc.message}") from None
        return claims

    def context(self, claims: dict) -> dict:
        """The connection's first context: `sub` and the claims named in `context_claims` that the token has."""
        context = {"sub": claims["sub"]}
        context.update((name, claims[name]) for name in self.context_claims if name in claims)
        return context

    def expires(self, claims: dict):
        """Unix time at which the connection is closed 4001 (`exp` plus `leeway`), or None without `exp`."""
        exp = claims.get("exp")
        return None if exp is None else float(exp) + self.leeway
