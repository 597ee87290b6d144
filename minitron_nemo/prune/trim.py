"""Trimming: rank every axis from the (small, global) score vectors and slice the weights (SPEC §3).

``make_plan`` turns scores + a target ``ModelConfig`` into kept indices. Kept indices are stored in
ascending original order (the pruned model keeps the source's channel/neuron/head order), so a
pruned model equals the source with the dropped units masked to zero (tests check this).

* hidden: top ``H'`` channels of the summed norm scores; one permutation for the embedding, every
  norm and linear, the final norm and the output layer.
* query groups: top ``G'`` groups by their L2 score; within each kept group, its top ``h'`` query
  heads (every group keeps the same number of heads, and its K and V).
* MLP: top ``F'`` neurons of each layer; both SwiGLU halves (gate, up) use the same indices.
* layers: the kept old layers, in order.
* Mamba heads (hybrid models): within each of a layer's groups its top ``h'`` heads by their L2 score (every group
  keeps the same number, as query groups do), and in every kept head the layer's top ``d'`` head channels (one set
  for all heads, ranked by each channel's L2 over all heads); ``in_proj`` keeps the kept channels' z and x rows, the
  kept heads' dt rows and every B, C row, the convolution the kept x channels and every B, C channel, ``A_log``,
  ``D``, ``dt_bias`` the kept heads, the gated norm and ``out_proj`` the kept channels. The gated norm normalises
  over a group's channels, so a pruned group's RMS is taken over its kept channels only (the masked model of the
  tests re-scales it).
* experts (MoE): top ``E'`` experts of each layer by the chosen expert score, and within each kept expert
  its top ``F'`` neurons; the router keeps the kept experts' rows (``prune/experts.py``). A shared expert
  keeps the top ``F_shared'`` neurons of its layer like a dense MLP; its gate keeps the hidden channels.

``trim_model`` fills a freshly built smaller model on every rank from this rank's old shard without
gathering the model: hidden slicing is local (hidden is never TP-sharded); for head / group / neuron
slicing each TP-sharded weight is all-gathered along its TP dim ONE tensor at a time, sliced and
re-sharded (peak extra memory: one layer's full tensor). When depth pruning moves a layer to another
pipeline stage, its new shard is sent point-to-point to the same TP rank of the new stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from minitron_nemo.models import layout
from minitron_nemo.models.builder import build_model
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.prune import experts as moe_prune
from minitron_nemo.prune.scores import top_k


@dataclass
class Plan:
    hidden: torch.Tensor  # [H'] kept hidden channels
    layers: List[int]  # old (0-indexed) layer of each new layer
    ffn: List[torch.Tensor]  # per new layer: kept neurons of its old layer
    groups: List[torch.Tensor]  # per new layer: kept query groups
    heads: List[torch.Tensor]  # per new layer: [G', h'] kept heads (index within their group)
    experts: List[torch.Tensor] = field(default_factory=list)  # MoE, per new layer: kept experts [E']
    expert_ffn: List[torch.Tensor] = field(default_factory=list)  # MoE, per new layer: [E', F'] kept neurons
    shared_ffn: List[torch.Tensor] = field(default_factory=list)  # shared expert, per new layer: kept neurons
    mamba_heads: List[torch.Tensor] = field(default_factory=list)  # hybrid, per new layer: kept Mamba heads (global)
    mamba_dims: List[torch.Tensor] = field(default_factory=list)  # hybrid, per new layer: kept channels of each head


def make_plan(mc: ModelConfig, new_mc: ModelConfig, scores: dict, layers: List[int],
              expert_score: str = "routed_l2") -> Plan:
    """Kept indices of every axis for the pruned config ``new_mc``; ``layers`` are the kept old layers;
    experts are ranked by ``expert_<expert_score>``."""
    G, hpg = mc.num_query_groups, mc.num_attention_heads // mc.num_query_groups
    new_hpg = new_mc.num_attention_heads // new_mc.num_query_groups
    ffn, groups, heads = [], [], []
    for i in layers:
        ffn.append(top_k(scores["ffn"][i], new_mc.ffn_hidden_size))
        g = top_k(scores["groups"][i], new_mc.num_query_groups)
        head_scores = scores["heads"][i].view(G, hpg)
        groups.append(g)
        heads.append(torch.stack([top_k(head_scores[j], new_hpg) for j in g.tolist()]))
    plan = Plan(hidden=top_k(scores["hidden"], new_mc.hidden_size), layers=list(layers), ffn=ffn,
                groups=groups, heads=heads)
    if mc.is_moe:
        plan.experts, plan.expert_ffn = moe_prune.plan_experts(scores, layers, new_mc.num_moe_experts,
                                                               new_mc.moe_ffn_hidden_size, expert_score)
    if mc.moe_shared_expert_intermediate_size:
        plan.shared_ffn = [top_k(scores["shared_ffn"][i], new_mc.moe_shared_expert_intermediate_size)
                           for i in layers]
    if mc.is_hybrid:
        plan.mamba_heads = [mamba_heads_kept(mc, new_mc, scores["mamba_heads"][i]) for i in layers]
        plan.mamba_dims = [top_k(scores["mamba_head_dim"][i], new_mc.mamba_head_dim) for i in layers]
    return plan


def mamba_heads_kept(mc: ModelConfig, new_mc: ModelConfig, scores: torch.Tensor) -> torch.Tensor:
    """The kept Mamba heads of one layer (global indices, ascending): each group's top ``new / groups`` heads."""
    G = mc.mamba_num_groups
    hpg, new_hpg = mc.mamba_num_heads // G, new_mc.mamba_num_heads // G
    per_group = scores.view(G, hpg)
    return torch.cat([g * hpg + top_k(per_group[g], new_hpg) for g in range(G)])


# ----------------------------------------------------------------------------- index helpers
def _span(start: int, d: int) -> torch.Tensor:
    return torch.arange(start, start + d)


def qkv_rows(mc: ModelConfig, groups, heads) -> torch.Tensor:
    """Rows of the fused QKV weight (per group ``[q_1..q_h, k, v]``) for the kept groups/heads."""
    d, hpg = mc.head_dim, mc.num_attention_heads // mc.num_query_groups
    rows = []
    for g, hs in zip(groups.tolist(), heads.tolist()):
        base = g * (hpg + 2) * d
        rows += [_span(base + h * d, d) for h in hs]
        rows += [_span(base + hpg * d, d), _span(base + (hpg + 1) * d, d)]
    return torch.cat(rows)


def proj_cols(mc: ModelConfig, groups, heads) -> torch.Tensor:
    """Input columns of ``linear_proj`` (head-major, heads of a group contiguous) for the kept heads."""
    d, hpg = mc.head_dim, mc.num_attention_heads // mc.num_query_groups
    return torch.cat([_span((g * hpg + h) * d, d) for g, hs in zip(groups.tolist(), heads.tolist()) for h in hs])


def fc1_rows(mc: ModelConfig, ffn_idx: torch.Tensor) -> torch.Tensor:
    if mc.gated:  # [gate; up], both halves with the same neurons
        return torch.cat([ffn_idx, ffn_idx + mc.ffn_hidden_size])
    return ffn_idx


def mamba_channels(mc: ModelConfig, heads: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """The channels (x, z, the gated norm, ``out_proj``'s input; head-major) of the kept Mamba ``heads``, each with its
    kept channels ``dims``."""
    return (heads[:, None] * mc.mamba_head_dim + dims[None, :]).reshape(-1)


def mamba_rows(mc: ModelConfig, name: str, heads: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """Rows of a Mamba mixer tensor (canonical name, TP-unsharded) that the kept ``heads`` keep: ``in_proj``
    ``[z | x | B | C | dt]``, the convolution ``[x | B | C]`` (B and C whole: groups are kept), ``A_log`` /
    ``dt_bias`` / ``D`` per head (``D`` per channel when it has one per channel), the gated norm per channel."""
    inner, bc = mc.mamba_num_heads * mc.mamba_head_dim, mc.mamba_num_groups * mc.mamba_state_dim
    ch = mamba_channels(mc, heads, dims)
    if name.endswith("mixer.in_proj.weight"):
        return torch.cat([ch, inner + ch, _span(2 * inner, 2 * bc), 2 * inner + 2 * bc + heads])
    if name.endswith(("mixer.conv1d.weight", "mixer.conv1d.bias")):
        return torch.cat([ch, _span(inner, 2 * bc)])
    if name.endswith("mixer.norm.weight"):
        return ch
    return heads  # A_log, dt_bias, D (per head)


MAMBA_MIXER = ("mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.A_log", "mixer.D",
               "mixer.dt_bias", "mixer.norm.weight")
QK_NORMS = ("q_layernorm.weight", "k_layernorm.weight")
NORM_SUFFIXES = ("layernorm.weight", "layernorm.bias", "layer_norm_weight", "layer_norm_bias",
                 "post_norm.weight")  # post_norm: the sandwich norms (models/post_norm.py)


def slice_layer_tensor(mc: ModelConfig, name: str, t: torch.Tensor, plan: Plan, j: int) -> torch.Tensor:
    """Slice one full (TP-unsharded) tensor of old layer ``plan.layers[j]`` for new layer ``j``."""
    hid = plan.hidden
    if name.endswith(MAMBA_MIXER):  # a hybrid model's Mamba layer
        heads, dims = plan.mamba_heads[j], plan.mamba_dims[j]
        if name.endswith("mixer.D") and t.shape[0] != mc.mamba_num_heads:  # D per channel
            return t[mamba_channels(mc, heads, dims)]
        rows = t[mamba_rows(mc, name, heads, dims)]
        return rows[:, hid] if name.endswith("mixer.in_proj.weight") else rows
    if name.endswith("mixer.out_proj.weight"):
        return t[hid][:, mamba_channels(mc, plan.mamba_heads[j], plan.mamba_dims[j])]
    if name == "norm.weight":  # a Mamba layer's pre-norm
        return t[hid]
    if ".shared_experts." in f".{name}":
        return moe_prune.slice_shared_expert_tensor(mc, name, t, hid, plan.shared_ffn[j])
    if name.endswith(QK_NORMS):
        # Qwen3's query/key RMSNorm: one [head_dim] weight that every head of the layer shares. Head and
        # group pruning drop whole heads and hidden pruning never touches head_dim, so the kept heads
        # keep using the same weight unchanged.
        return t
    if name.endswith(NORM_SUFFIXES) or name.endswith(("linear_proj.bias", "linear_fc2.bias")):
        return t[hid]
    if name.endswith("linear_qkv.weight"):
        return t[qkv_rows(mc, plan.groups[j], plan.heads[j])][:, hid]
    if name.endswith("linear_qkv.bias"):
        return t[qkv_rows(mc, plan.groups[j], plan.heads[j])]
    if name.endswith("linear_proj.weight"):
        return t[hid][:, proj_cols(mc, plan.groups[j], plan.heads[j])]
    if name.endswith("linear_fc1.weight"):
        return t[fc1_rows(mc, plan.ffn[j])][:, hid]
    if name.endswith("linear_fc1.bias"):
        return t[fc1_rows(mc, plan.ffn[j])]
    if name.endswith("linear_fc2.weight"):
        return t[hid][:, plan.ffn[j]]
    if name.endswith("mlp.router.weight"):
        return t[plan.experts[j]][:, hid]
    if name.endswith("mlp.router.bias"):
        return t[plan.experts[j]]
    if name.endswith("core_attention.softmax_offset"):  # attention sinks: the kept heads' own
        hpg = mc.num_attention_heads // mc.num_query_groups
        return t[torch.cat([g * hpg + hs for g, hs in zip(plan.groups[j].tolist(), plan.heads[j])])]
    raise NotImplementedError(f"pruning does not know how to slice {name}")


def slice_global_tensor(name: str, t: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Embedding / output layer (``[V/TP, H]``) and the final norm: hidden slicing only (local)."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return t[:, plan.hidden]
    if name.startswith(("decoder.final_layernorm.", "decoder.final_norm.")):  # final_norm: hybrid models
        return t[plan.hidden]
    raise NotImplementedError(f"pruning does not know how to slice {name}")


# ----------------------------------------------------------------------------- TP / PP movement
def _layer_suffixes(layer) -> List[str]:
    """Tensor names of ``layer`` (a hybrid model's Mamba, attention and MLP layers differ), experts excluded
    (``experts.fill_experts`` moves those)."""
    keys = layer.state_dict().keys()
    return sorted(k for k in keys if not k.endswith("_extra_state") and ".experts." not in f".{k}")


@torch.no_grad()
def fill_pruned(model, mc: ModelConfig, new_model, new_mc: ModelConfig, plan: Plan) -> None:
    """Copy the kept slices of ``model`` (this rank's shard) into ``new_model`` (this rank's shard)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    pp_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()) \
        if dist.is_initialized() else [0]
    old_sd, new_sd = model.state_dict(), new_model.state_dict()
    for k, dst in new_sd.items():
        if k.startswith("decoder.layers.") or k.endswith("_extra_state") or not isinstance(dst, torch.Tensor):
            continue
        dst.copy_(slice_global_tensor(k, old_sd[k], plan))
    per_old, per_new = mc.num_layers // pp, new_mc.num_layers // pp
    for j, i in enumerate(plan.layers):  # same order on every rank: collectives and p2p match up
        src, dst_stage = i // per_old, j // per_new
        if stage == src:
            for suf in _layer_suffixes(model.decoder.layers[i - src * per_old]):
                name = layout.canonical_name(suf)  # Megatron-Core 0.19's mixer.conv1d_weight is conv1d.weight
                full = layout.gather_tp(mc, name, old_sd[f"decoder.layers.{i - src * per_old}.{suf}"])
                piece = slice_layer_tensor(mc, name, full, plan, j)
                piece = layout.shard_tensor(new_mc, name, piece, tp_rank, tp).contiguous()
                if dst_stage == stage:
                    new_sd[f"decoder.layers.{j - stage * per_new}.{suf}"].copy_(piece)
                else:
                    dist.send(piece, dst=pp_ranks[dst_stage])
        elif stage == dst_stage:  # the new layer has the old one's tensors
            for suf in _layer_suffixes(new_model.decoder.layers[j - stage * per_new]):
                buf = new_sd[f"decoder.layers.{j - stage * per_new}.{suf}"]
                tmp = torch.empty_like(buf)
                dist.recv(tmp, src=pp_ranks[src])
                buf.copy_(tmp)
    if mc.is_moe:
        moe_prune.fill_experts(old_sd, new_sd, mc, new_mc, plan, per_old, per_new)


def trim_model(model, mc: ModelConfig, new_mc: ModelConfig, plan: Plan, params_dtype=None):
    """Build this rank's shard of the pruned model and fill it from ``model``."""
    dtype = params_dtype or next(model.parameters()).dtype
    new_model = build_model(new_mc, params_dtype=dtype)
    fill_pruned(model, mc, new_model, new_mc, plan)
    return new_model
