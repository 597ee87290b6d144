"""User-facing errors: one line, exit code 2, no traceback."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's input (path, value, config). Printed as one line; exit code 2."""


def check(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def user_errors_exit(fn):
    """Decorator for entry points: a UserError becomes ``error: <message>`` on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
