"""Nemotron-H (``NemotronHForCausalLM``, ``model_type: nemotron_h``): ``config.json`` and weights <-> ``ModelConfig`` and
canonical tensors of the hybrid model (``models/hybrid.py``).

Nemotron-H stacks residual blocks of one kind each, every one ``x + mixer(RMSNorm(x))``: Mamba-2 mixers,
attention without RoPE or biases, and relu^2 MLPs without a gate. transformers 5 lists the kinds in
``layers_block_type`` (``linear_attention``, ``full_attention``, ``mlp``, ``moe``; the legacy ``mamba`` /
``attention``); older configs write Megatron-Core's ``hybrid_override_pattern`` (``M``, ``*``, ``-``, ``E``), which is
``ModelConfig.hybrid_pattern``. Mixture-of-experts layers (``moe`` / ``E``) and multi-token prediction are
one-line refusals for now.

The weights are named as transformers saves them and the released checkpoints hold them, under ``backbone.``
(transformers renames that prefix to ``model.`` when loading). Every block's mixer keeps its names under
``backbone.layers.{i}.mixer.``; canonical names per kind:
* Mamba: ``norm.weight`` -> ``decoder.layers.{i}.norm.weight``; ``in_proj`` (rows ``z | x | B | C | dt`` in both),
  ``conv1d`` (rows ``x | B | C``), ``dt_bias``, ``A_log``, ``D``, ``norm`` (the gated RMSNorm) and ``out_proj`` keep
  their names under ``decoder.layers.{i}.mixer.``;
* attention: ``norm`` -> ``input_layernorm``, ``q_proj/k_proj/v_proj`` -> the fused ``self_attention.linear_qkv``
  per query group, ``o_proj`` -> ``self_attention.linear_proj``;
* MLP: ``norm`` -> ``pre_mlp_layernorm``, ``up_proj`` -> ``mlp.linear_fc1``, ``down_proj`` -> ``mlp.linear_fc2``;
* ``backbone.embeddings`` -> ``embedding.word_embeddings``, ``backbone.norm_f`` -> ``decoder.final_norm``, ``lm_head`` ->
  ``output_layer``.

transformers clamps the SSM step at ``time_step_min`` (its mixer ignores ``time_step_limit``): that is
``ModelConfig.mamba_dt_min``, which the hybrid model's mixer applies too. Megatron-Core's gated RMSNorm has a
fixed epsilon of 1e-5, so ``layer_norm_epsilon`` (every norm's, the gated one's too) must be 1e-5.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from minitron_nemo.checkpoint.hf_fields import shape_fields
from minitron_nemo.errors import UserError
from minitron_nemo.models import layout
from minitron_nemo.models.config import ModelConfig

ARCH = "NemotronHForCausalLM"
MODEL_TYPE = "nemotron_h"
KIND_TO_SYMBOL = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*", "mlp": "-",
                  "moe": "E"}
SYMBOL_TO_KIND = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
MAMBA_NORM_EPS = 1e-5  # Megatron-Core's MambaMixer builds its gated RMSNorm with this epsilon
MAMBA_TENSORS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                 "out_proj.weight")


def _pattern(hf: dict) -> str:
    kinds = hf.get("layers_block_type") or hf.get("layer_types")
    if kinds is None:
        pattern = hf.get("hybrid_override_pattern")
        if not isinstance(pattern, str):
            raise UserError(f"layers_block_type / hybrid_override_pattern missing from the {ARCH} config; allowed: a "
                            f"list of layer kinds or a pattern of M, *, -")
        kinds = [SYMBOL_TO_KIND.get(c, c) for c in pattern]
    bad = [k for k in kinds if k not in KIND_TO_SYMBOL and k not in SYMBOL_TO_KIND]
    if bad:
        raise UserError(f"layers_block_type has {bad[0]!r}; allowed: {', '.join(KIND_TO_SYMBOL)}")
    pattern = "".join(KIND_TO_SYMBOL.get(k, k) for k in kinds)
    if "E" in pattern:
        raise UserError(f"layers_block_type has 'moe' (hybrid pattern {pattern!r}): {ARCH}'s mixture-of-experts layers "
                        f"are not supported yet; allowed: linear_attention, full_attention, mlp")
    return pattern


def _refuse(hf: dict, key: str, default, allowed, why: str = "") -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise UserError(f"{key}={value!r} is not supported for {ARCH}{why}; allowed: "
                        f"{', '.join(map(repr, allowed))}")


def model_config(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of a Nemotron-H ``config.json``; what Megatron-Core cannot express is one line."""
    pattern = _pattern(hf)
    _refuse(hf, "mamba_hidden_act", "silu", ("silu",))
    _refuse(hf, "mlp_hidden_act", "relu2", ("relu2",))
    _refuse(hf, "use_bias", False, (False,), " (biases on the Mamba projections)")
    _refuse(hf, "mlp_bias", False, (False,))
    _refuse(hf, "use_conv_bias", True, (True,))
    _refuse(hf, "num_nextn_predict_layers", 0, (0, None), " (multi-token prediction)")
    eps = float(hf.get("layer_norm_epsilon", 1e-5))
    if eps != MAMBA_NORM_EPS:
        raise UserError(f"layer_norm_epsilon={eps} is not supported for {ARCH}: Megatron-Core's Mamba gated norm uses "
                        f"{MAMBA_NORM_EPS}; allowed: {MAMBA_NORM_EPS}")
    dt_min = float(hf.get("time_step_min", 0.001))
    return ModelConfig(
        family="nemotron_h",
        num_layers=len(pattern),
        **shape_fields(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        normalization="RMSNorm",
        norm_epsilon=eps,
        activation="squared_relu",
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        hybrid_pattern=pattern,
        mamba_num_heads=hf["mamba_num_heads"],
        mamba_head_dim=hf["mamba_head_dim"],
        mamba_num_groups=hf.get("n_groups", 8),
        mamba_state_dim=hf.get("ssm_state_size", 128),
        mamba_conv_kernel=hf.get("conv_kernel", 4),
        mamba_chunk_size=hf.get("chunk_size", 128),
        mamba_dt_min=dt_min,
    ).validate()


def hf_config(mc: ModelConfig) -> dict:
    """The Nemotron-H fields of ``config.json`` (beyond hf.py's shape fields)."""
    if mc.norm_epsilon != MAMBA_NORM_EPS:
        raise UserError(f"model.norm_epsilon={mc.norm_epsilon} cannot be written as {ARCH}: transformers uses it for "
                        f"the Mamba gated norm too, Megatron-Core {MAMBA_NORM_EPS}; allowed: {MAMBA_NORM_EPS}")
    return {"layers_block_type": [SYMBOL_TO_KIND[c] for c in mc.hybrid_pattern],
            "mamba_num_heads": mc.mamba_num_heads, "mamba_head_dim": mc.mamba_head_dim,
            "n_groups": mc.mamba_num_groups, "ssm_state_size": mc.mamba_state_dim,
            "conv_kernel": mc.mamba_conv_kernel, "chunk_size": mc.mamba_chunk_size,
            "time_step_min": mc.mamba_dt_min, "mamba_hidden_act": "silu", "mlp_hidden_act": "relu2",
            "layer_norm_epsilon": mc.norm_epsilon, "use_bias": False, "mlp_bias": False, "attention_bias": False,
            "use_conv_bias": True, "num_nextn_predict_layers": 0}


# ----------------------------------------------------------------------------- weights
def layer_names(mc: ModelConfig, i: int) -> Dict[str, str]:
    """Canonical suffix (under ``decoder.layers.{i}.``) -> HF name of layer ``i``'s tensors (attention's q, k, v
    under the keys ``q``, ``k``, ``v``: they are fused)."""
    p = f"backbone.layers.{i}."
    kind = mc.layer_kind(i)
    if kind == "mamba":
        return {"norm.weight": p + "norm.weight", **{"mixer." + t: p + "mixer." + t for t in MAMBA_TENSORS}}
    if kind == "attention":
        return {"input_layernorm.weight": p + "norm.weight", "q": p + "mixer.q_proj.weight",
                "k": p + "mixer.k_proj.weight", "v": p + "mixer.v_proj.weight",
                "self_attention.linear_proj.weight": p + "mixer.o_proj.weight"}
    return {"pre_mlp_layernorm.weight": p + "norm.weight", "mlp.linear_fc1.weight": p + "mixer.up_proj.weight",
            "mlp.linear_fc2.weight": p + "mixer.down_proj.weight"}


def layer_to_canonical(mc: ModelConfig, get: Callable[[str], torch.Tensor], i: int, out_i: int) -> dict:
    p = f"decoder.layers.{out_i}."
    names = layer_names(mc, i)
    sd = {p + k: get(n) for k, n in names.items() if k not in ("q", "k", "v")}
    if "q" in names:
        sd[p + "self_attention.linear_qkv.weight"] = layout.pack_qkv(mc, get(names["q"]), get(names["k"]),
                                                                     get(names["v"]))
    return sd


def canonical_to_hf(mc: ModelConfig, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Full canonical (TP=1, all layers) state dict -> HF tensors, vocab padding removed."""
    V = mc.vocab_size
    out = {"backbone.embeddings.weight": sd["embedding.word_embeddings.weight"][:V],
           "backbone.norm_f.weight": sd["decoder.final_norm.weight"]}
    if not mc.share_embeddings_and_output_weights:
        out["lm_head.weight"] = sd["output_layer.weight"][:V]
    for i in range(mc.num_layers):
        p = f"decoder.layers.{i}."
        names = layer_names(mc, i)
        out.update({n: sd[p + k] for k, n in names.items() if k not in ("q", "k", "v")})
        if "q" in names:
            q, k, v = layout.unpack_qkv(mc, sd[p + "self_attention.linear_qkv.weight"])
            out.update({names["q"]: q, names["k"]: k, names["v"]: v})
    return {k: v.contiguous() for k, v in out.items()}


def local_state_dict(mc: ModelConfig, get: Callable[[str], torch.Tensor], *, tp_rank: int, tp: int, pp_rank: int,
                     pp: int) -> Dict[str, torch.Tensor]:
    """This rank's model state dict (local layer numbers, canonical names) read from HF tensors: the stage's
    ``num_layers / pp`` consecutive layers, as Megatron-Core's hybrid stack splits its pattern."""
    per_stage = mc.num_layers // pp
    sd: Dict[str, torch.Tensor] = {}
    for j in range(per_stage):
        sd.update(layer_to_canonical(mc, get, pp_rank * per_stage + j, j))
    if pp_rank == 0:
        sd["embedding.word_embeddings.weight"] = layout.pad_vocab(mc, get("backbone.embeddings.weight"))
    if pp_rank == pp - 1:
        sd["decoder.final_norm.weight"] = get("backbone.norm_f.weight")
        head = "backbone.embeddings.weight" if mc.share_embeddings_and_output_weights else "lm_head.weight"
        sd["output_layer.weight"] = layout.pad_vocab(mc, get(head))
    return {k: layout.shard_tensor(mc, k, v, tp_rank, tp) for k, v in sd.items()}


def tensor_names(mc: ModelConfig) -> set:
    """Every tensor name an HF checkpoint of ``mc`` holds (tied models: no ``lm_head.weight``)."""
    names = {"backbone.embeddings.weight", "backbone.norm_f.weight"}
    if not mc.share_embeddings_and_output_weights:
        names.add("lm_head.weight")
    for i in range(mc.num_layers):
        names.update(layer_names(mc, i).values())
    return names
