"""The ``key=value`` command lines of the recipes that have no Hydra config (recipes/inspect_data.py,
recipes/evaluate_instruct.py, recipes/make_pairs.py): ``--help`` prints the recipe's usage; an unknown
key, or an integer out of range, is one line."""

from __future__ import annotations

import sys

from minitron_nemo.errors import UserError


def parse(argv, allowed, usage: str, defaults: dict | None = None) -> dict:
    """``{key: value string}`` of ``argv`` over ``defaults``; ``--help`` / ``-h`` print ``usage`` and exit 0."""
    if "--help" in argv or "-h" in argv:
        print(usage.strip(), flush=True)
        sys.exit(0)
    args = dict(defaults or {})
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in allowed:
            raise UserError(f"unknown argument {a!r}; allowed: " + ", ".join(f"{k}=..." for k in allowed))
        args[key] = value
    return args


def integers(args: dict, lows: dict) -> None:
    """Each ``args[key]`` (None stays None) as an integer >= ``lows[key]``, in place."""
    for k, low in lows.items():
        v = args[k]
        if v is not None and (not str(v).isdigit() or int(v) < low):
            raise UserError(f"{k}={v!r}; allowed: an integer >= {low}")
        args[k] = None if v is None else int(v)
