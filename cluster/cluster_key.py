"""The cluster key: the one CURVE key pair every process of a cluster holds (docs/security.md).

Every ZeroMQ socket of the cluster uses it (cluster/zloop.py, `new_socket`):
the registry and the mesh points serve with it, every DEALER connects with
it as its own key and as the server's, and each process's ZAP handler lets
in only connections that prove they hold it. A process without the key
cannot complete a handshake.

The key file (`meshgate keygen -o FILE`, `access.cluster_key_file`) is text:

    # meshgate cluster key: ...
    curve-secret-key = "<40 characters of Z85>"

Only its owner may read it (mode 0600); a file that group or others can
read is refused. `meshgate start` without a file makes a fresh key per run
and hands it to its children on their standard input, never on a command
line, in the environment or in a file.

Reads and writes the one file; no sockets here.
"""

import hashlib
import hmac
import os
import re
import stat
from typing import NamedTuple

import zmq

_LINE = re.compile(r'\s*curve-secret-key\s*=\s*"([0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40})"\s*\Z')
_HEADER = ("# meshgate cluster key: every coordinator and node process of one cluster holds this same file.\n"
           "# Keep it secret (mode 0600): whoever holds it can join the mesh and act as any node.\n")


class ClusterKeyError(Exception):
    """The key is missing, malformed, or its file is readable by others; the message says which."""


class ClusterKey(NamedTuple):
    public: bytes     # Z85, 40 bytes
    secret: bytes     # Z85, 40 bytes

    @classmethod
    def from_secret(cls, secret: bytes) -> "ClusterKey":
        try:
            return cls(zmq.curve_public(secret), secret)
        except (zmq.ZMQError, ValueError) as exc:
            raise ClusterKeyError(f"not a CURVE secret key: {exc}") from None

    def line(self) -> str:
        """The key as the one line of a key file (also what a supervisor hands its children)."""
        return f'curve-secret-key = "{self.secret.decode("ascii")}"'

    @classmethod
    def from_line(cls, line: str) -> "ClusterKey":
        match = _LINE.match(line)
        if match is None:
            raise ClusterKeyError('expected curve-secret-key = "<40 characters of Z85>"')
        return cls.from_secret(match.group(1).encode("ascii"))

    def lease(self, node_id: int, holder: bytes) -> str:
        """A proof, made with the key, that node id `node_id` was given to the process `holder` (its routing id).

        A restarted coordinator gives an id back only to the process that shows its lease.
        """
        material = hashlib.sha256(b"meshgate node lease\0" + self.secret).digest()
        return hmac.new(material, b"%d\0%s" % (node_id, holder), hashlib.sha256).hexdigest()


def generate() -> ClusterKey:
    public, secret = zmq.curve_keypair()
    return ClusterKey(public, secret)


def write_file(path: str, key: ClusterKey) -> None:
    """Writes a new key file readable by its owner only.

    Raises:
        ClusterKeyError: the file exists already (a key is never overwritten by accident), or cannot be written.
    """
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ClusterKeyError(f"{path}: exists already; remove it first to make a new key") from None
    except OSError as exc:
        raise ClusterKeyError(f"{path}: cannot write: {exc.strerror}") from None
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(_HEADER + key.line() + "\n")


def read_file(path: str) -> ClusterKey:
    """Reads a key file.

    Raises:
        ClusterKeyError: missing, unreadable, readable by group or others, or without a key line.
    """
    try:
        with open(path, encoding="ascii") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ClusterKeyError(f"{path}: readable by group or others (mode {stat.S_IMODE(mode):o}); "
                                      f"chmod 600 it")
            lines = handle.read().splitlines()
    except OSError as exc:
        raise ClusterKeyError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ClusterKeyError(f"{path}: not a meshgate cluster key file") from None
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                return ClusterKey.from_line(line)
            except ClusterKeyError as exc:
                raise ClusterKeyError(f"{path}: {exc}") from None
    raise ClusterKeyError(f"{path}: no curve-secret-key line")
