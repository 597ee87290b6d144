"""Distillation losses: vocab-parallel logits KL, intermediate-state losses, and their balancer.

Layouts (Megatron-Core conventions):
  * logits: ``[b, s, V/TP]`` per TP rank, the vocab-sharded output of ``GPTModel.forward`` without
    labels; pass ``seq_first=True`` for the raw ``output_layer`` output ``[s, b, V/TP]``.
    Student and teacher must have the same shape (same padded vocabulary, same TP).
  * hidden states: ``[s, b, h]`` (full hidden size, e.g. post-norm outputs; not sequence-parallel).
  * ``loss_mask``: ``[b, s]``, 1 for tokens that count, 0 for padding.

KL and temperature: with ``x = logits / tau`` the loss is ``tau**2 * KL(softmax(x_t) || softmax(x_s))``
per token (forward; ``reverse`` swaps the arguments). The ``tau**2`` factor (Hinton et al.) keeps
gradient magnitudes independent of ``tau``; modelopt omits it, so at ``tau != 1`` our loss equals
modelopt's times ``tau**2``. At the paper's ``tau = 1`` they agree.

Under TP the softmax is vocab-parallel: each rank reduces its shard to three numbers per token
(local log-sum-exp of both sides and a local partial sum) and one all-gather of those ``[3, tokens]``
per call combines them exactly. The full vocabulary is never gathered, and gradients need no
communication. Work runs in token chunks so that only a few ``[chunk, V/TP]`` fp32 temporaries exist
at a time: the extra memory beyond the logits is their gradient plus those temporaries.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from minitron_nemo.distill.config import DistillationConfig
from minitron_nemo.errors import UserError

CHUNK_ELEMENTS = 1 << 24  # automatic chunk size: ~16M logits (64 MiB in fp32) per temporary


class LossOutput(NamedTuple):
    """A masked loss: ``loss = loss_sum / max(num_tokens, 1)``; ``per_token`` is 0 where masked."""
    loss: Tensor
    loss_sum: Tensor
    num_tokens: Tensor
    per_token: Tensor


# ----------------------------------------------------------------------------- helpers

def resolve_tp_group(tp_group=None):
    """``tp_group`` if given, else Megatron's TP group when parallel state exists, else None (no TP)."""
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(buf: Tensor, x: Tensor, tau: float) -> Tensor:
    """``x / tau`` in the compute dtype, written into the reusable chunk buffer ``buf``."""
    y = buf[:x.shape[0]]
    y.copy_(x)
    return y.div_(tau) if tau != 1.0 else y


def _all_gather(x: Tensor, group) -> list[Tensor]:
    parts = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _masked(per_token: Tensor, mask: Tensor) -> LossOutput:
    mask = mask.to(per_token.dtype)
    per_token = per_token * mask
    total, count = per_token.sum(), mask.sum()
    return LossOutput(total / count.clamp(min=1), total, count, per_token)


def _mask_or_ones(loss_mask: Optional[Tensor], shape, like: Tensor) -> Tensor:
    if loss_mask is None:
        return torch.ones(shape, dtype=torch.float32, device=like.device)
    if tuple(loss_mask.shape) != tuple(shape):
        raise UserError(f"loss_mask shape {list(loss_mask.shape)} does not match the tokens {list(shape)}")
    return loss_mask


# ----------------------------------------------------------------------------- logits KL

class _VocabParallelKL(torch.autograd.Function):
    """Per-token ``tau**2 * KL`` of vocab-sharded ``[N, V/TP]`` logits; exact gradient for the student."""

    @staticmethod
    def forward(ctx, student, teacher, tau, reverse, chunk, group):
        n = student.shape[0]
        cdt = _compute_dtype(student.dtype)
        # KL(a || b) with a = teacher (forward) or student (reverse). Per token and shard r:
        # lse_a_r, lse_b_r and A_r = sum_v softmax_r(a)_v (a_v - b_v). Then globally
        # KL = sum_r exp(lse_a_r - lse_a) A_r - lse_a + lse_b.
        a_src, b_src = (student, teacher) if reverse else (teacher, student)
        stats = torch.empty((3, n), dtype=cdt, device=student.device)
        bufs = torch.empty((3, min(chunk, n), student.shape[1]), dtype=cdt, device=student.device)
        for i in range(0, n, chunk):
            j = slice(i, i + chunk)
            a, b = _scaled(bufs[0], a_src[j], tau), _scaled(bufs[1], b_src[j], tau)
            d = torch.sub(a, b, out=bufs[2, :a.shape[0]])
            m = b.amax(dim=-1, keepdim=True)
            stats[1, j] = m.squeeze(-1) + b.sub_(m).exp_().sum(dim=-1).log()
            m = a.amax(dim=-1, keepdim=True)
            se = a.sub_(m).exp_().sum(dim=-1)     # sum exp(a - max)
            stats[2, j] = a.mul_(d).sum(dim=-1) / se
            stats[0, j] = m.squeeze(-1) + se.log()
        allst = torch.stack(_all_gather(stats, group)) if _world(group) > 1 else stats[None]
        lse_a, lse_b = torch.logsumexp(allst[:, 0], dim=0), torch.logsumexp(allst[:, 1], dim=0)
        kl = (torch.exp(allst[:, 0] - lse_a) * allst[:, 2]).sum(dim=0) - lse_a + lse_b
        lse_s, lse_t = (lse_a, lse_b) if reverse else (lse_b, lse_a)
        ctx.save_for_backward(student, teacher, lse_s, lse_t, kl)
        ctx.tau, ctx.reverse, ctx.chunk = tau, reverse, chunk
        return kl * tau ** 2

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, lse_s, lse_t, kl = ctx.saved_tensors
        tau, chunk, cdt = ctx.tau, ctx.chunk, lse_s.dtype
        g = grad_out.to(cdt) * tau               # d(tau^2 KL(x/tau))/dz = tau * dKL/dx
        grad = torch.empty_like(student)
        n = student.shape[0]
        bufs = torch.empty((2, min(chunk, n), student.shape[1]), dtype=cdt, device=student.device)
        for i in range(0, n, chunk):
            j = slice(i, i + chunk)
            ls = _scaled(bufs[0], student[j], tau).sub_(lse_s[j, None])   # log p_s
            lt = _scaled(bufs[1], teacher[j], tau).sub_(lse_t[j, None])   # log p_t
            if ctx.reverse:   # d KL(s||t) / ds_v = p_s,v (log p_s,v - log p_t,v - KL)
                lt.neg_().add_(ls).sub_(kl[j, None])
                ls.exp_().mul_(lt)
            else:             # d KL(t||s) / ds_v = p_s,v - p_t,v
                ls.exp_().sub_(lt.exp_())
            grad[j].copy_(ls.mul_(g[j, None]))
        return grad, None, None, None, None, None


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim; backward keeps this rank's slice (the loss is replicated on TP ranks)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.rank, ctx.n = dist.get_rank(group), x.shape[-1]
        return torch.cat(_all_gather(x, group), dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g[..., ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n].contiguous(), None


class _GatherRows(torch.autograd.Function):
    """``x.gather(-1, idx)`` on ``[N, V]`` with distinct indices per row; the backward writes the gradient
    in place (torch's CPU scatter backward makes a transient copy twice the size of ``x`` for bf16)."""

    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(idx)
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return x.gather(-1, idx)

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        n, v = ctx.shape
        grad = torch.zeros((n, v), dtype=ctx.dtype, device=g.device)
        flat = (idx + torch.arange(n, device=idx.device)[:, None] * v).view(-1)
        grad.view(-1).index_copy_(0, flat, g.to(ctx.dtype).reshape(-1))
        return grad, None


def _topk_kl(student: Tensor, teacher: Tensor, k: int, tau: float, reverse: bool, group) -> Tensor:
    """Per-token ``tau**2 * KL`` over the teacher's global top-k entries, renormalised on both sides."""
    world, vl = _world(group), student.shape[-1]
    if k > vl * world:
        raise UserError(f"logit_kl_topk={k} exceeds the vocabulary size {vl * world}; allowed: 1..{vl * world}")
    cdt = _compute_dtype(student.dtype)
    with torch.no_grad():
        t_vals, idx = teacher.topk(min(k, vl), dim=-1)      # local candidates
        t_vals = t_vals.to(cdt)
    s_vals = _GatherRows.apply(student, idx).to(cdt)
    if world > 1:   # global top-k among the world * k candidates; never the whole vocabulary
        t_vals = torch.cat(_all_gather(t_vals, group), dim=-1)
        s_vals = _GatherLastDim.apply(s_vals, group)
        sel = t_vals.topk(k, dim=-1).indices
        t_vals, s_vals = t_vals.gather(-1, sel), s_vals.gather(-1, sel)
    ls, lt = F.log_softmax(s_vals / tau, dim=-1), F.log_softmax(t_vals / tau, dim=-1)
    p, q = (ls, lt) if reverse else (lt, ls)
    return (p.exp() * (p - q)).sum(dim=-1) * tau ** 2


def logits_kl_loss(student_logits: Tensor, teacher_logits: Tensor, loss_mask: Optional[Tensor] = None, *,
                   temperature: float = 1.0, reverse: bool = False, top_k: Optional[int] = None,
                   chunk_size: Optional[int] = None, tp_group=None, seq_first: bool = False) -> LossOutput:
    """Masked ``tau**2 * KL(teacher || student)`` (``reverse``: ``KL(student || teacher)``) of vocab-parallel logits.

    ``student_logits``/``teacher_logits``: ``[b, s, V/TP]`` (``seq_first``: ``[s, b, V/TP]``), this rank's
    vocab shard; ``loss_mask``: ``[b, s]`` (None = all tokens). ``top_k``: restrict to the teacher's
    top-k tokens. ``chunk_size``: tokens per chunk (None: about 16M logits). ``tp_group``: None = Megatron's
    TP group if parallel state is initialised, else no TP. Only the student receives gradients.
    """
    if student_logits.shape != teacher_logits.shape:
        raise UserError(f"student logits {list(student_logits.shape)} and teacher logits "
                        f"{list(teacher_logits.shape)} differ in shape; the padded vocabulary sizes and "
                        "tensor parallelism of teacher and student must match")
    group = resolve_tp_group(tp_group)
    lead, vl = student_logits.shape[:-1], student_logits.shape[-1]
    mask_shape = (lead[1], lead[0]) + tuple(lead[2:]) if seq_first else tuple(lead)
    mask = _mask_or_ones(loss_mask, mask_shape, student_logits)
    if seq_first:
        mask = mask.transpose(0, 1)
    s2, t2 = student_logits.reshape(-1, vl), teacher_logits.detach().reshape(-1, vl)
    if top_k is not None:
        kl = _topk_kl(s2, t2, int(top_k), float(temperature), reverse, group)
    else:
        chunk = chunk_size or max(1, CHUNK_ELEMENTS // vl)
        kl = _VocabParallelKL.apply(s2, t2, float(temperature), bool(reverse), int(chunk), group)
    out = _masked(kl.view(lead), mask)
    if seq_first:
        return out._replace(per_token=out.per_token.transpose(0, 1))
    return out


# ----------------------------------------------------------------------------- intermediate states

class HiddenProjection(nn.Module):
    """Shared student-to-teacher hidden projection (``nn.Linear``; identity when sizes match). Owned by the trainer."""

    def __init__(self, student_hidden: int, teacher_hidden: int, init_std: float = 0.02):
        super().__init__()
        self.fit = nn.Identity() if student_hidden == teacher_hidden else nn.Linear(student_hidden, teacher_hidden)
        if isinstance(self.fit, nn.Linear):
            nn.init.normal_(self.fit.weight, std=init_std)
            nn.init.zeros_(self.fit.bias)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.fit, nn.Linear):
            x = x.to(self.fit.weight.dtype)
        return self.fit(x)


def intermediate_loss(student_hidden: Tensor, teacher_hidden: Tensor, loss_mask: Optional[Tensor] = None,
                      kind: str = "cosine", projection: Optional[nn.Module] = None) -> LossOutput:
    """Masked per-token ``1 - cos`` or MSE (mean over hidden) of ``[s, b, h]`` states; ``loss_mask`` is ``[b, s]``."""
    if projection is not None:
        student_hidden = projection(student_hidden)
    if student_hidden.shape != teacher_hidden.shape:
        raise UserError(f"student hidden states {list(student_hidden.shape)} and teacher hidden states "
                        f"{list(teacher_hidden.shape)} differ; pass a HiddenProjection when hidden sizes differ")
    s, t = student_hidden.float(), teacher_hidden.detach().float()
    if kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    elif kind == "mse":
        per_token = (s - t).pow(2).mean(dim=-1)
    else:
        raise UserError(f"intermediate loss {kind!r} is not supported; allowed: cosine, mse")
    sl, b = per_token.shape
    mask = _mask_or_ones(loss_mask, (b, sl), per_token).transpose(0, 1)
    out = _masked(per_token, mask)
    return out._replace(per_token=out.per_token.transpose(0, 1))


# ----------------------------------------------------------------------------- balancer

def balance(logits_loss: Tensor, intermediate: Optional[Tensor] = None, lm_loss: Optional[Tensor] = None, *,
            skip_lm_loss: bool = True, kd_loss_scale: float = 1.0) -> Tensor:
    """Total loss, as modelopt's ``LogitsAndIntermediatesLossBalancer``.

    ``kd = L_logits + alpha * L_is`` with ``alpha = L_logits / L_is`` (detached, this step's values;
    the intermediate term is skipped when ``L_is`` is 0). With ``skip_lm_loss`` the total is ``kd``.
    Otherwise, as modelopt does, ``kd`` is first rescaled to the LM loss's value (detached factor
    ``L_lm / kd``) and the total is ``L_lm + kd_loss_scale * kd``.
    """
    kd = logits_loss
    if intermediate is not None:
        li = intermediate.detach()
        alpha = torch.where(li > 0, logits_loss.detach() / li.clamp(min=torch.finfo(li.dtype).tiny),
                            torch.zeros_like(li))
        kd = kd + alpha * intermediate
    if skip_lm_loss:
        return kd
    if lm_loss is None:
        raise UserError("skip_lm_loss is false but no LM loss was given")
    kd_d, lm_d = kd.detach(), lm_loss.detach().to(kd.dtype)
    ok = (kd_d > 0) & (lm_d > 0)
    kd = kd * torch.where(ok, lm_d / kd_d.clamp(min=torch.finfo(kd_d.dtype).tiny), torch.ones_like(kd_d))
    return lm_loss + kd_loss_scale * kd


def distillation_loss(cfg: DistillationConfig, student_logits: Tensor, teacher_logits: Tensor,
                      loss_mask: Optional[Tensor] = None, *, hidden_pairs: Sequence[tuple] = (),
                      projection: Optional[nn.Module] = None, lm_loss: Optional[Tensor] = None,
                      tp_group=None, seq_first: bool = False) -> dict:
    """All distillation losses for one micro-batch on the last pipeline stage.

    ``hidden_pairs``: ``(student_hidden, teacher_hidden)`` per entry of ``cfg.intermediate_layer_pairs``
    (same order; their kinds come from the config); intermediate losses are averaged over pairs.
    ``lm_loss``: the student's LM loss, a scalar or per-token ``[b, s]`` (masked-averaged here).
    Returns 0-d tensors ``lm``, ``logits``, ``intermediate``, ``total`` (with grad) and ``num_tokens``.
    """
    kl = logits_kl_loss(student_logits, teacher_logits, loss_mask, temperature=cfg.logit_kl_temperature,
                        reverse=cfg.reverse_kl, top_k=cfg.logit_kl_topk, chunk_size=cfg.kl_chunk_size,
                        tp_group=tp_group, seq_first=seq_first)
    if len(hidden_pairs) != len(cfg.intermediate_layer_pairs):
        raise UserError(f"got {len(hidden_pairs)} hidden-state pairs for {len(cfg.intermediate_layer_pairs)} "
                        "intermediate_layer_pairs in the distillation config")
    inter = None
    if hidden_pairs:
        inter = sum(intermediate_loss(s, t, loss_mask, kind, projection).loss
                    for (s, t), (_, _, kind) in zip(hidden_pairs, cfg.intermediate_layer_pairs)) / len(hidden_pairs)
    if lm_loss is not None and lm_loss.dim() > 0:
        lm_loss = _masked(lm_loss.float(), _mask_or_ones(loss_mask, lm_loss.shape, lm_loss)).loss
    total = balance(kl.loss, inter, lm_loss, skip_lm_loss=cfg.skip_lm_loss, kd_loss_scale=cfg.kd_loss_scale)
    zero = kl.loss.new_zeros(())
    return {"lm": zero if lm_loss is None else lm_loss, "logits": kl.loss,
            "intermediate": zero if inter is None else inter, "total": total, "num_tokens": kl.num_tokens}
