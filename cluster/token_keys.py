"""The key a client server checks JSON Web Tokens with (`auth.jwt`), read once at start.

docs/configuration.md, node.servers[i].auth.jwt. `meshgate start` and
`meshgate node` call `load_key` before anything starts (a bad key is a
configuration error, exit status 2), and each node process loads it again
for its checker. Reading `public_key_file` is the only I/O here.
"""

from jwt.algorithms import get_default_algorithms


class TokenKeyError(ValueError):
    """The key cannot be read or does not fit the configured algorithms; the message says why."""


def load_key(settings, resolve):
    """Returns the key for `jwt.decode`: the secret, or the public key of `public_key_file`, parsed.

    Every algorithm of `settings.algorithms` must accept it, and a key file
    must hold a public key (a server never needs the signing key).

    Args:
        settings: a JwtConfig (config validation already paired the key with its algorithms).
        resolve: turns a configured path into one relative to the configuration file.

    Raises:
        TokenKeyError: naming the key and why.
    """
    if settings.secret is not None:
        raw, name = settings.secret, "secret"
    else:
        path = resolve(settings.public_key_file)
        name = f"public_key_file: {path}"
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            raise TokenKeyError(f"{name}: cannot read: {exc.strerror}") from None
    available = get_default_algorithms()
    key = None
    for algorithm in settings.algorithms:
        if algorithm not in available:
            raise TokenKeyError(f"{name}: {algorithm} is not available (is the cryptography package installed?)")
        try:
            prepared = available[algorithm].prepare_key(raw)
        except Exception as exc:   # PyJWT and cryptography raise several kinds for a key they cannot use
            raise TokenKeyError(f"{name}: not a key for {algorithm}: {exc}") from None
        if hasattr(prepared, "private_bytes"):
            raise TokenKeyError(f"{name}: holds a private key; give the public key")
        key = prepared if key is None else key
    return key
