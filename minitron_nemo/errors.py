"""User-facing errors: ``UserError`` is a problem the user can act on (a bad value, a bad file, a refused
output). Entry points (``minitron_nemo.entry.user_errors_exit``) print it as one line, exit code 2, no
traceback. This module imports nothing from the package, so every module can raise it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (path, value, config). Printed as one line; exit code 2."""


def check(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)
