"""How every command reports bad input: one line on stderr and exit code 2, never a traceback.

Its own module (not cli.py) so that the feature commands cli.py registers (merge, serve, store management)
use the same wrapper without importing cli.py while it is being imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from mergekit_subspace.errors import SubspaceError, one_line

EXIT_BAD_INPUT = 2


def friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SubspaceError, and the OS's own errors (a full disk, a permission, a file gone), into one clear
    line on stderr and exit code 2, not a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SubspaceError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {one_line(where + (exc.strerror or str(exc)))}", err=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper
