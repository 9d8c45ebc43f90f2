"""Entry hooks: load a server's entry, call its hooks in order per connection, reload it.

Without an entry, or without `on_message`, each client message is pushed as
`{"frame": frame}` to the server's topic (the default entry).

Hooks of one connection run one at a time, in order: while an async hook is
not finished, that connection's next events wait (at most the server's
`max_pending`; over it the connection is closed 1008, as it is past
`max_pending_bytes` of waiting client data). Other connections are not
affected. An exception in a hook is logged with its traceback, the client id
and the entry's name, counted (`hook_errors`), and leaves the connection
open. A hook step that holds the event loop longer than SLOW_HOOK_S is
logged as a warning. Owned by the node's IOLoop.
"""

import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import time
import types
from collections import deque

from tornado.ioloop import PeriodicCallback

from cluster.entry_spec import EntryError, resolve
from cluster.protocol import CloseCode
from node.entry import ConnectionGone, ContextTimeout, HandshakeRequest, Refuse, current_conn, mesh, queue
from node.queues import QueueFull

log = logging.getLogger("meshgate.entry")

HOOKS = ("on_handshake", "on_open", "on_message", "on_close")
# Not a hook: `submit(conn, AFTER, callback)` runs `callback(conn)` once the connection's earlier hooks finished.
AFTER = "after"
SLOW_HOOK_S = 0.1
RELOAD_CHECK_S = 1.0


class _Timed:
    """Awaits a coroutine one step at a time and reports a step that holds the loop too long."""

    def __init__(self, coro, report):
        self._coro = coro
        self._report = report

    def __await__(self):
        coro = self._coro
        if not hasattr(coro, "send"):
            return (yield from coro.__await__())
        value, error = None, None
        while True:
            started = time.perf_counter()
            try:
                step = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                self._check(started)
                return stop.value
            self._check(started)
            try:
                value, error = (yield step), None
            except BaseException as exc:   # cancellation included: hand it to the coroutine
                value, error = None, exc

    def _check(self, started: float) -> None:
        elapsed = time.perf_counter() - started
        if elapsed > SLOW_HOOK_S:
            self._report(elapsed)


class Entry:
    """The entry of one configured server.

    Args:
        node: the process's Node.
        server: its ServerConfig.
        base_dir: the directory entry file paths are relative to.
    """

    def __init__(self, node, server, base_dir: str):
        self.node = node
        self.server = server
        self.topic = server.topic
        self.spec = server.entry
        self.name = self.spec or "default"
        self.hooks = {}
        self.custom = bool(self.spec)
        self._path, self._module_name = resolve(self.spec, base_dir) if self.spec else (None, None)
        self._mtime = None
        self._watcher = None
        if self.spec:
            self._load()
            if server.reload:
                self._watcher = PeriodicCallback(self.check_reload, RELOAD_CHECK_S * 1000)
                self._watcher.start()

    # --- loading -------------------------------------------------------------

    def _source_file(self) -> str:
        if self._path:
            return self._path
        module = sys.modules.get(self._module_name)
        return getattr(module, "__file__", None) or ""

    def _load(self) -> None:
        """Loads (or reloads) the entry; raises EntryError and changes nothing on failure."""
        try:
            if self._path:
                with open(self._path, encoding="utf-8") as handle:
                    source = handle.read()
                module = types.ModuleType(f"meshgate_entry_{abs(hash(self._path))}")
                module.__file__ = self._path
                module.mesh, module.queue = mesh, queue
                exec(compile(source, self._path, "exec"), module.__dict__)
            else:
                # A fresh module object every time: a version that fails half way
                # never replaces the running one (importlib.reload would).
                spec = importlib.util.find_spec(self._module_name)
                if spec is None or spec.loader is None:
                    raise EntryError(f"module {self._module_name!r} not found")
                module = importlib.util.module_from_spec(spec)
                module.mesh, module.queue = mesh, queue
                spec.loader.exec_module(module)
                sys.modules[self._module_name] = module
        except SyntaxError as exc:
            raise EntryError(f"{exc.filename}:{exc.lineno}: syntax error: {exc.msg}") from None
        except EntryError:
            raise
        except Exception as exc:
            raise EntryError(f"{self.name}: failed to load: {type(exc).__name__}: {exc}") from exc
        self.hooks = {name: getattr(module, name) for name in HOOKS if callable(getattr(module, name, None))}
        try:
            self._mtime = os.stat(self._source_file()).st_mtime_ns
        except OSError:
            self._mtime = None

    def check_reload(self) -> None:
        """Reloads the entry when its file changed; a broken new version leaves the old one running."""
        try:
            mtime = os.stat(self._source_file()).st_mtime_ns
        except OSError:
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            self._load()
        except EntryError as exc:
            log.error("entry %s not reloaded, the previous version keeps running: %s", self.name, exc)
            return
        log.info("entry %s reloaded (hooks: %s)", self.name, ", ".join(self.hooks) or "none")

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()

    # --- calling hooks -----------------------------------------------------------

    def handshake(self, conn, request):
        """Runs `on_handshake`; returns None (accepted) or an awaitable of True/False."""
        hook = self.hooks.get("on_handshake")
        if hook is None:
            return None
        return self._handshake(conn, hook, HandshakeRequest(request))

    async def _handshake(self, conn, hook, request) -> bool:
        token = current_conn.set(conn)
        started = time.perf_counter()
        try:
            result = hook(conn, request)
            if inspect.isawaitable(result):
                # A handshake that never decides is refused after read_timeout.
                result = await asyncio.wait_for(_Timed(result, lambda s: self._slow(conn, "on_handshake", s)),
                                                self.server.read_timeout)
        except Refuse:
            return False
        except ContextTimeout:   # the hook's own wait: a failure of the hook, not of the deadline
            self._failed(conn, "on_handshake")
            return False
        except asyncio.TimeoutError:
            log.warning("entry %s: on_handshake for client %s took over %g s; refused", self.name, conn.client_id,
                        self.server.read_timeout)
            return False
        except Exception:
            self._failed(conn, "on_handshake")
            return False
        finally:
            current_conn.reset(token)
            self.node.counters.hooks.observe(("on_handshake",), time.perf_counter() - started)
        return result is not False

    def submit(self, conn, hook: str, *args) -> None:
        """Runs a hook for `conn` now, or after the hooks it is still running."""
        if hook == "on_message" and conn.stream is None:
            return   # closed or closing: what is still in flight from it is dropped
        if conn.hook_busy:
            pending = conn.hook_pending
            if pending is None:
                pending = conn.hook_pending = deque()
            size = len(args[0]["data"]) if hook == "on_message" else 0
            if hook == "on_message" and (len(pending) >= self.server.max_pending
                                         or conn.hook_pending_bytes + size > self.server.max_pending_bytes):
                log.warning("%s: %d messages (%d bytes) wait for entry %s; closing", conn.describe(), len(pending),
                            conn.hook_pending_bytes, self.name)
                conn.stream = None   # nothing more from or to it while the close completes
                conn.close(int(CloseCode.POLICY_VIOLATION), "too many messages waiting")
                return
            conn.hook_pending_bytes += size
            pending.append((hook, args))
            return
        self._start(conn, hook, args)

    def _start(self, conn, hook: str, args: tuple) -> None:
        if hook == AFTER:
            args[0](conn)
            return
        function = self.hooks.get(hook)
        if function is None:
            if hook == "on_message":
                self.push_default(conn, args[0])
            return
        token = current_conn.set(conn)
        started = time.perf_counter()
        try:
            result = function(conn, *args)
        except ConnectionGone:
            result = None
        except Exception:
            self._failed(conn, hook)
            result = None
        finally:
            current_conn.reset(token)
        elapsed = time.perf_counter() - started
        if elapsed > SLOW_HOOK_S:
            self._slow(conn, hook, elapsed)
        if result is not None and inspect.isawaitable(result):
            conn.hook_busy = True
            asyncio.ensure_future(self._finish(conn, hook, result, started))
        else:
            self.node.counters.hooks.observe((hook,), elapsed)

    async def _finish(self, conn, hook: str, awaitable, started: float) -> None:
        current_conn.set(conn)
        try:
            await _Timed(awaitable, lambda s: self._slow(conn, hook, s))
        except ConnectionGone:
            log.debug("entry %s: %s for client %s stopped: the connection closed", self.name, hook, conn.client_id)
        except (Exception, asyncio.CancelledError):
            self._failed(conn, hook)
        finally:
            self.node.counters.hooks.observe((hook,), time.perf_counter() - started)
            conn.hook_busy = False
            pending = conn.hook_pending
            while pending and not conn.hook_busy:
                next_hook, args = pending.popleft()
                if next_hook == "on_message":
                    conn.hook_pending_bytes -= len(args[0]["data"])
                self._start(conn, next_hook, args)

    def push_default(self, conn, frame: dict) -> None:
        """The default behaviour: push `{"frame": frame}` to the server's topic; a full buffer drops and counts it."""
        try:
            self.node.queues.push(self.topic, conn.client_id, {"frame": frame})
        except QueueFull as exc:
            log.debug("client %d: message dropped: %s", conn.client_id, exc)

    def _failed(self, conn, hook: str) -> None:
        self.node.counters.hook_errors += 1
        log.error("entry %s: %s failed for client %s", self.name, hook, conn.client_id, exc_info=True)

    def _slow(self, conn, hook: str, seconds: float) -> None:
        log.warning("entry %s: %s for client %s held the event loop for %.0f ms (keep hooks non-blocking)",
                    self.name, hook, conn.client_id, seconds * 1000)


def load(node, server) -> Entry:
    """The entry of one configured server (raises EntryError when it cannot be loaded)."""
    return Entry(node, server, node.config.base_dir)
