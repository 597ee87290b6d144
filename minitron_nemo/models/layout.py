"""Tensor layout of a Megatron-Core GPT model: tensor-parallel sharding, vocab padding, and the names of
the fused-norm (Transformer Engine) spec.

The *canonical* layout is Megatron-Core's local-spec names at TP=1 (``checkpoint/hf.py``). A rank's
shard of a canonical tensor is cut along its TP dim:

* column-parallel (``COLUMN_PARALLEL``: QKV, ``linear_fc1``, embedding, output layer): rows; SwiGLU's
  ``linear_fc1 = [gate; up]`` shards gate and up separately, so each rank keeps ``[gate_r; up_r]``;
* row-parallel (``ROW_PARALLEL``: ``linear_proj``, ``linear_fc2``): columns;
* everything else (norms, biases of row-parallel linears, routers) is replicated.

Mamba-2 mixers (hybrid models, ``models/hybrid.py``) are cut per component, as Megatron-Core's mixer holds them:

* ``mixer.in_proj.weight`` rows ``[z | x | B | C | dt]``: each rank keeps ``[z_r | x_r | B_r | C_r | dt_r]`` (z, x by
  heads of head_dim, B, C by groups of state_dim, dt by heads); ``mixer.conv1d.weight/bias`` rows ``[x | B | C]``
  likewise;
* ``mixer.A_log``, ``mixer.D``, ``mixer.dt_bias`` by heads and ``mixer.norm.weight`` (the gated norm, per group)
  along dim 0; ``mixer.out_proj.weight`` row-parallel (columns);
* a Mamba layer's pre-norm (``norm.weight``) is replicated.

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
MAMBA_IN_PROJ = ("mixer.in_proj.weight",)  # z | x | B | C | dt
MAMBA_CONV = ("mixer.conv1d.weight", "mixer.conv1d.bias")  # x | B | C
MAMBA_BY_HEAD = ("mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.norm.weight")  # dim 0, whole heads / groups
COLUMN_PARALLEL = COLUMN_PARALLEL + MAMBA_IN_PROJ + MAMBA_CONV + MAMBA_BY_HEAD
ROW_PARALLEL = ROW_PARALLEL + ("mixer.out_proj.weight",)


def mamba_parts(mc: ModelConfig, name: str) -> list | None:
    """The row counts of the components a Mamba mixer tensor is cut by separately (None: not such a tensor)."""
    inner, bc = mc.mamba_num_heads * mc.mamba_head_dim, mc.mamba_num_groups * mc.mamba_state_dim
    if name.endswith(MAMBA_IN_PROJ):
        return [inner, inner, bc, bc, mc.mamba_num_heads]
    if name.endswith(MAMBA_CONV):
        return [inner, bc, bc]
    return None


def pad_vocab(mc: ModelConfig, w):
    """``w`` (``[V, ...]``) padded with zero rows to ``mc.padded_vocab_size``."""
    pad = mc.padded_vocab_size - w.shape[0]
    return torch.cat([w, w.new_zeros(pad, *w.shape[1:])]) if pad else w


def pack_qkv(mc: ModelConfig, q, k, v):
    """HF q/k/v (rows) -> Megatron fused rows, grouped per query group as [q_1..q_h, k, v]."""
    g, d = mc.num_query_groups, mc.head_dim
    hpg = mc.num_attention_heads // g
    rest = q.shape[1:]
    q = q.reshape(g, hpg * d, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(g * (hpg + 2) * d, *rest)


def unpack_qkv(mc: ModelConfig, qkv):
    """Inverse of ``pack_qkv``: ``(q, k, v)``."""
    g, d = mc.num_query_groups, mc.head_dim
    hpg = mc.num_attention_heads // g
    rest = qkv.shape[1:]
    x = qkv.reshape(g, (hpg + 2) * d, *rest)
    q, k, v = torch.split(x, [hpg * d, d, d], dim=1)
    return (q.reshape(g * hpg * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest))


# ----------------------------------------------------------------------------- tensor parallelism
def tp_sharded(name: str) -> bool:
    return name.endswith(COLUMN_PARALLEL) or name.endswith(ROW_PARALLEL)


def _whole(mc: ModelConfig, name: str) -> bool:
    return mc.experts_replicated_over_tp and moe.split_expert_name(name) is not None


def shard_tensor(mc: ModelConfig, name: str, t: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's slice of a canonical tensor (SwiGLU fc1 shards gate and up separately)."""
    if tp == 1 or _whole(mc, name):
        return t
    parts = mamba_parts(mc, name)
    if parts is not None:
        return torch.cat([torch.chunk(c, tp)[tp_rank] for c in torch.split(t, parts)])
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
    parts = mamba_parts(mc, name)
    if parts is not None:
        local = [torch.split(s, [n // len(shards) for n in parts]) for s in shards]
        return torch.cat([s[i] for i in range(len(parts)) for s in local])
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
    # not TE: Megatron-Core 0.19's Mamba mixer holds its convolution as parameters (0.16: a conv1d module);
    # its checkpoint key is conv1d.weight in both
    "mixer.conv1d.weight": "mixer.conv1d_weight",
    "mixer.conv1d.bias": "mixer.conv1d_bias",
}


def to_model_names(sd: dict, model_keys) -> dict:
    """Rename canonical (local-spec) keys to the keys of ``model`` (TE fuses norms into linears; ``TE_NAMES``)."""
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


def canonical_name(key: str) -> str:
    """A model's tensor name as the canonical (local-spec) one."""
    for a, b in TE_NAMES.items():
        if key.endswith(b):
            return key[: -len(b)] + a
    return key


def to_canonical_names(sd: dict) -> dict:
    """Rename a model's keys to canonical (local-spec) names; ``_extra_state`` entries are dropped."""
    return {canonical_name(k): v for k, v in sd.items() if not k.endswith("_extra_state")}
