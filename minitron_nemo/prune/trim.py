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
    return plan


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


QK_NORMS = ("q_layernorm.weight", "k_layernorm.weight")
NORM_SUFFIXES = ("layernorm.weight", "layernorm.bias", "layer_norm_weight", "layer_norm_bias",
                 "post_norm.weight")  # post_norm: the sandwich norms (models/post_norm.py)


def slice_layer_tensor(mc: ModelConfig, name: str, t: torch.Tensor, plan: Plan, j: int) -> torch.Tensor:
    """Slice one full (TP-unsharded) tensor of old layer ``plan.layers[j]`` for new layer ``j``."""
    hid = plan.hidden
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
    if name.startswith("decoder.final_layernorm."):
        return t[plan.hidden]
    raise NotImplementedError(f"pruning does not know how to slice {name}")


# ----------------------------------------------------------------------------- TP / PP movement
def _layer_suffixes(model) -> List[str]:
    """Tensor names of a layer, experts excluded (``experts.fill_experts`` moves those)."""
    keys = model.decoder.layers[0].state_dict().keys()
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
    suffixes = _layer_suffixes(model)
    for j, i in enumerate(plan.layers):  # same order on every rank: collectives and p2p match up
        src, dst_stage = i // per_old, j // per_new
        if stage == src:
            for suf in suffixes:
                full = layout.gather_tp(mc, suf, old_sd[f"decoder.layers.{i - src * per_old}.{suf}"])
                piece = slice_layer_tensor(mc, suf, full, plan, j)
                piece = layout.shard_tensor(new_mc, suf, piece, tp_rank, tp).contiguous()
                if dst_stage == stage:
                    new_sd[f"decoder.layers.{j - stage * per_new}.{suf}"].copy_(piece)
                else:
                    dist.send(piece, dst=pp_ranks[dst_stage])
        elif stage == dst_stage:
            for suf in suffixes:
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
