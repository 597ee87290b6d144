"""Tensor layout of a Megatron-Core GPT model: tensor-parallel sharding, vocab padding, and the names of
the fused-norm (Transformer Engine) spec.

The *canonical* layout is Megatron-Core's local-spec names at TP=1 (``checkpoint/hf.py``). A rank's
shard of a canonical tensor is cut along its TP dim:

* column-parallel (``COLUMN_PARALLEL``: QKV, ``linear_fc1``, embedding, output layer): rows; SwiGLU's
  ``linear_fc1 = [gate; up]`` shards gate and up separately, so each rank keeps ``[gate_r; up_r]``;
* row-parallel (``ROW_PARALLEL``: ``linear_proj``, ``linear_fc2``): columns;
* everything else (norms, biases of row-parallel linears, routers) is replicated.

Experts use the same rules over the expert-TP group; biased experts (gpt-oss) are whole on every rank
(expert tensor parallelism 1, ``ModelConfig.experts_replicated_over_tp``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from minitron_nemo.models import moe
from minitron_nemo.models.config import ModelConfig

COLUMN_PARALLEL = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                   "core_attention.softmax_offset",  # attention sinks: one per head
                   "linear_fc1.weight", "linear_fc1.bias",
                   "embedding.word_embeddings.weight", "output_layer.weight")
ROW_PARALLEL = ("self_attention.linear_proj.weight", "linear_fc2.weight")
FC1 = ("linear_fc1.weight", "linear_fc1.bias")  # of the MLP and of every expert


def pad_vocab(mc: ModelConfig, w):
    """``w`` (``[V, ...]``) padded with zero rows to ``mc.padded_vocab_size``."""
    pad = mc.padded_vocab_size - w.shape[0]
    return torch.cat([w, w.new_zeros(pad, *w.shape[1:])]) if pad else w


# ----------------------------------------------------------------------------- tensor parallelism
def tp_sharded(name: str) -> bool:
    return name.endswith(COLUMN_PARALLEL) or name.endswith(ROW_PARALLEL)


def _whole(mc: ModelConfig, name: str) -> bool:
    return mc.experts_replicated_over_tp and moe.split_expert_name(name) is not None


def shard_tensor(mc: ModelConfig, name: str, t: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's slice of a canonical tensor (SwiGLU fc1 shards gate and up separately)."""
    if tp == 1 or _whole(mc, name):
        return t
    if name.endswith(FC1) and mc.gated:
        gate, up = torch.chunk(t, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp)[tp_rank], torch.chunk(up, tp)[tp_rank]])
    if name.endswith(COLUMN_PARALLEL):
        return torch.chunk(t, tp, dim=0)[tp_rank]
    if name.endswith(ROW_PARALLEL):
        return torch.chunk(t, tp, dim=1)[tp_rank]
    return t


def unshard_tensor(mc: ModelConfig, name: str, shards: list) -> torch.Tensor:
    """Inverse of ``shard_tensor`` given every TP rank's shard in rank order."""
    if len(shards) == 1 or _whole(mc, name):
        return shards[0]
    if name.endswith(FC1) and mc.gated:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    if name.endswith(COLUMN_PARALLEL):
        return torch.cat(shards, dim=0)
    if name.endswith(ROW_PARALLEL):
        return torch.cat(shards, dim=1)
    return shards[0]


def gather_tp(mc: ModelConfig, name: str, t: torch.Tensor, group=None) -> torch.Tensor:
    """The full tensor of a TP-sharded weight (all-gather over the TP group, or ``group``: experts use
    the expert-TP group); others pass through."""
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    tp = dist.get_world_size(group) if dist.is_initialized() else 1
    if tp == 1 or not tp_sharded(name):
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return unshard_tensor(mc, name, parts)


# ----------------------------------------------------------------------------- model <-> canonical names
TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def to_model_names(sd: dict, model_keys) -> dict:
    """Rename canonical (local-spec) keys to the keys of ``model`` (TE fuses norms into linears)."""
    keys = set(model_keys)
    out = {}
    for k, v in sd.items():
        if k not in keys:
            for a, b in TE_NAMES.items():
                if k.endswith(a) and k[: -len(a)] + b in keys:
                    k = k[: -len(a)] + b
                    break
        out[k] = v
    return out


def to_canonical_names(sd: dict) -> dict:
    """Rename a model's keys to canonical (local-spec) names; ``_extra_state`` entries are dropped."""
    out = {}
    for k, v in sd.items():
        if k.endswith("_extra_state"):
            continue
        for a, b in TE_NAMES.items():
            if k.endswith(b):
                k = k[: -len(b)] + a
                break
        out[k] = v
    return out
