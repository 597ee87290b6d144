"""Hugging Face <-> Megatron-Core conversion for Llama, Mistral, Qwen2, Qwen3, Nemotron, Gemma 3 (its config in
``checkpoint/hf_gemma3.py``), gpt-oss (``checkpoint/hf_gpt_oss.py``), the hybrid Mamba-Transformer Nemotron-H
(config and weights in ``checkpoint/hf_nemotron_h.py``), and the mixture-of-experts Qwen3-MoE, Mixtral and Qwen2-MoE (a gated shared
expert beside the routed ones).

Weights move through one *canonical* layout: Megatron-Core's local-spec names at TP=1 with global
layer numbers (``decoder.layers.{i}.self_attention.linear_qkv.weight``, ...).
* ``hf_to_canonical`` / ``canonical_to_hf`` are pure renames and re-packs (fused QKV per query group
  ``[q_1..q_h, k, v]``, SwiGLU ``linear_fc1 = [gate; up]``, vocab padding; experts as
  ``mlp.experts.local_experts.{e}`` with global ``e``, the router as ``mlp.router.weight``, the shared
  expert as ``mlp.shared_experts.linear_fc1/linear_fc2`` and its gate as ``mlp.shared_experts.gate_weight``).
* ``hf_to_local_state_dict`` cuts a canonical layer set into one rank's tensor/pipeline/expert shard, so
  import runs at any TP x PP x EP without any rank reading more than its own shard; the sharding rules,
  vocab padding and the fused-norm (TE) names are ``models/layout.py``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

import torch

from minitron_nemo.checkpoint import hf_gemma3, hf_fields, hf_gpt_oss, hf_nemotron_h
from minitron_nemo.errors import UserError
from minitron_nemo.models import layout, moe
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.readers import read_json, reading, typed_model_config

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "NemotronForCausalLM": "nemotron",
    "Qwen3ForCausalLM": "qwen3",
    hf_gemma3.ARCH: "gemma3",
    hf_gpt_oss.ARCH: "gpt_oss",
    hf_nemotron_h.ARCH: "nemotron_h",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
FAMILY_TO_ARCH = {v: k for k, v in ARCHITECTURES.items()}
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# the norms after attention and MLP (post_norms, models/post_norm.py): hf_layer_names key -> canonical name
# and the tensors only some families have (gpt-oss: the output bias, the sinks, the router bias), alike
OUTPUT_NORMS = {"attn_out_norm": "self_attention.linear_proj.post_norm.weight",
                "mlp_out_norm": "mlp.linear_fc2.post_norm.weight",
                "ob": "self_attention.linear_proj.bias", "sinks": "self_attention.core_attention.softmax_offset",
                "router_b": "mlp.router.bias"}
WINDOW_FAMILIES = ("mistral", "mixtral")  # HF configs whose sliding_window applies to every layer
LAYERED_WINDOW_FAMILIES = ("qwen2", "qwen3")  # use_sliding_window: the window on the layers layer_types names


# ----------------------------------------------------------------------------- configs
def _rope(hf: dict) -> dict:
    rp = dict(hf.get("rope_parameters") or {})
    rs = hf.get("rope_scaling") or {}
    rp.update({k: v for k, v in rs.items() if k not in rp})
    if "rope_theta" not in rp and "rope_theta" in hf:
        rp["rope_theta"] = hf["rope_theta"]
    if "partial_rotary_factor" not in rp and "partial_rotary_factor" in hf:
        rp["partial_rotary_factor"] = hf["partial_rotary_factor"]
    return rp


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Translate an HF ``config.json`` dict into a ``ModelConfig``; unsupported features raise."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch == hf_gemma3.MULTIMODAL_ARCH:
        raise UserError(f"architecture {arch!r} (Gemma 3 with its vision tower) is not supported; allowed: its text "
                        f"model, {hf_gemma3.ARCH} (transformers' Gemma3ForCausalLM saved on its own)")
    if arch not in ARCHITECTURES:
        raise UserError(f"architecture {arch!r} is not supported; allowed: {', '.join(ARCHITECTURES)}")
    family = ARCHITECTURES[arch]
    if family == "gemma3":
        return hf_gemma3.model_config(hf)
    if family == "gpt_oss":
        return hf_gpt_oss.model_config(hf)
    if family == "nemotron_h":
        return hf_nemotron_h.model_config(hf)
    rope = _rope(hf)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    scaling = None
    if rope_type == "llama3":
        for k, v in _LLAMA3_ROPE.items():
            if float(rope.get(k, v)) != v:
                raise UserError(f"rope_scaling {k}={rope.get(k)} is not supported; allowed: {v} (Llama-3.1)")
        scaling = float(rope["factor"])
    elif rope_type != "default":
        raise UserError(f"rope_type {rope_type!r} is not supported; allowed: default, llama3")
    if family in ("llama", "mistral") and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise UserError("attention_bias/mlp_bias=true is not supported for Llama/Mistral; allowed: false")
    if family == "nemotron" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise UserError("attention_bias/mlp_bias=true is not supported for Nemotron; allowed: false")
    if family in ("qwen3_moe", "qwen2_moe") and hf.get("use_sliding_window"):
        raise UserError(f"use_sliding_window=true is not supported for {arch}; allowed: false")
    if family in ("qwen3", "qwen3_moe", "mixtral") and hf.get("attention_bias"):
        raise UserError(f"attention_bias=true is not supported for {arch}; allowed: false")
    window, window_layers = _window_from_hf(hf, family, arch)
    act = hf.get("hidden_act", "silu")
    want = "relu2" if family == "nemotron" else "silu"
    if act != want:
        raise UserError(f"hidden_act={act!r} is not supported for {arch}; allowed: {want}")
    nemotron = family == "nemotron"
    experts = _moe_from_hf(hf, family, arch)
    return ModelConfig(
        family=family,
        num_layers=hf["num_hidden_layers"],
        **hf_fields.shape_fields(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        normalization="LayerNorm" if nemotron else "RMSNorm",
        norm_epsilon=float(hf.get("norm_eps" if nemotron else "rms_norm_eps", 1e-5)),
        layernorm_zero_centered_gamma=nemotron,
        activation="squared_relu" if nemotron else "swiglu",
        add_qkv_bias=family == "qwen2" or (family == "qwen2_moe" and bool(hf.get("qkv_bias", True))),
        add_bias_linear=False,
        rotary_base=float(rope.get("rope_theta", 10000.0)),
        rotary_percent=float(rope.get("partial_rotary_factor", 1.0)),
        rope_scaling_factor=scaling,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        qk_layernorm=family in ("qwen3", "qwen3_moe"),
        sliding_window=window,
        window_layers=window_layers,
        **experts,
    ).validate()


def _window_from_hf(hf: dict, family: str, arch: str) -> tuple:
    """``(sliding_window, window_layers)`` of a config.json: Mistral and Mixtral window every layer; Qwen2 and
    Qwen3 (``use_sliding_window``) the layers ``layer_types`` names ``sliding_attention`` (written by
    transformers; without it, the layers from ``max_window_layers`` on)."""
    if family in LAYERED_WINDOW_FAMILIES and not hf.get("use_sliding_window"):
        return None, None
    if family not in WINDOW_FAMILIES + LAYERED_WINDOW_FAMILIES:
        return None, None
    window = hf.get("sliding_window")
    hf_fields.check_window(window, arch)
    if window is None or family in WINDOW_FAMILIES:
        return window, None
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or hf_fields.layer_types(i >= hf.get("max_window_layers", n) for i in range(n))
    flags = hf_fields.window_flags(types, n, arch)
    if not any(flags):
        return None, None
    return window, None if all(flags) else flags


def _moe_from_hf(hf: dict, family: str, arch: str) -> dict:
    """The MoE fields of ``ModelConfig`` from a Qwen3-MoE, Qwen2-MoE or Mixtral ``config.json`` ({} otherwise).

    Routing: Mixtral takes the softmax over the top-k router logits; Qwen3-MoE and Qwen2-MoE the softmax
    over all experts, then the top-k, renormalised only with ``norm_topk_prob`` (the same as Mixtral's
    then). Qwen2-MoE adds a shared expert whose output is scaled by ``sigmoid(shared_expert_gate . x)``."""
    if family not in ("qwen3_moe", "mixtral", "qwen2_moe"):
        return {}
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    shared = {}
    if family == "qwen2_moe":
        width = hf.get("shared_expert_intermediate_size")
        if not isinstance(width, int) or width < 1:
            raise UserError(f"shared_expert_intermediate_size={width!r} is not supported for {arch}; allowed: "
                            f"an integer >= 1")
        shared = dict(moe_shared_expert_intermediate_size=width, moe_shared_expert_gate=True)
    if family in ("qwen3_moe", "qwen2_moe"):
        if int(hf.get("decoder_sparse_step", 1)) != 1 or hf.get("mlp_only_layers"):
            raise UserError(f"decoder_sparse_step={hf.get('decoder_sparse_step')} / mlp_only_layers="
                            f"{hf.get('mlp_only_layers')} (dense layers between MoE layers) are not supported; "
                            f"allowed: 1 / [] (every layer MoE)")
        width, pre_softmax = hf["moe_intermediate_size"], not hf.get("norm_topk_prob", False)
    else:
        if float(hf.get("router_jitter_noise") or 0.0) != 0.0:
            raise UserError(f"router_jitter_noise={hf['router_jitter_noise']} is not supported for {arch}; "
                            f"allowed: 0")
        width, pre_softmax = hf["intermediate_size"], False
    return dict(num_moe_experts=int(experts), moe_router_topk=int(hf["num_experts_per_tok"]),
                moe_ffn_hidden_size=int(width), moe_router_pre_softmax=bool(pre_softmax),
                moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef") or 0.0), **shared)


def hf_config_from_model_config(mc: ModelConfig, tokenizer_ids: dict | None = None) -> dict:
    """The ``config.json`` dict for ``mc`` (``head_dim`` always written explicitly).

    A Llama whose hidden size is no longer a multiple of its head count (width pruning with heads
    kept: 576 -> 384 with 9 heads) is written as Mistral: the same architecture and weight names with
    an explicit ``head_dim``, which transformers' LlamaConfig refuses for such shapes."""
    family = mc.family
    ids = {k: v for k, v in (tokenizer_ids or {}).items() if v is not None}
    if family == "gemma3":
        hf_gemma3.check_family(mc)
        return {**_shape_fields(mc, hf_gemma3.ARCH, hf_gemma3.MODEL_TYPE), **hf_gemma3.hf_config(mc), **ids}
    if family == "gpt_oss":
        return {**_shape_fields(mc, hf_gpt_oss.ARCH, hf_gpt_oss.MODEL_TYPE), **hf_gpt_oss.hf_config(mc), **ids}
    if family == "nemotron_h":
        return {**_shape_fields(mc, hf_nemotron_h.ARCH, hf_nemotron_h.MODEL_TYPE), **hf_nemotron_h.hf_config(mc),
                **ids}
    if family == "llama" and (mc.hidden_size % mc.num_attention_heads or mc.sliding_window):
        family = "mistral"
    writable = LAYERED_WINDOW_FAMILIES + (WINDOW_FAMILIES if mc.window_layers is None else ())
    if mc.sliding_window and family not in writable:
        raise UserError(f"model.sliding_window={mc.sliding_window} (window_layers={mc.window_layers}) cannot be "
                        f"written as {FAMILY_TO_ARCH[family]}; allowed: families {', '.join(writable)}, or no window")
    nemotron = family == "nemotron"
    rope = {"rope_type": "default", "rope_theta": mc.rotary_base}
    if mc.rope_scaling_factor is not None:
        rope = {"rope_type": "llama3", "factor": mc.rope_scaling_factor, "rope_theta": mc.rotary_base,
                **_LLAMA3_ROPE}
    cfg = {
        **_shape_fields(mc, FAMILY_TO_ARCH[family], family),  # the family names are transformers' model types
        "hidden_act": "relu2" if nemotron else "silu",
        "rope_theta": mc.rotary_base,
        "rope_parameters": rope,
    }
    if mc.rope_scaling_factor is not None:
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if nemotron:
        cfg.update(norm_eps=mc.norm_epsilon, partial_rotary_factor=mc.rotary_percent,
                   attention_bias=False, mlp_bias=False)
        cfg["rope_parameters"]["partial_rotary_factor"] = mc.rotary_percent
    else:
        cfg["rms_norm_eps"] = mc.norm_epsilon
    if family in ("llama", "mistral"):
        cfg.update(attention_bias=False, mlp_bias=False)
    if family == "mistral":
        cfg["sliding_window"] = mc.sliding_window  # null: full attention (MistralConfig's default is 4096)
    if family in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe"):
        cfg.update(use_sliding_window=False, sliding_window=None)
    if family in LAYERED_WINDOW_FAMILIES and mc.sliding_window:
        flags = [mc.windowed(i) for i in range(mc.num_layers)]
        cfg.update(use_sliding_window=True, sliding_window=mc.sliding_window, max_window_layers=flags.index(True),
                   layer_types=hf_fields.layer_types(flags))
    if family in ("qwen3", "qwen3_moe", "mixtral"):
        cfg.update(attention_bias=False)
    if family in ("qwen3_moe", "qwen2_moe"):
        cfg.update(num_experts=mc.num_moe_experts, num_experts_per_tok=mc.moe_router_topk,
                   moe_intermediate_size=mc.moe_ffn_hidden_size, norm_topk_prob=not mc.moe_router_pre_softmax,
                   decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=mc.moe_aux_loss_coeff)
    if family == "qwen2_moe":
        cfg.update(shared_expert_intermediate_size=mc.moe_shared_expert_intermediate_size, qkv_bias=mc.add_qkv_bias)
    if family == "mixtral":
        cfg.update(num_local_experts=mc.num_moe_experts, num_experts_per_tok=mc.moe_router_topk,
                   intermediate_size=mc.moe_ffn_hidden_size, sliding_window=mc.sliding_window, router_jitter_noise=0.0,
                   router_aux_loss_coef=mc.moe_aux_loss_coeff)
    cfg.update(ids)
    return cfg


def _shape_fields(mc: ModelConfig, arch: str, model_type: str) -> dict:
    """The ``config.json`` fields every family writes alike."""
    return {"architectures": [arch], "model_type": model_type, "num_hidden_layers": mc.num_layers,
            "hidden_size": mc.hidden_size, "intermediate_size": mc.ffn_hidden_size,
            "num_attention_heads": mc.num_attention_heads, "num_key_value_heads": mc.num_query_groups,
            "head_dim": mc.head_dim, "vocab_size": mc.vocab_size,
            "max_position_embeddings": mc.max_position_embeddings,
            "tie_word_embeddings": mc.share_embeddings_and_output_weights, "torch_dtype": "float32",
            "attention_dropout": 0.0}


def token_ids(hf: dict) -> dict:
    return {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def read_hf_config(hf_dir: Path) -> dict:
    p = Path(hf_dir) / "config.json"
    if not p.is_file():
        raise UserError(f"source={hf_dir} has no config.json; allowed: a Hugging Face model directory")
    return read_json(p, "HF config")


def hf_model_config(hf_dir: Path) -> ModelConfig:
    """The ``ModelConfig`` of an HF directory; a missing field or a wrong type names config.json."""
    p = Path(hf_dir) / "config.json"
    hf = read_hf_config(hf_dir)
    with reading(p, "HF config"):
        mc = model_config_from_hf(hf)
    return typed_model_config(mc.__dict__, p)


# ----------------------------------------------------------------------------- weights
def hf_layer_names(mc: ModelConfig, i: int) -> dict:
    if mc.family == "gpt_oss":
        return hf_gpt_oss.layer_names(i)
    p = f"model.layers.{i}."
    names = {
        "in_norm": p + "input_layernorm.weight",
        "post_norm": p + "post_attention_layernorm.weight",
        "q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight", "o": p + "self_attn.o_proj.weight",
    }
    if mc.qk_layernorm:
        names.update(q_norm=p + "self_attn.q_norm.weight", k_norm=p + "self_attn.k_norm.weight")
    if mc.post_norms:
        names.update({key: p + name for key, name in hf_gemma3.POST_NORM_NAMES.items()})
    if mc.is_moe:
        names["router"] = p + ("block_sparse_moe.gate.weight" if mc.family == "mixtral" else "mlp.gate.weight")
        if mc.moe_shared_expert_intermediate_size:
            s = p + "mlp.shared_expert."
            names.update(shared_gate_proj=s + "gate_proj.weight", shared_up=s + "up_proj.weight",
                         shared_down=s + "down_proj.weight", shared_gate=p + "mlp.shared_expert_gate.weight")
    else:
        names.update(up=p + "mlp.up_proj.weight", down=p + "mlp.down_proj.weight")
        if mc.gated:
            names["gate"] = p + "mlp.gate_proj.weight"
    if mc.add_qkv_bias:
        names.update(qb=p + "self_attn.q_proj.bias", kb=p + "self_attn.k_proj.bias",
                     vb=p + "self_attn.v_proj.bias")
    if mc.normalization == "LayerNorm":
        names.update(in_norm_b=p + "input_layernorm.bias", post_norm_b=p + "post_attention_layernorm.bias")
    return names


def hf_expert_names(mc: ModelConfig, i: int, e: int) -> dict:
    """HF names of expert ``e`` of layer ``i`` (gate, up, down projections)."""
    if mc.family == "mixtral":
        p = f"model.layers.{i}.block_sparse_moe.experts.{e}."
        return {"gate": p + "w1.weight", "up": p + "w3.weight", "down": p + "w2.weight"}
    p = f"model.layers.{i}.mlp.experts.{e}."
    return {"gate": p + "gate_proj.weight", "up": p + "up_proj.weight", "down": p + "down_proj.weight"}


def hf_layer_to_canonical(mc: ModelConfig, get: Callable[[str], torch.Tensor], i: int, out_i: int,
                          experts: range | None = None) -> dict:
    """Canonical tensors of HF layer ``i``, numbered ``out_i``. MoE: only the experts in ``experts``
    (global numbers; all by default) are read, numbered from ``experts.start``."""
    n = hf_layer_names(mc, i)
    p = f"decoder.layers.{out_i}."
    sd = {
        p + "input_layernorm.weight": get(n["in_norm"]),
        p + "pre_mlp_layernorm.weight": get(n["post_norm"]),
        p + "self_attention.linear_qkv.weight": layout.pack_qkv(mc, get(n["q"]), get(n["k"]), get(n["v"])),
        p + "self_attention.linear_proj.weight": get(n["o"]),
    }
    if mc.qk_layernorm:
        sd[p + "self_attention.q_layernorm.weight"] = get(n["q_norm"])
        sd[p + "self_attention.k_layernorm.weight"] = get(n["k_norm"])
    for key, name in OUTPUT_NORMS.items():
        if key in n:
            sd[p + name] = get(n[key])
    if mc.is_moe:
        sd[p + "mlp.router.weight"] = get(n["router"])
        experts = experts if experts is not None else range(mc.num_moe_experts)
        if mc.family == "gpt_oss":  # stacked experts
            sd.update(hf_gpt_oss.experts_to_canonical(get, i, p, experts))
        else:
            for e in experts:
                x = hf_expert_names(mc, i, e)
                sd[moe.expert_name(p, e - experts.start, "linear_fc1.weight")] = torch.cat([get(x["gate"]),
                                                                                            get(x["up"])])
                sd[moe.expert_name(p, e - experts.start, "linear_fc2.weight")] = get(x["down"])
        if "shared_gate" in n:
            sd[p + "mlp.shared_experts.linear_fc1.weight"] = torch.cat([get(n["shared_gate_proj"]), get(n["shared_up"])])
            sd[p + "mlp.shared_experts.linear_fc2.weight"] = get(n["shared_down"])
            sd[p + "mlp.shared_experts.gate_weight"] = get(n["shared_gate"])
    else:
        up = get(n["up"])
        sd[p + "mlp.linear_fc2.weight"] = get(n["down"])
        sd[p + "mlp.linear_fc1.weight"] = torch.cat([get(n["gate"]), up]) if "gate" in n else up
    if mc.add_qkv_bias:
        sd[p + "self_attention.linear_qkv.bias"] = layout.pack_qkv(mc, get(n["qb"]), get(n["kb"]), get(n["vb"]))
    if mc.normalization == "LayerNorm":
        sd[p + "input_layernorm.bias"] = get(n["in_norm_b"])
        sd[p + "pre_mlp_layernorm.bias"] = get(n["post_norm_b"])
    return sd


def canonical_layer_to_hf(mc: ModelConfig, sd: dict, i: int) -> dict:
    n = hf_layer_names(mc, i)
    p = f"decoder.layers.{i}."
    q, k, v = layout.unpack_qkv(mc, sd[p + "self_attention.linear_qkv.weight"])
    out = {n["in_norm"]: sd[p + "input_layernorm.weight"], n["post_norm"]: sd[p + "pre_mlp_layernorm.weight"],
           n["q"]: q, n["k"]: k, n["v"]: v, n["o"]: sd[p + "self_attention.linear_proj.weight"]}
    if mc.qk_layernorm:
        out[n["q_norm"]] = sd[p + "self_attention.q_layernorm.weight"]
        out[n["k_norm"]] = sd[p + "self_attention.k_layernorm.weight"]
    for key, name in OUTPUT_NORMS.items():
        if key in n:
            out[n[key]] = sd[p + name]
    if mc.is_moe:
        out[n["router"]] = sd[p + "mlp.router.weight"]
        if mc.family == "gpt_oss":  # stacked experts
            out.update(hf_gpt_oss.experts_to_hf(mc, sd, i))
        else:
            for e in range(mc.num_moe_experts):
                x = hf_expert_names(mc, i, e)
                out[x["gate"]], out[x["up"]] = torch.chunk(sd[moe.expert_name(p, e, "linear_fc1.weight")], 2, dim=0)
                out[x["down"]] = sd[moe.expert_name(p, e, "linear_fc2.weight")]
        if "shared_gate" in n:
            out[n["shared_gate_proj"]], out[n["shared_up"]] = torch.chunk(
                sd[p + "mlp.shared_experts.linear_fc1.weight"], 2, dim=0)
            out[n["shared_down"]] = sd[p + "mlp.shared_experts.linear_fc2.weight"]
            out[n["shared_gate"]] = sd[p + "mlp.shared_experts.gate_weight"]
    else:
        out[n["down"]] = sd[p + "mlp.linear_fc2.weight"]
        fc1 = sd[p + "mlp.linear_fc1.weight"]
        if "gate" in n:
            out[n["gate"]], out[n["up"]] = torch.chunk(fc1, 2, dim=0)
        else:
            out[n["up"]] = fc1
    if mc.add_qkv_bias:
        out[n["qb"]], out[n["kb"]], out[n["vb"]] = layout.unpack_qkv(mc, sd[p + "self_attention.linear_qkv.bias"])
    if mc.normalization == "LayerNorm":
        out[n["in_norm_b"]] = sd[p + "input_layernorm.bias"]
        out[n["post_norm_b"]] = sd[p + "pre_mlp_layernorm.bias"]
    return out


def canonical_to_hf(mc: ModelConfig, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Full canonical (TP=1, all layers) state dict -> HF tensors, vocab padding removed."""
    if mc.is_hybrid:
        return hf_nemotron_h.canonical_to_hf(mc, sd)
    V = mc.vocab_size
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:V],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    if mc.normalization == "LayerNorm":
        out["model.norm.bias"] = sd["decoder.final_layernorm.bias"]
    if not mc.share_embeddings_and_output_weights:
        out["lm_head.weight"] = sd["output_layer.weight"][:V]
    for i in range(mc.num_layers):
        out.update(canonical_layer_to_hf(mc, sd, i))
    return {k: v.contiguous() for k, v in out.items()}


def hf_to_local_state_dict(mc: ModelConfig, get: Callable[[str], torch.Tensor], *, tp_rank: int, tp: int,
                           pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> Dict[str, torch.Tensor]:
    """This rank's model state dict (local layer and expert numbers, local-spec names) read from HF
    tensors; experts are cut over TP like the dense MLP (expert tensor parallelism = TP)."""
    if mc.is_hybrid:
        return hf_nemotron_h.local_state_dict(mc, get, tp_rank=tp_rank, tp=tp, pp_rank=pp_rank, pp=pp)
    per_stage = mc.num_layers // pp
    first, last = pp_rank == 0, pp_rank == pp - 1
    experts = moe.local_experts(mc.num_moe_experts, ep_rank, ep) if mc.is_moe else None
    sd: Dict[str, torch.Tensor] = {}
    for j in range(per_stage):
        sd.update(hf_layer_to_canonical(mc, get, pp_rank * per_stage + j, j, experts))
    if first:
        sd["embedding.word_embeddings.weight"] = layout.pad_vocab(mc, get("model.embed_tokens.weight"))
    if last:
        sd["decoder.final_layernorm.weight"] = get("model.norm.weight")
        if mc.normalization == "LayerNorm":
            sd["decoder.final_layernorm.bias"] = get("model.norm.bias")
        head = "model.embed_tokens.weight" if mc.share_embeddings_and_output_weights else "lm_head.weight"
        sd["output_layer.weight"] = layout.pad_vocab(mc, get(head))
    return {k: layout.shard_tensor(mc, k, v, tp_rank, tp) for k, v in sd.items()}


def hf_tensor_names(mc: ModelConfig) -> set:
    """Every tensor name an HF checkpoint of ``mc`` holds (tied models: no ``lm_head.weight``)."""
    if mc.is_hybrid:
        return hf_nemotron_h.tensor_names(mc)
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if mc.normalization == "LayerNorm":
        names.add("model.norm.bias")
    if not mc.share_embeddings_and_output_weights:
        names.add("lm_head.weight")
    for i in range(mc.num_layers):
        names.update(hf_layer_names(mc, i).values())
        if mc.family == "gpt_oss":
            names.update(hf_gpt_oss.expert_names(i).values())
            continue
        for e in range(mc.num_moe_experts or 0):
            names.update(hf_expert_names(mc, i, e).values())
    return names


def check_hf_tensors(mc: ModelConfig, present: set, src, config_file: str = "config.json") -> None:
    """The tensors of an HF directory against those its config implies, both ways: a tensor the config
    implies and the weights lack, or a tensor the config does not describe (an extra layer, say), is one
    line naming both. Rotary buffers and a tied model's saved ``lm_head.weight`` are not weights of it."""
    want = hf_tensor_names(mc)
    ignored = {n for n in present if n.endswith("rotary_emb.inv_freq")}
    if mc.share_embeddings_and_output_weights:
        ignored.add("lm_head.weight")
    missing = sorted(want - present)
    extra = sorted(present - want - ignored, key=lambda n: (len(n), n))
    sizes = f"{config_file} num_hidden_layers={mc.num_layers}" + (
        f", num_experts={mc.num_moe_experts}" if mc.is_moe else "")
    if extra:
        raise UserError(f"HF checkpoint {src}: tensor {extra[0]} ({len(extra)} such) is not part of the model "
                        f"{sizes} describes; allowed: weights that match {config_file}")
    if missing:
        raise UserError(f"HF checkpoint {src}: {config_file} ({sizes}) implies tensor {missing[0]} "
                        f"({len(missing)} missing), which the weights lack; allowed: weights that match {config_file}")
