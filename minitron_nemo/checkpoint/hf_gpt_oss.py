"""gpt-oss (``GptOssForCausalLM``, ``model_type: gpt_oss``): ``config.json`` and weights <-> ``ModelConfig`` and
canonical tensors.

What gpt-oss adds, and where it lives here:
* every MLP is a mixture of experts with biases on the router and on both expert projections
  (``add_bias_linear``; Megatron-Core keeps biased experts whole on each rank, expert tensor parallelism 1);
  routing takes the softmax over the top-k router logits (``moe_router_pre_softmax=false``);
* the experts' clamped GLU: ``(clamp(up, -L, L) + 1) * g * sigmoid(1.702 g)``, ``g = clamp(gate, max=L)``
  (``quick_geglu``, ``glu_clamp`` = L = ``swiglu_limit``, ``glu_linear_offset`` = 1);
* attention sinks, a learned logit per head (``attention_sinks``, ``models/sinks.py``), and biases on q, k, v, o;
* sliding-window attention on the layers ``layer_types`` names (every other one), full attention on the rest;
* YaRN RoPE (``yarn_*``; its temperature goes into the softmax scale, ``models/config.py``).

transformers stores each layer's experts stacked: ``gate_up_proj`` ``[E, H, 2F]`` with the gate and up columns
interleaved (gate at even, up at odd positions), ``down_proj`` ``[E, F, H]``, and their biases ``[E, 2F]``,
``[E, H]``; Megatron-Core's expert ``linear_fc1`` is ``[gate; up]`` rows of ``[2F, H]``. The released
checkpoints keep the expert weights in MXFP4 (``*_blocks`` / ``*_scales``); this module reads the bf16 / fp32
tensors transformers writes after dequantising them and refuses the MXFP4 ones in one line.
"""

from __future__ import annotations

from typing import Callable

import torch

from minitron_nemo.checkpoint.hf_fields import check_window, layer_types, shape_fields, window_flags
from minitron_nemo.errors import UserError
from minitron_nemo.models import moe
from minitron_nemo.models.config import ModelConfig

ARCH = "GptOssForCausalLM"
MODEL_TYPE = "gpt_oss"
ALPHA = 1.702  # Megatron-Core's quick_gelu gain: the only swiglu_alpha it computes
EXPERT_TENSORS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def _yarn(hf: dict) -> dict:
    rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rp.get("rope_type", rp.get("type", "default")) or "default"
    theta = float(rp.get("rope_theta", hf.get("rope_theta", 150000.0)))
    if kind == "default":
        return dict(rotary_base=theta)
    if kind != "yarn":
        raise UserError(f"rope_parameters.rope_type={kind!r} is not supported for {ARCH}; allowed: yarn, default")
    for key in ("mscale", "mscale_all_dim", "attention_factor"):
        if rp.get(key) is not None:
            raise UserError(f"rope_parameters.{key}={rp[key]} is not supported for {ARCH}; allowed: null (the YaRN "
                            f"temperature 0.1 ln(factor) + 1)")
    return dict(rotary_base=theta, yarn_factor=float(rp["factor"]),
                yarn_original_max_position_embeddings=int(rp.get("original_max_position_embeddings", 4096)),
                yarn_beta_fast=float(rp.get("beta_fast", 32.0)), yarn_beta_slow=float(rp.get("beta_slow", 1.0)),
                yarn_truncate=bool(rp.get("truncate", True)))


def model_config(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of a gpt-oss ``config.json``; what it cannot express is one line."""
    if hf.get("quantization_config"):
        method = (hf["quantization_config"] or {}).get("quant_method", "?")
        raise UserError(f"quantization_config.quant_method={method!r}: {ARCH} experts stored quantised are not "
                        f"supported; allowed: the bf16/fp32 weights transformers saves after dequantising "
                        f"(from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True)), then save_pretrained)")
    alpha = float(hf.get("swiglu_alpha", ALPHA))
    if alpha != ALPHA:
        raise UserError(f"swiglu_alpha={alpha} is not supported for {ARCH}; allowed: {ALPHA}")
    if hf.get("attention_bias") is False:
        raise UserError(f"attention_bias=false is not supported for {ARCH}; allowed: true")
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    check_window(window, ARCH)
    flags = window_flags(hf.get("layer_types") or layer_types((i + 1) % 2 for i in range(n)), n, ARCH)
    windowed = window is not None and any(flags)
    experts = hf.get("num_local_experts", hf.get("num_experts"))
    return ModelConfig(
        family="gpt_oss",
        num_layers=n,
        **shape_fields(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 131072),
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-5)),
        activation="quick_geglu",
        glu_clamp=float(hf.get("swiglu_limit", 7.0)),
        glu_linear_offset=1.0,
        add_qkv_bias=True,
        add_bias_linear=True,
        attention_sinks=True,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window if windowed else None,
        window_layers=None if not windowed or all(flags) else flags,
        num_moe_experts=int(experts),
        moe_router_topk=int(hf["num_experts_per_tok"]),
        moe_ffn_hidden_size=int(hf["intermediate_size"]),
        moe_router_pre_softmax=False,
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef") or 0.0),
        **_yarn(hf),
    ).validate()


def check_family(mc: ModelConfig) -> None:
    """The gpt-oss fields a ``ModelConfig`` of family gpt_oss must have (an edited ``model.yaml``, say)."""
    want = dict(activation="quick_geglu", glu_linear_offset=1.0, add_qkv_bias=True, add_bias_linear=True,
                attention_sinks=True, normalization="RMSNorm", moe_router_pre_softmax=False,
                moe_shared_expert_intermediate_size=None, qk_layernorm=False, post_norms=False)
    bad = [f"{k}={getattr(mc, k)}" for k, v in want.items() if getattr(mc, k) != v]
    if mc.glu_clamp is None:
        bad.append("glu_clamp=None")
    if bad:
        raise UserError(f"model.family='gpt_oss' with {', '.join(bad)}; allowed: "
                        + ", ".join(f"{k}={v}" for k, v in want.items()) + ", glu_clamp a number")


def hf_config(mc: ModelConfig) -> dict:
    """The gpt-oss fields of ``mc``'s ``config.json`` (``hf.hf_config_from_model_config`` adds the shape fields
    every family writes and the token ids)."""
    check_family(mc)
    rope = {"rope_type": "default", "rope_theta": mc.rotary_base}
    if mc.yarn_factor is not None:
        rope = {"rope_type": "yarn", "rope_theta": mc.rotary_base, "factor": mc.yarn_factor,
                "original_max_position_embeddings": mc.yarn_original_max_position_embeddings,
                "beta_fast": mc.yarn_beta_fast, "beta_slow": mc.yarn_beta_slow, "truncate": mc.yarn_truncate}
    flags = [int(mc.windowed(i)) for i in range(mc.num_layers)]
    return {
        "intermediate_size": mc.moe_ffn_hidden_size,
        "hidden_act": "silu",
        "rms_norm_eps": mc.norm_epsilon,
        "rope_parameters": rope,
        "sliding_window": mc.sliding_window or mc.max_position_embeddings,
        "layer_types": layer_types(flags),
        "num_local_experts": mc.num_moe_experts,
        "num_experts_per_tok": mc.moe_router_topk,
        "swiglu_alpha": ALPHA,
        "swiglu_limit": mc.glu_clamp,
        "router_aux_loss_coef": mc.moe_aux_loss_coeff,
        "attention_bias": True,
    }


def expert_names(i: int) -> dict:
    p = f"model.layers.{i}.mlp.experts."
    return {t: p + t for t in EXPERT_TENSORS}


def layer_names(i: int) -> dict:
    """HF names of layer ``i``'s tensors other than the stacked experts (keys as ``hf.hf_layer_names``)."""
    p = f"model.layers.{i}."
    a = p + "self_attn."
    return {"in_norm": p + "input_layernorm.weight", "post_norm": p + "post_attention_layernorm.weight",
            "q": a + "q_proj.weight", "k": a + "k_proj.weight", "v": a + "v_proj.weight", "o": a + "o_proj.weight",
            "qb": a + "q_proj.bias", "kb": a + "k_proj.bias", "vb": a + "v_proj.bias", "ob": a + "o_proj.bias",
            "sinks": a + "sinks", "router": p + "mlp.router.weight", "router_b": p + "mlp.router.bias"}


def experts_to_canonical(get: Callable[[str], torch.Tensor], i: int, prefix: str, experts: range) -> dict:
    """Megatron-Core tensors of layer ``i``'s experts ``experts`` (global numbers, numbered from
    ``experts.start``) under ``prefix`` (``decoder.layers.{j}.``)."""
    n = expert_names(i)
    gate_up, gate_up_b = get(n["gate_up_proj"]), get(n["gate_up_proj_bias"])
    down, down_b = get(n["down_proj"]), get(n["down_proj_bias"])
    _check_stacked(n["gate_up_proj"], gate_up)
    sd = {}
    for e in experts:
        k = e - experts.start
        w = gate_up[e]  # [H, 2F], gate and up interleaved
        sd[moe.expert_name(prefix, k, "linear_fc1.weight")] = torch.cat([w[:, 0::2].t(), w[:, 1::2].t()])
        sd[moe.expert_name(prefix, k, "linear_fc1.bias")] = torch.cat([gate_up_b[e][0::2], gate_up_b[e][1::2]])
        sd[moe.expert_name(prefix, k, "linear_fc2.weight")] = down[e].t()
        sd[moe.expert_name(prefix, k, "linear_fc2.bias")] = down_b[e]
    return sd


def _check_stacked(name: str, t: torch.Tensor) -> None:
    if t.dim() != 3 or not t.is_floating_point():
        raise UserError(f"tensor {name} has shape {tuple(t.shape)} and dtype {t.dtype}; allowed: [experts, hidden, "
                        f"2 x intermediate] floating point (dequantised MXFP4)")


def experts_to_hf(mc: ModelConfig, sd: dict, i: int) -> dict:
    """The stacked HF expert tensors of canonical layer ``i`` (every expert)."""
    p = f"decoder.layers.{i}."
    fc1 = [sd[moe.expert_name(p, e, "linear_fc1.weight")] for e in range(mc.num_moe_experts)]
    fc1b = [sd[moe.expert_name(p, e, "linear_fc1.bias")] for e in range(mc.num_moe_experts)]
    gate_up = []
    for w in fc1:
        gate, up = torch.chunk(w, 2, dim=0)  # [F, H] each
        gate_up.append(torch.stack([gate.t(), up.t()], dim=-1).reshape(w.shape[1], -1))  # [H, 2F] interleaved
    n = expert_names(i)
    return {
        n["gate_up_proj"]: torch.stack(gate_up),
        n["gate_up_proj_bias"]: torch.stack([torch.stack(torch.chunk(b, 2), dim=-1).reshape(-1) for b in fc1b]),
        n["down_proj"]: torch.stack([sd[moe.expert_name(p, e, "linear_fc2.weight")].t()
                                     for e in range(mc.num_moe_experts)]),
        n["down_proj_bias"]: torch.stack([sd[moe.expert_name(p, e, "linear_fc2.bias")]
                                          for e in range(mc.num_moe_experts)]),
    }
