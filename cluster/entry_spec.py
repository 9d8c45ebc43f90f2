"""Where an entry lives (a file or a module) and the start-up check that it loads.

Shared by the CLI (refuse a bad entry before anything starts) and the node
processes (node/hooks.py loads it). Reads and compiles the file; runs nothing.
"""

import importlib.util
import os


class EntryError(Exception):
    """An entry could not be loaded (missing, syntax error, failed import)."""


def resolve(spec: str, base_dir: str):
    """`(path, None)` for a file entry, `(None, module_name)` for a dotted module."""
    if spec.endswith(".py") or "/" in spec or os.sep in spec:
        return os.path.normpath(os.path.join(base_dir, spec)), None
    return None, spec


def check_spec(spec: str, base_dir: str) -> None:
    """Start-up check of an entry without running it: the file compiles, or the module can be found.

    Raises:
        EntryError: with a message that names the file and line.
    """
    path, module = resolve(spec, base_dir)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                compile(handle.read(), path, "exec")
        except OSError as exc:
            raise EntryError(f"{path}: cannot read: {exc.strerror}") from None
        except SyntaxError as exc:
            raise EntryError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    elif importlib.util.find_spec(module) is None:
        raise EntryError(f"module {module!r} not found")
