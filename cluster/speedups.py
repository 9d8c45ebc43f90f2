"""The C versions of a few per-request functions (cluster/_speedups.c), when they are built.

`native` is the compiled module, or None: not built (no C compiler when the
package was installed, another Python implementation), or turned off with the
environment variable MESHGATE_NO_SPEEDUPS=1. Each function it holds stands
for a Python function of the same behaviour, used without it and compared
with it by tests/test_speedups.py; the C code takes only the common case and
hands anything else to the Python function, so that every rule and every
error message is written once, in Python (docs/architecture.md).
"""

import os

turned_off = os.environ.get("MESHGATE_NO_SPEEDUPS", "") not in ("", "0")
native = None
if not turned_off:
    try:
        from cluster import _speedups as native
    except ImportError:
        native = None


def describe() -> str:
    """Which versions run, for the node's log line."""
    if native is not None:
        return "C speedups"
    return "no C speedups (" + ("MESHGATE_NO_SPEEDUPS" if turned_off else "cluster/_speedups.c is not built") + ")"
