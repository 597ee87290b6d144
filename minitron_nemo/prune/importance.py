"""Activation-based importance of every prunable axis (SPEC §2), at any TP x PP x DP.

All width axes and Block Importance are scored in ONE forward-only pass over the calibration
batches, by hooks that read Megatron activations (layout ``[seq, batch, channel]``):

  axis              hook point                                          score
  ----------------  --------------------------------------------------  ----------------------------
  MLP neurons       input of ``mlp.linear_fc2`` (after the activation,   agg(x) per neuron
                    SwiGLU: silu(gate) * up; we follow the reference
                    code, not P1's pre-activation formula)
  attention heads   input of ``self_attention.linear_proj``             L2 over head_dim of agg(x)
                    (concatenated head outputs, [heads, head_dim])       per channel
  query groups      same                                                L2 over all channels of the
                                                                        group's query heads
  Mamba heads       input of ``mixer.out_proj`` in a hybrid model's      L2 over head_dim of agg(x)
                    Mamba layers (gated-norm output, [heads, head_dim])  per channel
  Mamba head dim    same                                                L2 over all heads of agg(x)
                                                                        per channel, per head channel
  hidden channels   output of ``input_layernorm`` and                   agg(x) per norm, then summed
                    ``pre_mlp_layernorm`` of every layer (under TE: the  over norms, layers and
                    fused norm, recomputed from the input of             pipeline stages
                    ``linear_qkv`` / ``linear_fc1``); with sandwich
                    norms (Gemma 3) also the norms after the
                    attention and the MLP (``post_norm``); a hybrid
                    model's Mamba layers: their pre-norm (``norm``)
  layers (a)        layer input / output hidden states                  BI = 1 - mean_tokens cos
  layers (b)        LM loss with layer i skipped (identity)             loss_i - loss_full
                    (``prune/depth.py``)
  layers (c)        LM loss with a contiguous block of k layers skipped  loss of the block-removed model
                    (``prune/depth.py``)
  experts, expert   router and expert MLPs of MoE layers                 see ``prune/experts.py``
  FFN neurons
  shared-expert     input of ``mlp.shared_experts.linear_fc2`` (before   agg(x) per neuron, as MLP
  neurons           the shared-expert gate scales the output)            neurons

``agg`` = sequence reduction, then batch reduction (``Aggregation``). Per sample b and channel c the
sequence reduction gives ``v[b, c]``: mean -> mean_s |x|, l2 -> sqrt(sum_s x^2), var -> var_s x
(population variance of the signed value). The batch reduction over all calibration samples (all
micro-batches and data-parallel ranks) keeps n, sum v and sum v^2 in fp64:
l2 -> sqrt(sum v^2), mean -> sum v / n, var -> sum v^2 / n - (sum v / n)^2. Default (l2, mean) is
``imp[c] = sqrt(sum_b (mean_s |x[s, b, c]|)^2)``.

Parallel assembly: accumulators are summed over DP ranks before finalising; TP-sharded axes (heads,
groups, neurons) are all-gathered along the channel dim into global order; per-layer scores are
concatenated over PP stages; hidden-channel scores (replicated over TP) are summed over stages.
The (b)/(c) criteria (``prune/depth.py``) need one extra forward pass per candidate layer/block; they run
only on request, on the first ``num_samples`` calibration samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from minitron_nemo import runtime
from minitron_nemo.errors import UserError
from minitron_nemo.models.forward import run_forward
from minitron_nemo.models.hybrid import is_mamba_layer
from minitron_nemo.prune import experts as moe_imp
from minitron_nemo.prune.scores import all_gather_along, all_reduce_over

REDUCTIONS = ("l2", "mean", "var")


@dataclass
class Aggregation:
    batch: str = "l2"  # over calibration samples: l2 | mean | var
    seq: str = "mean"  # over the sequence of one sample: mean | l2 | var

    def __post_init__(self):
        for name in ("batch", "seq"):
            if getattr(self, name) not in REDUCTIONS:
                raise UserError(f"prune.importance.{name}_agg={getattr(self, name)!r}; "
                                f"allowed: {', '.join(REDUCTIONS)}")


def seq_reduce(x: torch.Tensor, how: str) -> torch.Tensor:
    """``[s, b, c]`` -> per-sample ``[b, c]`` in fp32. (Plain elementwise + ``sum(0)``: on CPU this is
    ~10x faster than ``vector_norm(dim=0)`` / ``var(dim=0)``.)"""
    x = x.float()
    if how == "mean":
        return x.abs().sum(0) / x.shape[0]
    if how == "l2":
        return x.square().sum(0).sqrt()
    return (x - x.mean(0)).square().mean(0)  # two-pass population variance


def batch_finalize(s1: torch.Tensor, s2: torch.Tensor, n: float, how: str) -> torch.Tensor:
    """Batch reduction from the sums of v and v^2 over n samples."""
    if how == "l2":
        return s2.sqrt()
    mean = s1 / n
    return mean if how == "mean" else (s2 / n - mean * mean).clamp_min(0.0)


def aggregate(x: torch.Tensor, agg: Aggregation) -> torch.Tensor:
    """Reference (single-tensor) aggregation of ``[s, b, c]`` activations: ``[c]`` scores."""
    v = seq_reduce(x, agg.seq).double()
    return batch_finalize(v.sum(0), (v * v).sum(0), v.shape[0], agg.batch)


# ----------------------------------------------------------------------------- hooks
def _attn_proj(layer):
    """The attention output projection of ``layer`` (None: a Mamba layer, or a hybrid model's MLP layer)."""
    return getattr(getattr(layer, "self_attention", None), "linear_proj", None)


def _fused_norm(linear, x):
    """Output of the norm that Transformer Engine fuses into ``linear`` (LayerNormColumnParallelLinear)."""
    cfg = linear.config
    w = linear.layer_norm_weight
    if getattr(linear, "zero_centered_gamma", cfg.layernorm_zero_centered_gamma):
        w = w + 1
    if cfg.normalization == "RMSNorm":
        return F.rms_norm(x, (x.shape[-1],), w, cfg.layernorm_epsilon)
    return F.layer_norm(x, (x.shape[-1],), w, getattr(linear, "layer_norm_bias", None), cfg.layernorm_epsilon)


class Collector:
    """Forward hooks that accumulate the width statistics and Block Importance of this rank's layers."""

    def __init__(self, model, agg: Aggregation):
        self.agg = agg
        self.layers = list(model.decoder.layers)
        cfg = model.config
        tp = parallel_state.get_tensor_model_parallel_world_size()
        n = len(self.layers)
        z = lambda *shape: torch.zeros(2, n, *shape, dtype=torch.float64, device=runtime.device())  # noqa: E731
        proj0 = next((p for p in map(_attn_proj, self.layers) if p is not None), None)
        post = hasattr(proj0, "post_norm")  # models/post_norm.py
        self.hidden = z(4 if post else 2, cfg.hidden_size)  # [s1|s2, layer, norm, H]
        self.proj = z(cfg.num_attention_heads // tp * cfg.kv_channels)
        self.ffn = z(cfg.ffn_hidden_size // tp)
        shared = cfg.moe_shared_expert_intermediate_size
        self.shared = z(shared // tp) if shared else None
        # hybrid models (models/hybrid.py): the input of each Mamba mixer's out_proj, [heads_local * head_dim]
        # (from the config: a pipeline stage without Mamba layers still takes part in the gather)
        self.hybrid = getattr(cfg, "mamba_num_heads", None) is not None
        self.mamba = z(cfg.mamba_num_heads // tp * cfg.mamba_head_dim) if self.hybrid else None
        self.bi = torch.zeros(2, n, dtype=torch.float64, device=runtime.device())  # [sum cos, tokens]
        self.handles = []
        # MoE layers: the experts' own collector; their pre-MLP norm is hooked below like a dense one
        # (never fused into a linear: the router and the experts both read it).
        self.experts = moe_imp.ExpertCollector(model) if not self.hybrid and moe_imp.is_moe_layer(self.layers[0]) \
            else None
        for i, layer in enumerate(self.layers):
            if is_mamba_layer(layer):  # a Mamba layer: its pre-norm joins the hidden score; heads from out_proj's input
                self.handles.append(layer.norm.register_forward_hook(self._norm_hook(i, 0)))
                self.handles.append(layer.mixer.out_proj.register_forward_pre_hook(self._input_hook(self.mamba, i)))
                self.handles.append(layer.register_forward_hook(self._bi_hook(i), with_kwargs=True))
                continue
            attn, mlp = layer.self_attention, layer.mlp
            proj, fc2 = _attn_proj(layer), getattr(mlp, "linear_fc2", None)
            # a hybrid model's attention layer has no MLP and its MLP layer no attention (IdentityOp)
            norms = [(layer.input_layernorm, getattr(attn, "linear_qkv", None)) if proj is not None else None,
                     (layer.pre_mlp_layernorm, getattr(mlp, "linear_fc1", None))
                     if fc2 is not None or self.experts is not None else None]
            if post:
                norms += [(proj.post_norm, None), (fc2.post_norm, None)]
            for k, nf in enumerate(norms):
                if nf is None:
                    continue
                norm, fused = nf
                if hasattr(fused, "layer_norm_weight"):  # TE: norm fused into the next linear
                    self.handles.append(fused.register_forward_pre_hook(self._fused_hook(i, k)))
                else:
                    self.handles.append(norm.register_forward_hook(self._norm_hook(i, k)))
            if proj is not None:
                self.handles.append(proj.register_forward_pre_hook(self._input_hook(self.proj, i)))
            if self.experts is None:
                if fc2 is not None:
                    self.handles.append(fc2.register_forward_pre_hook(self._input_hook(self.ffn, i)))
            elif self.shared is not None:
                fc2 = mlp.shared_experts.linear_fc2
                self.handles.append(fc2.register_forward_pre_hook(self._input_hook(self.shared, i)))
            self.handles.append(layer.register_forward_hook(self._bi_hook(i), with_kwargs=True))

    def _add(self, acc, idx, x):
        v = seq_reduce(x.detach(), self.agg.seq)  # [b, c]
        acc[(0, *idx)] += v.sum(0)
        acc[(1, *idx)] += (v * v).sum(0)

    def _norm_hook(self, i, k):
        return lambda mod, args, out: self._add(self.hidden, (i, k), out)

    def _fused_hook(self, i, k):
        return lambda mod, args: self._add(self.hidden, (i, k), _fused_norm(mod, args[0].detach()))

    def _input_hook(self, acc, i):
        return lambda mod, args: self._add(acc, (i,), args[0])

    def _bi_hook(self, i):
        def hook(mod, args, kwargs, out):
            h_in = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().float()
            h_out = (out if torch.is_tensor(out) else out[0]).detach().float()  # a Mamba layer returns a tensor
            norms = torch.linalg.vector_norm(h_in, dim=-1) * torch.linalg.vector_norm(h_out, dim=-1)
            cos = torch.linalg.vecdot(h_in, h_out, dim=-1) / norms.clamp_min(1e-8)
            self.bi[0, i] += cos.sum()
            self.bi[1, i] += cos.numel()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.experts is not None:
            self.experts.remove()


# ----------------------------------------------------------------------------- parallel assembly
def _finalize(c: Collector, n: float, cfg) -> dict:
    """DP-reduce the sums, finalise, gather TP shards and PP stages: global fp32 scores."""
    dp, tp_g, pp_g = (parallel_state.get_data_parallel_group(), parallel_state.get_tensor_model_parallel_group(),
                      parallel_state.get_pipeline_model_parallel_group())
    how = c.agg.batch
    for acc in (c.hidden, c.proj, c.ffn, c.bi):
        all_reduce_over(acc, dp)
    hidden = batch_finalize(c.hidden[0], c.hidden[1], n, how)  # [Ll, 2, H]
    proj = batch_finalize(c.proj[0], c.proj[1], n, how)  # [Ll, heads_local * d]
    ffn = batch_finalize(c.ffn[0], c.ffn[1], n, how)
    Ll, d = proj.shape[0], cfg.kv_channels
    hpg = cfg.num_attention_heads // cfg.num_query_groups
    heads = proj.view(Ll, -1, d).norm(dim=-1)  # [Ll, heads_local]
    groups = proj.view(Ll, -1, hpg * d).norm(dim=-1)  # [Ll, groups_local]
    heads, groups, ffn = (all_gather_along(t, tp_g, dim=1) for t in (heads, groups, ffn))
    bi = 1.0 - c.bi[0] / c.bi[1].clamp_min(1)
    per_layer = {"hidden_per_layer": hidden.sum(1), "heads": heads, "groups": groups, "ffn": ffn, "layer_bi": bi}
    if c.mamba is not None:  # Mamba heads: L2 over each head's head_dim channels, as attention heads
        all_reduce_over(c.mamba, dp)
        m = all_gather_along(batch_finalize(c.mamba[0], c.mamba[1], n, how), tp_g, dim=1)  # [Ll, heads * d]
        m = m.view(Ll, -1, cfg.mamba_head_dim)
        per_layer["mamba_heads"] = m.norm(dim=-1)  # [Ll, heads]
        per_layer["mamba_head_dim"] = m.norm(dim=1)  # [Ll, d]: each channel's L2 over every head
    if c.shared is not None:
        all_reduce_over(c.shared, dp)
        per_layer["shared_ffn"] = all_gather_along(batch_finalize(c.shared[0], c.shared[1], n, how), tp_g, dim=1)
    out = {k: all_gather_along(v, pp_g, dim=0).float().cpu() for k, v in per_layer.items()}
    out["hidden"] = all_reduce_over(hidden.sum((0, 1)), pp_g).float().cpu()
    if c.experts is not None:
        out.update(moe_imp.finalize(c.experts))
    return out


# ----------------------------------------------------------------------------- the calibration pass
def _num_samples(batches) -> float:
    t = torch.tensor([float(sum(b["tokens"].shape[0] for b in batches))], dtype=torch.float64,
                     device=runtime.device())
    return float(all_reduce_over(t, parallel_state.get_data_parallel_group()).item())


def _chunks(batches, pp: int):
    size = max(2 * pp, len(batches) // 20, 1)
    return [batches[i:i + size] for i in range(0, len(batches), size)]


def run_with_progress(model, batches, label="calibration", on_output=None, progress=True):
    """Forward-only pass over ``batches`` in chunks, printing samples/s and ETA (rank 0)."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    total = sum(b["tokens"].shape[0] for b in batches) * dp
    done, t0 = 0, time.perf_counter()
    for chunk in _chunks(batches, pp):
        run_forward(model, chunk, on_output or (lambda out, b: None))
        done += sum(b["tokens"].shape[0] for b in chunk) * dp
        if progress:
            dt = time.perf_counter() - t0
            rate = done / max(dt, 1e-9)
            runtime.print0(f"[{label}] {done}/{total} samples  {rate:.2f} samples/s  "
                           f"ETA {(total - done) / max(rate, 1e-9):.0f}s")


def estimate(model, batches, agg: Aggregation | None = None, *, progress=True) -> dict:
    """One forward-only pass: width scores and Block Importance, identical on every rank.

    Returns fp32 CPU tensors: ``hidden [H]``, ``hidden_per_layer [L, H]``, ``heads [L, heads]``,
    ``groups [L, groups]``, ``ffn [L, ffn]``, ``layer_bi [L]`` (global layer order); MoE models also
    ``expert_<score> [L, E]`` for each of ``experts.EXPERT_SCORES`` and ``expert_ffn [L, E, F]``, and
    with a shared expert ``shared_ffn [L, F_shared]``; hybrid models also ``mamba_heads [L, mamba_heads]`` (the L2
    over head_dim of each Mamba mixer's ``out_proj`` input, as attention heads) and ``mamba_head_dim
    [L, mamba_head_dim]`` (each head channel's L2 over all heads). The rows of layers without the
    part (a hybrid model's Mamba, attention or MLP layers) are zero.
    """
    agg = agg or Aggregation()
    c = Collector(model, agg)
    try:
        run_with_progress(model, batches, progress=progress)
    finally:
        c.remove()
    return _finalize(c, _num_samples(batches), model.config)


__all__ = ["Aggregation", "aggregate", "seq_reduce", "batch_finalize", "Collector", "estimate",
           "run_with_progress"]
