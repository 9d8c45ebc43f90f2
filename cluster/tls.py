"""TLS for the listeners that have `tls: {cert_file, key_file}` (docs/protocol.md, Access control: TLS).

One `ssl.SSLContext` per listener, TLS 1.2 or newer, no client certificates.
`reload` reads the same files again into the same context, so new
handshakes get the new certificate while open connections go on (SIGHUP).
Reads files; no sockets here.
"""

import os
import ssl


class TlsError(Exception):
    """A certificate or key file could not be used; the message names the key path and the file."""


def server_context(tls, config, where: str) -> ssl.SSLContext:
    """A server-side context for one listener.

    Args:
        tls: its config.TlsConfig.
        config: the cluster Config (files are relative to it).
        where: the key path, for messages (`node.api.tls`).

    Raises:
        TlsError
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    reload(context, tls, config, where)
    return context


def reload(context: ssl.SSLContext, tls, config, where: str) -> None:
    """Reads the certificate chain and key again into `context` (raises TlsError, keeping the old on failure)."""
    cert, key = config.resolve(tls.cert_file), config.resolve(tls.key_file)
    for name, path in (("cert_file", cert), ("key_file", key)):
        if not os.path.isfile(path):
            raise TlsError(f"{where}.{name}: {path}: no such file")
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"{where}: cannot use {cert} with {key}: {exc}") from None


def listeners(config) -> list:
    """`(where, tls, port_or_none)` of every listener with TLS: the client server ports, node.api, coordinator.api."""
    found, seen = [], set()
    for index, server in enumerate(config.node.servers):
        if server.tls is not None and server.port not in seen:
            seen.add(server.port)
            found.append((f"node.servers[{index}].tls", server.tls, server.port))
    if config.node.api.tls is not None:
        found.append(("node.api.tls", config.node.api.tls, config.node.api.port))
    if config.coordinator.api.tls is not None:
        found.append(("coordinator.api.tls", config.coordinator.api.tls, config.coordinator.api.port))
    return found
