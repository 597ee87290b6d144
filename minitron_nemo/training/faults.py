"""Non-finite training steps: the check before each optimizer step, and the data faults it reports.

A reader that finds bad values in a micro-batch (the teacher cache) ``note``s where they are and lets the
step run on; before the optimizer steps, ``check`` looks at the step's losses, the gradients and the
noted faults, agrees with every rank (one all-reduce) and stops all of them together with one line:
the optimizer never steps on a non-finite loss or gradient, and no checkpoint of such a state is saved.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from minitron_nemo.errors import UserError

_NOTES: list = []


def note(message: str) -> None:
    """Record a data fault met while reading a micro-batch (the first one is reported)."""
    _NOTES.append(message)


def take() -> list:
    """The faults noted since the last call, and forget them."""
    out = list(_NOTES)
    _NOTES.clear()
    return out


def nonfinite_metrics(metrics: dict) -> list:
    return [k for k, v in metrics.items() if not math.isfinite(float(v))]


def _grad(p):
    g = getattr(p, "main_grad", None)  # Megatron DDP's grad buffer
    return p.grad if g is None else g


def grads_finite(module) -> bool:
    """All gradients of ``module``'s parameters are finite."""
    ok = [g.isfinite().all() for g in map(_grad, module.parameters()) if g is not None]
    return bool(torch.stack(ok).all()) if ok else True


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    from minitron_nemo import runtime

    t = torch.tensor([1.0 if flag else 0.0], device=runtime.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _notes_of_all_ranks(notes: list) -> list:
    if not dist.is_initialized():
        return notes
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, notes)
    return [n for rank_notes in gathered for n in rank_notes]


def check(where: str, metrics: dict, module=None, *, grads: bool = True, keep: str = "") -> None:
    """Stop every rank with one line if, on any rank, a metric or (``grads``) a gradient of ``module``
    is not finite, or a data fault was noted. ``where`` names the step (``iteration 3 of 40``), ``keep``
    says what is left as it was (the optimizer's state, the last checkpoint)."""
    notes = take()
    bad = nonfinite_metrics(metrics)
    local = bool(notes) or (grads and module is not None and not grads_finite(module))
    if not _any_rank(bool(bad) or local):
        return
    notes = _notes_of_all_ranks(notes)
    what = (f"non-finite loss ({', '.join(f'{k}={metrics[k]}' for k in bad)})" if bad
            else "invalid input values" if notes else "non-finite gradients")
    cause = f": {notes[0]}" if notes else ""
    raise UserError(f"training stopped at {where}: {what}{cause}{keep}; allowed: finite data and teacher "
                    f"values, a smaller trainer.optim.lr")
