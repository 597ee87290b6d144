"""Score helpers shared by the dense and the expert importance (``importance.py``, ``experts.py``) and
the trim plan (``trim.py``): reductions of score tensors over a process group, and top-k selection."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_over(t, group):
    """Sum ``t`` in place over ``group`` (a no-op without torch.distributed or with one rank); returns ``t``."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def all_gather_along(t, group, dim):
    """Every rank's ``t`` of ``group``, concatenated along ``dim`` in rank order."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in ascending index order (ties: lower index first)."""
    order = torch.argsort(scores.float(), descending=True, stable=True)[:k]
    return order.sort().values
