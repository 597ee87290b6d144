"""KL against a teacher known only by its top-K tokens (offline distillation from a cache).

The teacher is stored per token as the ids of its K most likely tokens, their log-probabilities
``log p_i`` and the log-normaliser of the full distribution. The loss compares the two distributions
over K + 1 outcomes: the K cached tokens and one *rest* bucket holding everything else::

    p_R = 1 - sum_i p_i          (the teacher's rest mass, from its normaliser)
    q_i = softmax(student / tau)_i,   q_R = 1 - sum_i q_i   (the student's full softmax)
    KL  = sum_i p_i (log p_i - log q_i) + p_R (log p_R - log q_R)        (forward; reverse swaps p, q)

Grouping outcomes can only lose information, so this is a lower bound of the full-vocabulary KL
(the log-sum inequality), and it equals the full KL when K is the whole (padded) vocabulary: the rest
bucket is then empty. As with the online loss the value is multiplied by ``tau**2``.

Tensor parallel: the student's logits are vocab-sharded ``[N, V/TP]``. Each rank gathers the student
logits of the cached ids that fall in its shard, one all-reduce sums them, and the student's
normaliser is a vocab-parallel log-sum-exp (one max and one sum all-reduce); no rank holds the full
vocabulary. The normaliser's backward is ``softmax / tau`` on each shard, computed in token chunks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from minitron_nemo.distill.losses import CHUNK_ELEMENTS, _compute_dtype, _world


class _VocabParallelLSE(torch.autograd.Function):
    """``logsumexp(x / tau)`` over the vocabulary of vocab-sharded ``[N, V/TP]`` logits."""

    @staticmethod
    def forward(ctx, x, tau, chunk, group):
        cdt = _compute_dtype(x.dtype)
        n = x.shape[0]
        m = torch.empty(n, dtype=cdt, device=x.device)
        for i in range(0, n, chunk):
            m[i:i + chunk] = x[i:i + chunk].to(cdt).amax(dim=-1) / tau
        if _world(group) > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        se = torch.empty(n, dtype=cdt, device=x.device)
        for i in range(0, n, chunk):
            se[i:i + chunk] = (x[i:i + chunk].to(cdt) / tau - m[i:i + chunk, None]).exp_().sum(dim=-1)
        if _world(group) > 1:
            dist.all_reduce(se, group=group)
        lse = m + se.log()
        ctx.save_for_backward(x, lse)
        ctx.tau, ctx.chunk = tau, chunk
        return lse

    @staticmethod
    def backward(ctx, g):
        x, lse = ctx.saved_tensors
        grad = torch.empty_like(x)
        for i in range(0, x.shape[0], ctx.chunk):
            j = slice(i, i + ctx.chunk)
            p = (x[j].to(lse.dtype) / ctx.tau - lse[j, None]).exp_()
            grad[j].copy_(p.mul_(g[j, None].to(lse.dtype) / ctx.tau))
        return grad, None, None, None


class _ReduceSum(torch.autograd.Function):
    """Sum over the TP group; the gradient passes through unchanged (the loss is replicated on TP ranks)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def _shard_of(vocab_local: int, group) -> tuple[int, int]:
    rank = 0 if group is None else dist.get_rank(group)
    return rank * vocab_local, (rank + 1) * vocab_local


def student_logprobs(student: Tensor, ids: Tensor, tau: float = 1.0, group=None, chunk: int | None = None) -> Tensor:
    """``log softmax(student / tau)`` at the global ``ids`` ``[N, K]`` of vocab-sharded ``student`` ``[N, V/TP]``."""
    vl = student.shape[-1]
    lo, hi = _shard_of(vl, group)
    local = (ids >= lo) & (ids < hi)
    idx = (ids - lo).clamp(0, vl - 1)
    cdt = _compute_dtype(student.dtype)
    picked = student.gather(-1, idx).to(cdt) * local        # zero outside this rank's shard
    if _world(group) > 1:
        picked = _ReduceSum.apply(picked, group)
    chunk = chunk or max(1, CHUNK_ELEMENTS // vl)
    lse = _VocabParallelLSE.apply(student, float(tau), int(chunk), group)
    return picked / tau - lse[:, None]


def _log_rest(logp: Tensor) -> Tensor:
    """``log(1 - sum exp(logp))`` per row, clamped to a tiny mass (an empty bucket gives no gradient)."""
    total = torch.logsumexp(logp, dim=-1).clamp(max=0.0)
    rest = (-torch.expm1(total)).clamp(min=torch.finfo(logp.dtype).tiny)
    return rest.log()


def bucket_kl(student: Tensor, ids: Tensor, teacher_logp: Tensor, tau: float = 1.0, reverse: bool = False,
              group=None, chunk: int | None = None) -> Tensor:
    """Per-token ``tau**2 * KL`` over the cached ids plus the rest bucket (see the module docstring).

    ``student``: ``[N, V/TP]`` vocab-sharded logits (grad); ``ids``: ``[N, K]`` global token ids;
    ``teacher_logp``: ``[N, K]`` the teacher's log-probabilities at temperature ``tau`` of those ids.
    """
    ls = student_logprobs(student, ids.long(), tau, group, chunk)
    lt = teacher_logp.to(ls.dtype)
    ls = torch.cat([ls, _log_rest(ls)[:, None]], dim=-1)
    lt = torch.cat([lt, _log_rest(lt)[:, None]], dim=-1)
    a, b = (ls, lt) if reverse else (lt, ls)
    return (a.exp() * (a - b)).sum(dim=-1) * tau ** 2


def teacher_topk(logits: Tensor, k: int, tau: float = 1.0, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's global top-``k`` of vocab-sharded ``[N, V/TP]`` logits: ``(ids [N, k] int64,
    log-probabilities at temperature tau [N, k], log-normaliser of logits / tau [N])``, ids by
    descending probability. Under TP each rank offers its local top-k; one all-gather picks the global."""
    vl = logits.shape[-1]
    lo, _ = _shard_of(vl, group)
    cdt = _compute_dtype(logits.dtype)
    x = logits.detach()
    chunk = max(1, CHUNK_ELEMENTS // vl)
    lse = _VocabParallelLSE.apply(x, float(tau), int(chunk), group)
    vals, idx = x.topk(min(k, vl), dim=-1)
    vals, idx = vals.to(cdt), idx + lo
    if _world(group) > 1:
        w = _world(group)
        gv, gi = [torch.empty_like(vals) for _ in range(w)], [torch.empty_like(idx) for _ in range(w)]
        dist.all_gather(gv, vals.contiguous(), group=group)
        dist.all_gather(gi, idx.contiguous(), group=group)
        vals, idx = torch.cat(gv, dim=-1), torch.cat(gi, dim=-1)
        sel = vals.topk(k, dim=-1).indices
        vals, idx = vals.gather(-1, sel), idx.gather(-1, sel)
    return idx, vals / tau - lse[:, None], lse
