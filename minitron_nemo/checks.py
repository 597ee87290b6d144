"""Range checks of config values: each raises a one-line ``UserError`` "KEY=VALUE; allowed: ...".

The group schemas (``prune/config.py``, ``distill/config.py``, ``training/config.py``, ``eval/config.py``,
``models/parallel.py``, ``schemas.py``) call these from their ``check(at)`` methods.
"""

from __future__ import annotations

import math

from minitron_nemo.errors import UserError


def fail(key: str, value, allowed: str):
    raise UserError(f"{key}={value!r}; allowed: {allowed}")


def at_least(key: str, value, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or value < low:
        fail(key, value, f"{'null or ' if optional else ''}an integer >= {low}")


def positive_number(key: str, value, optional: bool = False, zero: bool = False) -> None:
    if value is None and optional:
        return
    ok = value is not None and math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        fail(key, value, f"{'null or ' if optional else ''}a finite number {'>=' if zero else '>'} 0")


def fraction(key: str, value, *, low_open: bool = True) -> None:
    ok = value is not None and math.isfinite(value) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        fail(key, value, f"a number with {'0 <' if low_open else '0 <='} value <= 1")


def choice(key: str, value, allowed) -> None:
    if value not in allowed:
        fail(key, value, ", ".join(map(str, allowed)))
