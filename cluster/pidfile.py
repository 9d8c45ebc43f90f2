"""The supervisor's pid file: written when it starts, removed when it exits; how `meshgate restart` finds it.

The file holds `<pid> <start time>`; the start time (as psutil reads it) tells the supervisor
from a later process that was given the same pid. `find` names a process only when nobody but
the file's owner may write the file, and the process is alive, started at that time, belongs
to the file's owner, and runs `meshgate start` or `meshgate node`; and only to that owner or
root. Anything else raises `NotFound`, and nothing is signalled (docs/operations.md, Rolling
restart).
"""

import logging
import os
import stat

import psutil

log = logging.getLogger("meshgate.supervisor")

_SUPERVISOR_COMMANDS = ("start", "node")


class NotFound(Exception):
    """No supervisor of ours is named by the pid file; the message says why."""


def path_for(config) -> str:
    """`node.pid_file` (relative to the configuration file), else the configuration file's name with `.pid`,
    else `meshgate.pid` in the working directory (no configuration file)."""
    if config.node.pid_file:
        return config.resolve(config.node.pid_file)
    if config.path:
        return os.path.splitext(os.path.abspath(config.path))[0] + ".pid"
    return os.path.abspath("meshgate.pid")


def write(path: str) -> None:
    """Writes this process's pid file (atomically: a reader never sees half of it); a failure is logged only."""
    me = psutil.Process()
    temporary = f"{path}.{me.pid}.tmp"
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"{me.pid} {me.create_time()!r}\n")
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("cannot write the pid file %s: %s; meshgate restart will not find this supervisor "
                    "(send SIGUSR2 to pid %d instead)", path, exc.strerror or exc, me.pid)
        try:
            os.unlink(temporary)
        except OSError:
            pass


def remove(path: str) -> None:
    """Removes the pid file if it still names this process (another supervisor may have written it since)."""
    try:
        with open(path) as handle:
            named = handle.read(100).split()
        if named and named[0] == str(os.getpid()):
            os.unlink(path)
    except OSError:
        pass


def find(path: str) -> int:
    """The pid of the running supervisor that wrote `path`.

    Raises:
        NotFound: no file, a file others may write, or a pid that is not that supervisor any more.
    """
    try:
        info = os.stat(path)
        with open(path) as handle:
            fields = handle.read(100).split()
    except OSError as exc:
        raise NotFound(f"{path}: {exc.strerror or exc} (is meshgate start or meshgate node running with this "
                       "configuration?)") from None
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or os.getuid() not in (0, info.st_uid):
        raise NotFound(f"{path}: not trusted: others may write it, or it belongs to another user")
    try:
        pid, started = int(fields[0]), float(fields[1])
    except (IndexError, ValueError):
        raise NotFound(f"{path}: not a meshgate pid file") from None
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started) > 0.01:
            raise psutil.NoSuchProcess(pid)
        command, uid = process.cmdline(), process.uids().real
    except psutil.Error:
        raise NotFound(f"{path}: the supervisor (pid {pid}) is not running any more") from None
    if uid != info.st_uid or not _is_supervisor(command):
        raise NotFound(f"{path}: pid {pid} is not a meshgate supervisor of the file's owner")
    return pid


def _is_supervisor(command: list) -> bool:
    """`meshgate start|node ...`, as a console script or `python -m cluster.cli`."""
    for index, part in enumerate(command):
        if os.path.basename(part) == "meshgate" or part == "cluster.cli":
            return any(arg in _SUPERVISOR_COMMANDS for arg in command[index + 1:index + 2])
    return False
