"""Build a Megatron-Core ``GPTModel`` from a ``ModelConfig``.

Layer spec: Transformer Engine's spec when TE imports and a GPU is present; otherwise Megatron-Core's
local spec with torch SDPA as ``core_attention`` and ``TorchNorm`` for the norms. Hybrid Mamba-Transformer
models (Nemotron-H, ``ModelConfig.hybrid_pattern``) are Megatron-Core's hybrid model with local parts
(``models/hybrid.py``), on CPU and GPU alike.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from minitron_nemo import runtime
from minitron_nemo.models.config import ModelConfig, transformer_config
from minitron_nemo.models import hybrid, moe
from minitron_nemo.models.biased_experts import submodules, with_biased_experts
from minitron_nemo.models.layers import SDPAttention, TorchNorm
from minitron_nemo.models.local_rope import LocalRopeSelfAttention
from minitron_nemo.models.post_norm import post_normed
from minitron_nemo.models.window import WindowedSDPAttention


def te_available() -> bool:
    if runtime.cpu_mode():
        return False
    try:
        import transformer_engine  # noqa: F401
        return True
    except Exception:
        return False


def layer_spec(use_te: bool | None = None, mc: ModelConfig | None = None, grouped_gemm: bool = False):
    """The transformer layer ``ModuleSpec`` and the final-norm class used by this process.

    Experts: Megatron-Core's ``SequentialMLP`` (one MLP per expert, TE or local linears), or with
    ``grouped_gemm`` one grouped GEMM over the local experts: TE's ``TEGroupedMLP``; without TE,
    Megatron-Core 0.16's ``GroupedMLP`` (needs the CUDA ``grouped_gemm`` package and bf16), while 0.19 builds
    the sequential MLP. Query/key norms (Qwen3) are ``TorchNorm`` over ``head_dim`` in the local spec."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te is None:
        use_te = te_available()
    experts = mc.num_moe_experts if mc is not None else None
    qk_norm = bool(mc is not None and mc.qk_layernorm)
    grouped = bool(experts) and grouped_gemm
    if experts:
        moe.megatron_without_te()
    if use_te:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=grouped, qk_layernorm=qk_norm)
        return with_model_parts(spec, mc), None
    spec = specs.get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=grouped, qk_layernorm=qk_norm)
    sub = spec.submodules
    sub.input_layernorm = TorchNorm
    sub.pre_mlp_layernorm = TorchNorm
    attn = sub.self_attention.submodules
    attn.core_attention = WindowedSDPAttention if mc is not None and mc.sliding_window else SDPAttention
    if qk_norm:
        attn.q_layernorm = TorchNorm
        attn.k_layernorm = TorchNorm
    return with_model_parts(spec, mc), TorchNorm


def with_model_parts(spec, mc: ModelConfig | None):
    """The spec choices a model config asks for beyond the standard layer: the windowed layers' own RoPE base
    (``models/local_rope.py``) and the norms after the attention and the MLP (``models/post_norm.py``) of
    Gemma 3; gpt-oss's biased experts (``models/biased_experts.py``)."""
    if mc is None:
        return spec
    attention = spec.submodules.self_attention
    if mc.local_rotary_base is not None:
        attention.module = LocalRopeSelfAttention
        attention.params = {**attention.params, "local_rotary_base": mc.local_rotary_base,
                            "rotary_percent": mc.rotary_percent}
    if mc.post_norms:
        attention.submodules.linear_proj = post_normed(attention.submodules.linear_proj)
        mlp = submodules(spec.submodules.mlp)  # a ModuleSpec; Megatron-Core 0.19: a partial of MLP.as_mlp_submodule
        mlp.linear_fc2 = post_normed(mlp.linear_fc2)
    if mc.experts_replicated_over_tp:
        spec = with_biased_experts(spec)
    return spec


def scale_embeddings(model, scale: float) -> None:
    """The embedding output times ``scale`` in its own dtype (Gemma's sqrt(hidden_size), as transformers
    applies it). Megatron-Core's ``GPTModel`` builds its embedding itself rather than from the spec, so the
    scale is a forward hook on it."""
    model.embedding.register_forward_hook(lambda module, args, out: out * torch.tensor(scale, dtype=out.dtype))


def build_model(mc: ModelConfig, *, params_dtype: torch.dtype = torch.float32,
                use_te: bool | None = None, sequence_parallel: bool = False, grouped_gemm: bool = False):
    """Build this rank's ``GPTModel`` chunk (its TP shard of its PP stage's layers).

    MoE experts are the sequential expert MLP unless ``grouped_gemm``: calibration hooks each expert, and
    import, export and pruning name tensors per expert. Training and inference may take the grouped GEMM
    (``grouped_gemm_default()``); a checkpoint saved by either layout loads into the other, because
    Megatron-Core gives both the same sharded state dict (one tensor per global expert)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    if use_te is None:
        use_te = te_available()
    cfg = transformer_config(mc, tp=tp, pp=pp, ep=ep, etp=etp, params_dtype=params_dtype, cpu=runtime.cpu_mode(),
                             sequence_parallel=sequence_parallel, moe_grouped_gemm=grouped_gemm)
    if mc.is_hybrid:  # Mamba-2, attention and MLP layers: Megatron-Core's hybrid model (models/hybrid.py)
        return _placed(hybrid.build_model(mc, cfg))
    spec, final_norm = layer_spec(use_te, mc, grouped_gemm)
    if final_norm is not None:
        spec = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(cfg),
                                          layer_norm=final_norm)
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=mc.padded_vocab_size,
        max_sequence_length=mc.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=mc.share_embeddings_and_output_weights,
        position_embedding_type="yarn" if mc.yarn_factor is not None else "rope",
        rotary_percent=mc.rotary_percent,
        rotary_base=int(mc.rotary_base) if float(mc.rotary_base).is_integer() else mc.rotary_base,
        rope_scaling=mc.rope_scaling_factor is not None,
        rope_scaling_factor=mc.rope_scaling_factor or 8.0,
        seq_len_interpolation_factor=mc.rotary_interpolation_factor,
    )
    if mc.scale_embeddings and model.pre_process:
        scale_embeddings(model, mc.hidden_size ** 0.5)
    return _placed(model)


def _placed(model):
    """``model`` on this rank's GPU (CPU mode: where it is)."""
    if not runtime.cpu_mode():
        model.cuda(torch.cuda.current_device())
    return model


def grouped_gemm_default(mc: ModelConfig) -> bool:
    """The expert layout training and inference use: TE's grouped GEMM when Transformer Engine is here
    (GPU), else the sequential MLP."""
    return mc.is_moe and te_available()


def count_parameters(mc: ModelConfig, active: bool = False) -> int:
    """Parameter count of the unpadded model, computed analytically from the config.

    ``active=True``: the parameters one token uses (the router, ``moe_router_topk`` experts and the shared
    expert of each MoE layer instead of all experts); the same as the total for a dense model."""
    if mc.is_hybrid:
        return hybrid.count_parameters(mc)
    h, f, L = mc.hidden_size, mc.ffn_hidden_size, mc.num_layers
    q = mc.num_attention_heads * mc.head_dim
    kv = 2 * mc.num_query_groups * mc.head_dim
    norm = h if mc.normalization == "RMSNorm" else 2 * h
    attn = h * (q + kv) + q * h
    if mc.add_qkv_bias or mc.add_bias_linear:
        attn += q + kv
    if mc.add_bias_linear:
        attn += h
    if mc.qk_layernorm:
        attn += 2 * mc.head_dim
    if mc.attention_sinks:
        attn += mc.num_attention_heads
    gate = 2 if mc.gated else 1
    if mc.is_moe:
        fe = mc.moe_ffn_hidden_size
        experts = mc.moe_router_topk if active else mc.num_moe_experts
        mlp = mc.num_moe_experts * h + experts * (h * gate * fe + fe * h)
        if mc.add_bias_linear:  # the router's and every expert's biases (gpt-oss)
            mlp += mc.num_moe_experts + experts * (gate * fe + h)
        if mc.moe_shared_expert_intermediate_size:  # every token uses the shared expert (and its gate)
            fs = mc.moe_shared_expert_intermediate_size
            mlp += h * gate * fs + fs * h + (h if mc.moe_shared_expert_gate else 0)
    else:
        mlp = h * gate * f + f * h + ((gate * f + h) if mc.add_bias_linear else 0)
    emb = mc.vocab_size * h
    out = 0 if mc.share_embeddings_and_output_weights else mc.vocab_size * h
    norms = 4 if mc.post_norms else 2
    return L * (attn + mlp + norms * norm) + norm + emb + out
