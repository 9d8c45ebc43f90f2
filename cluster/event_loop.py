"""The event loop a process runs on: uvloop where it is installed, else asyncio's own.

uvloop (libuv under asyncio's API) makes the loop itself, the sockets'
callbacks and the timers cheaper; Tornado and pyzmq run on it unchanged. It
is a dependency on the platforms it supports; `node.event_loop: asyncio`
chooses the standard loop, and `auto` falls back to it where uvloop cannot
be imported.
"""

import asyncio
import logging

log = logging.getLogger("meshgate.node")


class LoopUnavailable(RuntimeError):
    """`uvloop` was asked for and cannot be imported."""


def run(coroutine, choice: str = "auto"):
    """Runs `coroutine` to completion on a new loop of `choice` (auto, uvloop, asyncio); returns its result.

    Raises:
        LoopUnavailable: `uvloop` was asked for and cannot be imported.
    """
    factory = loop_factory(choice)   # before the coroutine exists: nothing is left un-awaited
    if factory is None:
        return asyncio.run(coroutine)
    if not hasattr(asyncio, "Runner"):   # Python before 3.11
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coroutine)


def loop_factory(choice: str):
    """uvloop's `new_event_loop`, or None for asyncio's own loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise LoopUnavailable("node.event_loop is uvloop, but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def name() -> str:
    """The running loop's kind, for the log."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
