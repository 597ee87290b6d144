"""Gemma 3 text models (``Gemma3ForCausalLM``, ``model_type: gemma3_text``): ``config.json`` <-> ``ModelConfig``.

What Gemma 3 adds to a Llama-like layer, and where it lives here:
* sliding-window attention on the layers ``layer_types`` names ``sliding_attention`` (or, in older configs,
  all but every ``sliding_window_pattern``-th layer), global attention on the others: ``sliding_window`` /
  ``window_layers`` (``models/window.py``);
* RoPE per layer kind: ``rope_parameters.full_attention`` (base 1e6, linear scaling on the 4B and larger
  models) is the model's rotary embedding, ``rope_parameters.sliding_attention`` (base 1e4) the windowed
  layers' own (``local_rotary_base``, ``models/local_rope.py``);
* four norms per layer, Gemma's ``(1 + w)`` RMSNorm everywhere (``layernorm_zero_centered_gamma``): the two
  before attention and MLP, and the two after them (``post_norms``, ``models/post_norm.py``); QK-norm;
* embeddings times sqrt(hidden_size) (``scale_embeddings``), GeGLU with the tanh GELU (``geglu``), an explicit
  ``head_dim``, attention scores scaled by ``query_pre_attn_scalar ** -0.5``, tied embeddings.

Soft-capping (Gemma 2's, ``null`` in Gemma 3), bidirectional attention and attention biases are refused.
The weight names are ``checkpoint/hf.py``'s, with the norms mapped as ``POST_NORM_NAMES`` says.
"""

from __future__ import annotations

from minitron_nemo.checkpoint.hf_fields import check_window, layer_types, shape_fields, window_flags
from minitron_nemo.errors import UserError
from minitron_nemo.models.config import ModelConfig

ARCH = "Gemma3ForCausalLM"
MODEL_TYPE = "gemma3_text"
MULTIMODAL_ARCH = "Gemma3ForConditionalGeneration"
ACTIVATION = "gelu_pytorch_tanh"
# HF name of each of a layer's norms (after "model.layers.{i}.") -> the key of hf.hf_layer_names
POST_NORM_NAMES = {"post_norm": "pre_feedforward_layernorm.weight",
                   "attn_out_norm": "post_attention_layernorm.weight",
                   "mlp_out_norm": "post_feedforward_layernorm.weight"}


def _rope_of(hf: dict) -> tuple:
    """``(global rope dict, local rope dict)``: ``rope_parameters`` per layer kind (transformers 5), or the
    older ``rope_theta`` / ``rope_scaling`` (global) and ``rope_local_base_freq`` (local) fields."""
    rp = hf.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        return dict(rp.get("full_attention") or {}), dict(rp.get("sliding_attention") or {})
    full = {"rope_type": "default", "rope_theta": hf.get("rope_theta", 1_000_000.0)}
    full.update(hf.get("rope_scaling") or {})
    return full, {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10_000.0)}


def _layer_kinds(hf: dict, n: int) -> list:
    types = hf.get("layer_types")
    if types is None:
        pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
        types = layer_types((i + 1) % pattern for i in range(n))
    return window_flags(types, n, ARCH)


def model_config(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of a Gemma 3 text ``config.json``; what it cannot express is one line."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise UserError(f"{key}={hf[key]} is not supported for {ARCH}; allowed: null (Gemma 3)")
    if hf.get("use_bidirectional_attention"):
        raise UserError(f"use_bidirectional_attention=true is not supported for {ARCH}; allowed: false")
    if hf.get("attention_bias"):
        raise UserError(f"attention_bias=true is not supported for {ARCH}; allowed: false")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ACTIVATION
    if act != ACTIVATION:
        raise UserError(f"hidden_activation={act!r} is not supported for {ARCH}; allowed: {ACTIVATION}")
    full, local = _rope_of(hf)
    factor = None
    kind = full.get("rope_type", full.get("type", "default")) or "default"
    if kind == "linear":
        factor = float(full["factor"])
    elif kind != "default":
        raise UserError(f"rope_parameters.full_attention.rope_type={kind!r} is not supported for {ARCH}; "
                        f"allowed: default, linear")
    if (local.get("rope_type") or "default") != "default":
        raise UserError(f"rope_parameters.sliding_attention.rope_type={local.get('rope_type')!r} is not supported "
                        f"for {ARCH}; allowed: default")
    n = hf["num_hidden_layers"]
    shape = shape_fields(hf)
    head_dim = shape["kv_channels"]
    window = hf.get("sliding_window")
    flags = _layer_kinds(hf, n)
    check_window(window, ARCH)
    windowed = window is not None and any(flags)
    scalar = float(hf.get("query_pre_attn_scalar", head_dim))
    return ModelConfig(
        family="gemma3",
        num_layers=n,
        **shape,
        max_position_embeddings=hf.get("max_position_embeddings", 131072),
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        layernorm_zero_centered_gamma=True,
        activation="geglu",
        rotary_base=float(full.get("rope_theta", 1_000_000.0)),
        rotary_interpolation_factor=factor,
        local_rotary_base=float(local.get("rope_theta", 10_000.0)) if windowed else None,
        query_pre_attn_scalar=None if scalar == head_dim else scalar,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", True)),
        qk_layernorm=True,
        sliding_window=window if windowed else None,
        window_layers=None if not windowed or all(flags) else flags,
        post_norms=True,
        scale_embeddings=True,
    ).validate()


def hf_config(mc: ModelConfig) -> dict:
    """The Gemma 3 fields of ``mc``'s ``config.json`` (``hf.hf_config_from_model_config`` adds the shape fields
    every family writes and the token ids)."""
    if mc.hidden_size % mc.num_attention_heads:
        raise UserError(f"hidden_size={mc.hidden_size} is not a multiple of num_attention_heads="
                        f"{mc.num_attention_heads}, which transformers' Gemma3TextConfig refuses; allowed: a "
                        f"width and head count that divide")
    flags = [int(mc.windowed(i)) for i in range(mc.num_layers)]
    full = {"rope_type": "default", "rope_theta": mc.rotary_base}
    if mc.rotary_interpolation_factor is not None:
        full = {"rope_type": "linear", "factor": mc.rotary_interpolation_factor, "rope_theta": mc.rotary_base}
    local = {"rope_type": "default", "rope_theta": mc.local_rotary_base or mc.rotary_base}
    return {
        "hidden_activation": ACTIVATION,
        "rms_norm_eps": mc.norm_epsilon,
        "rope_parameters": {"full_attention": full, "sliding_attention": local},
        "query_pre_attn_scalar": _number(mc.query_pre_attn_scalar or mc.head_dim),  # an int to transformers
        # no window: every layer full, with a window the transformers config still needs a number
        "sliding_window": mc.sliding_window or mc.max_position_embeddings,
        "layer_types": layer_types(flags),
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "use_bidirectional_attention": False,
    }


def _number(x: float):
    return int(x) if float(x).is_integer() else x


def check_family(mc: ModelConfig) -> None:
    """The Gemma 3 fields a ``ModelConfig`` of family gemma3 must have (an edited ``model.yaml``, say)."""
    want = dict(post_norms=True, scale_embeddings=True, layernorm_zero_centered_gamma=True, qk_layernorm=True,
                activation="geglu", normalization="RMSNorm")
    bad = [f"{k}={getattr(mc, k)}" for k, v in want.items() if getattr(mc, k) != v]
    if bad:
        raise UserError(f"model.family='gemma3' with {', '.join(bad)}; allowed: "
                        + ", ".join(f"{k}={v}" for k, v in want.items()))
