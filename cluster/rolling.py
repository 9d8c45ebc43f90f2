"""Rolling restart: a supervisor replaces its node processes one at a time, refusing no connection.

For each node worker in turn (docs/operations.md, Rolling restart):

1. start its replacement with the worker's listening sockets and the other mesh port index
   (cluster/handover.py) and the write end of a pipe; the replacement registers, gets a new node
   id, listens, and writes `ready <node id>` on the pipe. At most READY_S: a replacement that
   exits or is not ready by then stops the rolling restart, and the old process keeps serving;
2. order the old process to drain for a restart (DRAIN_SIGNAL: it stops accepting, closes its
   clients and API connections with 1012, hands on its queue events, says goodbye, exits), and
   wait for it to exit: at most its drain deadline (`node.drain_timeout`) and STOP_MARGIN_S,
   then it is killed;
3. the next worker.

Before it begins, the configuration file is read again: one that does not load, or that
changes what the supervisor itself holds (the listening addresses, the mesh port scheme), is
refused with an ERROR line, and nothing is restarted. Driven by the supervisor's loop (`tick`),
never blocking it: a SIGTERM is obeyed at once, and the processes of an unfinished restart stop
with the nodes (`leftovers`). Owned by the supervisor's one thread.
"""

import logging
import os
import time

from cluster import config as config_module, handover
from cluster.handover import DRAIN_SIGNAL

log = logging.getLogger("meshgate.supervisor")

READY_S = 20.0                  # a replacement must serve within this of its start
STOP_MARGIN_S = 3.0             # beyond the node's own drain deadline, before it is killed


class _Step:
    """The replacement of one worker: starting (`old` None) or the old process draining."""

    def __init__(self, child, replacement, ready_fd: int, deadline: float):
        self.child, self.replacement, self.ready_fd, self.deadline = child, replacement, ready_fd, deadline
        self.old = None
        self.buffer = b""
        self.started_wall = 0.0   # time.time() just before the replacement started (what its exit notice says)


class Rolling:
    """Args:
        nodes: the supervisor's node Child objects, each with its `slot` (cluster/handover.py).
        config: the Config the supervisor started with.
        config_path: the file a rolling restart reads again (None: the defaults).

    `stop_s` is how long a node process may take to stop once told (its drain deadline, the
    longest yet, and STOP_MARGIN_S).
    """

    def __init__(self, nodes: list, config, config_path):
        self.nodes, self.config, self.config_path = nodes, config, config_path
        self.stop_s = config.node.drain_timeout + STOP_MARGIN_S
        self._todo = []         # node Child objects still to replace
        self._step = None
        self._began = 0.0
        self._replaced = 0
        self._exiting = []      # (name, process, kill at): replaced or refused processes on their way out

    @property
    def running(self) -> bool:
        return self._step is not None or bool(self._todo)

    def request(self) -> None:
        """SIGUSR2: begin, unless a rolling restart is under way (then it is ignored, and said so) or the
        configuration file refuses it (see the module docstring)."""
        if self.running:
            log.info("SIGUSR2: a rolling restart is under way (%d of %d node processes replaced); this one is ignored",
                     self._replaced, len(self.nodes))
            return
        refusal = self._refusal()
        if refusal is not None:
            log.error("SIGUSR2: no rolling restart: %s", refusal)
            return
        log.info("SIGUSR2: rolling restart of %d node processes, one at a time", len(self.nodes))
        self._todo, self._began, self._replaced = list(self.nodes), time.monotonic(), 0

    def _refusal(self):
        """Why the configuration file, read again, allows no rolling restart; None when it allows one."""
        try:
            new = config_module.load(self.config_path)
            config_module.check_mesh_ports(new, len(self.nodes))
        except config_module.ConfigError as exc:
            return f"the configuration does not load: {exc}"
        changed = [what for what, old, now in [
            ("the listening addresses (node.api, node.servers[].bind and .port)", handover.addresses(self.config),
             handover.addresses(new)),
            ("node.mesh.port", self.config.node.mesh.port, new.node.mesh.port)] if old != now]
        if changed:
            return f"{' and '.join(changed)} changed, which takes a full restart"
        self.stop_s = max(self.stop_s, new.node.drain_timeout + STOP_MARGIN_S)   # the replacements' deadline
        return None

    def tick(self) -> None:
        """One look at the restart under way; called every turn of the supervisor's loop."""
        self._reap()
        if self._step is None and self._todo:
            self._begin(self._todo.pop(0))
        elif self._step is not None and self._step.old is None:
            self._wait_ready(self._step)
        elif self._step is not None:
            self._wait_drained(self._step)
        if not self.running and self._began:
            log.info("rolling restart done: %d node processes replaced in %.1f s", self._replaced,
                     time.monotonic() - self._began)
            self._began = 0.0

    def leftovers(self) -> list:
        """`(name, process)` of every process of the restart still alive: they stop with the nodes."""
        found = [(name, process) for name, process, _ in self._exiting]
        step = self._step
        if step is not None:
            found.append((f"{step.child.name} (replacement)", step.replacement) if step.old is None
                         else (f"{step.child.name} (draining)", step.old))
        return [(name, process) for name, process in found if process.poll() is None]

    # --- the steps -------------------------------------------------------------------

    def _begin(self, child) -> None:
        if not child.alive():
            log.warning("rolling restart: %s is not running; it starts on the new code when it restarts", child.name)
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        try:
            env, fds = child.slot.environment(generation=child.slot.generation + 1, ready_fd=write_fd)
            started_wall = time.time()
            replacement = child.spawn(env, fds)
        except OSError as exc:
            os.close(read_fd)
            self._stop(f"the replacement of {child.name} could not be started: {exc}")
            return
        finally:
            os.close(write_fd)
        child.slot.hold(replacement)
        log.info("rolling restart: started the replacement of %s (pid %d; pid %d serves meanwhile)",
                 child.name, replacement.pid, child.process.pid)
        self._step = _Step(child, replacement, read_fd, time.monotonic() + READY_S)
        self._step.started_wall = started_wall

    def _wait_ready(self, step: _Step) -> None:
        line = self._read_ready(step)
        if line is not None:
            return self._hand_over(step, line)
        code = step.replacement.poll()
        if code is not None:
            return self._refuse(step, f"exited with {code} before it was ready")
        if not step.child.alive():
            return self._refuse(step, f"was starting when pid {step.child.process.pid} exited with "
                                      f"{step.child.process.returncode}", keep=False)
        if time.monotonic() > step.deadline:
            return self._refuse(step, f"was not ready within {READY_S:.0f} s")

    def _read_ready(self, step: _Step):
        """The readiness line once it is whole; None before (or when the pipe closed without one)."""
        try:
            step.buffer += os.read(step.ready_fd, 256)
        except BlockingIOError:
            pass
        line, newline, _ = step.buffer.partition(b"\n")
        return line.decode("ascii", "replace") if newline and line.startswith(b"ready") else None

    def _hand_over(self, step: _Step, line: str) -> None:
        child = step.child
        os.close(step.ready_fd)
        step.old, child.process = child.process, step.replacement
        child.started, child.restart_at = time.monotonic(), 0.0
        child.started_wall = step.started_wall   # what an exit notice of the new process says (mesh.Exited)
        child.slot.generation += 1
        step.old.send_signal(DRAIN_SIGNAL)
        step.deadline = time.monotonic() + self.stop_s
        log.info("rolling restart: %s pid %d is %s; pid %d drains (closes its clients with 1012)",
                 child.name, child.process.pid, line.replace("ready", "ready as node", 1), step.old.pid)

    def _wait_drained(self, step: _Step) -> None:
        old = step.old
        if old.poll() is None:
            if time.monotonic() <= step.deadline:
                return
            log.warning("%s pid %d did not finish its drain within %.0f s; killing it", step.child.name, old.pid,
                        self.stop_s)
            old.kill()
            old.wait()
        else:
            log.info("rolling restart: %s pid %d exited with %d", step.child.name, old.pid, old.returncode)
        self._step = None
        self._replaced += 1
        if not step.child.alive():
            self._stop(f"{step.child.name} pid {step.replacement.pid} exited after it was ready "
                       f"(with {step.replacement.returncode})")

    # --- ending ----------------------------------------------------------------------

    def _refuse(self, step: _Step, why: str, keep: bool = True) -> None:
        """The replacement will not do: it goes; the old process keeps serving (unless it is gone too)."""
        os.close(step.ready_fd)
        self._step = None
        if step.replacement.poll() is None:
            step.replacement.terminate()
            self._exiting.append((f"{step.child.name} (refused replacement)", step.replacement,
                                  time.monotonic() + self.stop_s))
        kept = f"; pid {step.child.process.pid} keeps serving" if keep else ""
        self._stop(f"the replacement of {step.child.name} (pid {step.replacement.pid}) {why}{kept}")

    def _stop(self, why: str) -> None:
        log.error("rolling restart stopped after %d of %d node processes: %s", self._replaced, len(self.nodes), why)
        self._todo = []
        self._began = 0.0

    def _reap(self) -> None:
        """Refused replacements have `stop_s` to exit; then they are killed."""
        still = []
        for name, process, kill_at in self._exiting:
            if process.poll() is not None:
                continue
            if time.monotonic() > kill_at:
                log.warning("%s (pid %d) did not stop in time; killing it", name, process.pid)
                process.kill()
                process.wait()
                continue
            still.append((name, process, kill_at))
        self._exiting = still
