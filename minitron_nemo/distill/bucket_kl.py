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

Training needs the student's next-token NLL too; ``student_nll_and_logprobs`` gives both from one pass over the
logits (``offline.loss``), where the NLL by Megatron's cross entropy and the log-probabilities by a log-sum-exp of
their own would read the ``[N, V]`` logits, and write ``[N, V]`` temporaries and gradients, several times.

Tensor parallel: the student's logits are vocab-sharded ``[N, V/TP]``. Each rank gathers the student
logits of the cached ids (and the labels) that fall in its shard, one all-reduce sums them, and the student's
normaliser is each shard's log-sum-exp combined by one all-gather; no rank holds the full vocabulary. The
backward is ``softmax`` times the output gradients plus the picked entries' terms on each shard, in token chunks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from minitron_nemo.distill.losses import CHUNK_ELEMENTS, _all_gather, _compute_dtype, _world


@torch.no_grad()
def _log_normaliser(x: Tensor, tau: float, chunk: int, group) -> Tensor:
    """``logsumexp(x / tau)`` over the vocabulary of vocab-sharded ``[N, V/TP]`` logits (no gradient), chunk by chunk
    in one reused buffer; under TP one all-gather of the shards' per-row values."""
    n, vl = x.shape
    cdt = _compute_dtype(x.dtype)
    lse = torch.empty(n, dtype=cdt, device=x.device)
    buf = torch.empty((min(chunk, n), vl), dtype=cdt, device=x.device)
    for i in range(0, n, chunk):
        j = slice(i, i + chunk)
        b = buf[: x[j].shape[0]].copy_(x[j]).div_(tau)
        m = b.amax(dim=-1, keepdim=True)
        lse[j] = m.squeeze(-1) + b.sub_(m).exp_().sum(dim=-1).log()
    if _world(group) > 1:
        lse = torch.logsumexp(torch.stack(_all_gather(lse, group)), dim=0)
    return lse


def _shard_of(vocab_local: int, group) -> tuple[int, int]:
    rank = 0 if group is None else dist.get_rank(group)
    return rank * vocab_local, (rank + 1) * vocab_local


class _StudentLogProbs(torch.autograd.Function):
    """Per row of vocab-sharded logits ``x [N, V/TP]``: the next-token NLL at ``labels [N]`` (temperature 1, as
    Megatron's vocab-parallel cross entropy; None: not computed) and ``log softmax(x / tau)`` at the global ``ids
    [N, K]``, with one gradient for both: the softmax times the summed output gradients, plus the label's and the
    ids' terms.

    At ``tau`` = 1 both share one softmax, kept from the forward as Megatron's cross entropy keeps its own (``[N, V]``
    in the compute dtype), and the backward scales it in place: the cost of the cross entropy alone. At another
    ``tau`` the two softmaxes are recomputed in the backward, ``chunk`` rows at a time in reused buffers. Under TP
    each rank reduces its shard; one all-gather of the per-row normalisers and one all-reduce of the picked logits
    make them global."""

    @staticmethod
    def forward(ctx, x, labels, ids, tau, chunk, group):
        n, vl = x.shape
        lo, _ = _shard_of(vl, group)
        cdt = _compute_dtype(x.dtype)
        saved = ()
        if tau == 1.0:  # e = exp(x - m), m this shard's row maximum: the softmax once the normaliser is global
            e = torch.empty((n, vl), dtype=cdt, device=x.device).copy_(x)
            m = e.amax(dim=-1)
            local = m + e.sub_(m[:, None]).exp_().sum(dim=-1).log()
            lse = local[None].expand(2, n)
            saved = (e, m)
        else:  # log-sum-exp of x and of x / tau (this shard's)
            lse = torch.stack([_log_normaliser(x, t, chunk, None) for t in (1.0, tau)])
        if _world(group) > 1:
            lse = torch.logsumexp(torch.stack(_all_gather(lse.contiguous(), group)), dim=0)
        ids_at, ids_in = _local(ids, lo, vl)
        picked = x.gather(-1, ids_at).to(cdt) * ids_in
        if labels is not None:
            lab_at, lab_in = _local(labels[:, None], lo, vl)
            picked = torch.cat([picked, x.gather(-1, lab_at).to(cdt) * lab_in], dim=-1)
        if _world(group) > 1:
            dist.all_reduce(picked, group=group)
        nll = lse[0] - picked[:, -1] if labels is not None else lse.new_zeros(n)
        logp = (picked[:, :-1] if labels is not None else picked) / tau - lse[1][:, None]
        ctx.save_for_backward(x, ids, lse, *saved, *(() if labels is None else (labels,)))
        ctx.tau, ctx.chunk, ctx.lo, ctx.shared, ctx.has_labels = tau, chunk, lo, bool(saved), labels is not None
        if labels is None:
            ctx.mark_non_differentiable(nll)
        return nll, logp

    @staticmethod
    def backward(ctx, g_nll, g_logp):
        # d nll / dx = softmax(x) - onehot(label);  d logp_k / dx = (onehot(id_k) - softmax(x / tau)) / tau
        t = ctx.saved_tensors
        x, ids, lse = t[:3]
        e, m = t[3:5] if ctx.shared else (None, None)
        labels = t[-1] if ctx.has_labels else None
        tau, chunk, lo = ctx.tau, ctx.chunk, ctx.lo
        n, vl = x.shape
        cdt = lse.dtype
        g_nll = g_nll.to(cdt) if labels is not None else torch.zeros(n, dtype=cdt, device=x.device)
        g_ids = g_logp.to(cdt) / tau
        g_soft = g_ids.sum(dim=-1)                      # the weight of softmax(x / tau)
        ids_at, ids_in = _local(ids, lo, vl)
        g_ids = g_ids * ids_in
        if labels is not None:
            lab_at, lab_in = _local(labels[:, None], lo, vl)
            g_lab = -(g_nll[:, None] * lab_in)
        if ctx.shared:  # softmax = e * exp(m - lse), scaled in place: a second backward would find it spent
            if getattr(ctx, "spent", False):
                raise RuntimeError("a second backward through the offline KD loss (retain_graph) is not supported")
            ctx.spent = True
            grad = e.mul_(((g_nll - g_soft) * torch.exp(m - lse[0]))[:, None])
            grad.scatter_add_(-1, ids_at, g_ids)
            if labels is not None:
                grad.scatter_add_(-1, lab_at, g_lab)
            return grad.to(x.dtype), None, None, None, None, None
        grad = torch.empty_like(x)
        bufs = torch.empty((2, min(chunk, n), vl), dtype=cdt, device=x.device)
        for i in range(0, n, chunk):
            j = slice(i, i + chunk)
            rows = x[j].shape[0]
            b = bufs[0, :rows].copy_(x[j])
            c = bufs[1, :rows].copy_(b).div_(tau).sub_(lse[1, j, None]).exp_().mul_(-g_soft[j, None])
            b.sub_(lse[0, j, None]).exp_().mul_(g_nll[j, None]).add_(c)
            b.scatter_add_(-1, ids_at[j], g_ids[j])
            if labels is not None:
                b.scatter_add_(-1, lab_at[j], g_lab[j])
            grad[j].copy_(b)
        return grad, None, None, None, None, None


def _local(ids: Tensor, lo: int, vl: int) -> tuple[Tensor, Tensor]:
    """Global token ids -> (their column in this rank's shard, clamped, and 1.0 where the shard holds them)."""
    ids = ids.long()
    return (ids - lo).clamp(0, vl - 1), ((ids >= lo) & (ids < lo + vl)).float()


def student_nll_and_logprobs(student: Tensor, labels, ids: Tensor, tau: float = 1.0, group=None,
                             chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """``(next-token NLL at labels [N], log softmax(student / tau) at the global ids [N, K])`` of vocab-sharded
    ``student [N, V/TP]`` in one pass (``labels`` None: the NLL is zeros)."""
    chunk = chunk or max(1, CHUNK_ELEMENTS // student.shape[-1])
    return _StudentLogProbs.apply(student, labels, ids, float(tau), int(chunk), group)


def student_logprobs(student: Tensor, ids: Tensor, tau: float = 1.0, group=None, chunk: int | None = None) -> Tensor:
    """``log softmax(student / tau)`` at the global ``ids`` ``[N, K]`` of vocab-sharded ``student`` ``[N, V/TP]``."""
    return student_nll_and_logprobs(student, None, ids, tau, group, chunk)[1]


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
    return bucket_kl_of(student_logprobs(student, ids, tau, group, chunk), teacher_logp, tau, reverse)


def bucket_kl_of(student_logp: Tensor, teacher_logp: Tensor, tau: float = 1.0, reverse: bool = False) -> Tensor:
    """``bucket_kl`` from the student's log-probabilities at the cached ids (``student_nll_and_logprobs``)."""
    ls = student_logp
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
    lse = _log_normaliser(x, float(tau), int(chunk), group)
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
