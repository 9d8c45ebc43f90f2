"""Logging set-up shared by every process: level, text or JSON lines, role prefix.

Loggers are named by audience: `meshgate.coordinator`, `meshgate.node`,
`meshgate.mesh`, `meshgate.access`, `meshgate.entry`, `meshgate.supervisor`.
"""

import logging
import re
import sys
import time

import ujson


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_role = "meshgate"   # what every line of this process is prefixed with (setup, rename)


class _Role(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


class _TextFormatter(logging.Formatter):
    """One line per message: what a message quotes from outside (a token's header, a name) cannot start a
    forged line, because its control characters are written as escapes (tracebacks keep their lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", record.message)
        return super().formatMessage(record)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3), "level": record.levelname.lower(), "role": _role,
            "logger": record.name, "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return ujson.dumps(entry, ensure_ascii=False)


def setup(level: str, fmt: str, role: str) -> None:
    """Configures the root logger of this process; every line names `role` (e.g. `node-w2`)."""
    rename(role)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Role())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        formatter = _TextFormatter("%(asctime)s %(role)s[%(process)d] %(levelname)s %(name)s: %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)


def rename(role: str) -> None:
    """Names this process anew in every line from now on (a node, once it knows its id: `node3-w2`)."""
    global _role
    _role = role


def set_level(level: str) -> None:
    """The lowest level this process writes (also what SIGHUP changes)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    # Tornado's per-request access log is per message: keep it below info.
    logging.getLogger("tornado.access").setLevel(max(logging.WARNING, root.level))


class Throttled:
    """Logs to `logger` at most `burst` lines per `interval` seconds; says how many it held back meanwhile.

    For what a stranger or a broken peer can make happen at any rate (bad
    messages, refused handshakes): the log stays readable and small.
    """

    def __init__(self, logger: logging.Logger, interval: float = 1.0, burst: int = 1, clock=time.monotonic):
        self._logger = logger
        self._interval = interval
        self._burst = burst
        self._clock = clock
        self._window = -interval   # start of the current window
        self._lines = 0            # lines logged in it
        self._held = 0

    def warning(self, message: str, *args) -> bool:
        """Logs now, or counts it; returns whether it was logged."""
        return self._log(logging.WARNING, message, args)

    def info(self, message: str, *args) -> bool:
        return self._log(logging.INFO, message, args)

    def _log(self, level: int, message: str, args: tuple) -> bool:
        now = self._clock()
        if now - self._window >= self._interval:
            self._window, self._lines = now, 0
        if self._lines >= self._burst:
            self._held += 1
            return False
        self._lines += 1
        if self._held:
            message += f" (and {self._held} more like it held back)"
            self._held = 0
        self._logger.log(level, message, *args)
        return True
