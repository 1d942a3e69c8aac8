"""Optional dependencies: which commands need which extra, checked before a command does any work.

`bench` draws its plots with matplotlib and `serve` runs on fastapi and uvicorn; without them the command
stops at once with the `pip install` line that brings them, instead of failing after minutes of work.
"""

from __future__ import annotations

import importlib.util

from mergekit_subspace.errors import SubspaceError

# command -> (extra, modules it imports)
COMMAND_EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "bench": ("bench", ("matplotlib",)),
    "serve": ("serve", ("fastapi", "uvicorn")),
}


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return True


def require_extras(command: str) -> None:
    """Raise one SubspaceError naming the missing modules and the install line, if `command` needs any."""
    extra, modules = COMMAND_EXTRAS.get(command, ("", ()))
    missing = [m for m in modules if _missing(m)]
    if missing:
        raise SubspaceError(
            f"`{command}` needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: pip install 'mergekit-subspace[{extra}]'"
        )
