"""The model config: the Hydra ``model`` group's schema, and its translation to ``TransformerConfig``.

``ModelConfig`` is what a checkpoint stores (``model.yaml``) and what pruning rewrites; the
``TransformerConfig`` built from it is the single source of shape for every Megatron-Core module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from minitron_nemo.errors import UserError, check

FAMILIES = ("llama", "mistral", "qwen2", "nemotron", "qwen3", "gemma3", "qwen3_moe", "mixtral", "qwen2_moe",
            "gpt_oss", "nemotron_h")
HYBRID_FAMILIES = ("nemotron_h",)  # Mamba-2, attention and MLP layers in one stack (models/hybrid.py)
# Megatron-Core's hybrid_override_pattern alphabet: a Mamba-2 layer, an attention layer, an MLP layer (each a
# whole residual block with its own pre-norm); "E" (an MoE layer) is one-line refused for now
HYBRID_SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp"}
MAMBA_CONV_KERNELS = (2, 3, 4)  # causal_conv1d's widths
MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss")
SHARED_EXPERT_FAMILIES = ("qwen2_moe",)  # families whose HF layout has a shared expert (always, with its gate)
ACTIVATIONS = ("swiglu", "geglu", "quick_geglu", "squared_relu", "gelu")
# linear_fc1 = [gate; up], act(gate) * (up + glu_linear_offset); quick_geglu: act(x) = x * sigmoid(1.702 x)
GATED_ACTIVATIONS = ("swiglu", "geglu", "quick_geglu")
NORMS = ("RMSNorm", "LayerNorm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the job key `dtype`


def dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's ``dtype`` name (weights, activations; the teacher cache's values)."""
    if name not in DTYPES:
        raise UserError(f"dtype={name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class ModelConfig:
    family: str = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: Optional[int] = None  # head_dim; None means hidden_size // num_attention_heads
    vocab_size: int = 256
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 2048
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    layernorm_zero_centered_gamma: bool = False
    activation: str = "swiglu"
    add_qkv_bias: bool = False
    add_bias_linear: bool = False
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rope_scaling_factor: Optional[float] = None  # Llama-3.x scaling (low 1, high 4, original 8192)
    share_embeddings_and_output_weights: bool = False
    qk_layernorm: bool = False  # Qwen3: RMSNorm over head_dim on every query and key head (one weight per layer)
    sliding_window: Optional[int] = None  # each query sees the last N positions (itself included)
    window_layers: Optional[List[int]] = None  # with sliding_window: 1 per windowed layer, 0 per full one; None: all
    local_rotary_base: Optional[float] = None  # RoPE base of the windowed layers (Gemma 3); None: rotary_base
    rotary_interpolation_factor: Optional[float] = None  # linear RoPE scaling of the model's rope: positions / factor
    query_pre_attn_scalar: Optional[float] = None  # attention scores times 1/sqrt(this); None: 1/sqrt(head_dim)
    post_norms: bool = False  # Gemma 3: a norm on the attention and MLP outputs before each residual add
    scale_embeddings: bool = False  # Gemma: the embeddings times sqrt(hidden_size)
    attention_sinks: bool = False  # gpt-oss: a learned logit per head in every softmax denominator
    glu_clamp: Optional[float] = None  # gpt-oss: gate clamped to <= this, up to [-this, this], before the GLU
    glu_linear_offset: float = 0.0  # gpt-oss: act(gate) * (up + this)
    # YaRN RoPE (gpt-oss): rotary frequencies stretched by yarn_factor beyond the original context
    yarn_factor: Optional[float] = None
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_truncate: bool = True  # round the correction range to whole dims (transformers' truncate)
    # Mixture of experts (every layer's MLP is an MoE layer when num_moe_experts is set).
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # each expert's FFN width
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False  # softmax over all experts, then top-k without renormalising
    moe_aux_loss_coeff: float = 0.0  # load-balancing loss weight (HF router_aux_loss_coef)
    moe_shared_expert_intermediate_size: Optional[int] = None  # shared expert's FFN width (every token uses it)
    moe_shared_expert_gate: bool = False  # shared expert output times sigmoid(gate . x) (Qwen2-MoE)
    # Hybrid Mamba-Transformer (Nemotron-H): one pattern character per layer (HYBRID_SYMBOLS), len == num_layers
    hybrid_pattern: Optional[str] = None
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    mamba_num_groups: int = 8  # B and C are shared by the heads of a group
    mamba_state_dim: int = 128
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128
    mamba_dt_min: float = 0.0  # the SSM step dt = softplus(. + dt_bias) clamped to >= this (transformers' time_step_min)

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    @property
    def experts_replicated_over_tp(self) -> bool:
        """Biased experts (gpt-oss) are whole on every TP rank (expert tensor parallelism 1): Megatron-Core
        adds an expert's output bias before the TP reduction, so it cannot cut them."""
        return self.is_moe and self.add_bias_linear

    @property
    def is_hybrid(self) -> bool:
        return self.hybrid_pattern is not None

    def layer_kind(self, layer: int) -> str:
        """``"mamba"``, ``"attention"`` or ``"mlp"`` for a hybrid model's layer; ``"transformer"`` otherwise."""
        return HYBRID_SYMBOLS[self.hybrid_pattern[layer]] if self.is_hybrid else "transformer"

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return ((self.vocab_size + m - 1) // m) * m

    def validate(self) -> "ModelConfig":
        check(self.family in FAMILIES, f"model.family={self.family!r} is not supported; allowed: {', '.join(FAMILIES)}")
        check(self.activation in ACTIVATIONS, f"model.activation={self.activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        check(self.normalization in NORMS, f"model.normalization={self.normalization!r}; allowed: {', '.join(NORMS)}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size"):
            check(getattr(self, name) >= 1, f"model.{name}={getattr(self, name)} must be >= 1")
        check(self.sliding_window is None or self.sliding_window >= 1,
              f"model.sliding_window={self.sliding_window} must be >= 1; allowed: null (full attention) or a window")
        if self.window_layers is not None:
            check(self.sliding_window is not None, f"model.window_layers={self.window_layers} needs model.sliding_window; "
                  f"allowed: null without a window")
            check(len(self.window_layers) == self.num_layers and set(self.window_layers) <= {0, 1},
                  f"model.window_layers={self.window_layers}; allowed: one 0 (full attention) or 1 (windowed) per "
                  f"layer, {self.num_layers} in all")
        check(self.local_rotary_base is None or self.sliding_window is not None,
              f"model.local_rotary_base={self.local_rotary_base} needs model.sliding_window (the windowed layers' "
              f"RoPE base); allowed: null without a window")
        for name in ("local_rotary_base", "rotary_interpolation_factor", "query_pre_attn_scalar", "glu_clamp",
                     "yarn_factor"):
            value = getattr(self, name)
            check(value is None or value > 0, f"model.{name}={value} must be > 0; allowed: null or a positive number")
        check(not (self.post_norms and self.is_moe), "model.post_norms=true is not supported with experts; "
              "allowed: false")
        check(self.num_attention_heads % self.num_query_groups == 0,
              f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
              f"model.num_query_groups={self.num_query_groups}")
        self._validate_hybrid()
        if self.is_moe:
            check(self.num_moe_experts >= 1, f"model.num_moe_experts={self.num_moe_experts} must be >= 1")
            check(1 <= self.moe_router_topk <= self.num_moe_experts,
                  f"model.moe_router_topk={self.moe_router_topk} must be between 1 and "
                  f"model.num_moe_experts={self.num_moe_experts}")
            check(self.moe_ffn_hidden_size is not None and self.moe_ffn_hidden_size >= 1,
                  f"model.moe_ffn_hidden_size={self.moe_ffn_hidden_size} must be >= 1 for an MoE model")
            check(self.moe_router_score_function in ("softmax", "sigmoid"),
                  f"model.moe_router_score_function={self.moe_router_score_function!r}; allowed: softmax, sigmoid")
            shared = self.moe_shared_expert_intermediate_size
            check(shared is None or shared >= 1,
                  f"model.moe_shared_expert_intermediate_size={shared} must be >= 1; allowed: null (no shared "
                  f"expert) or a width")
            if self.family in SHARED_EXPERT_FAMILIES:
                check(shared is not None and self.moe_shared_expert_gate,
                      f"model.family={self.family!r} has a gated shared expert; allowed: "
                      f"model.moe_shared_expert_intermediate_size >= 1 with model.moe_shared_expert_gate=true")
            else:
                check(shared is None and not self.moe_shared_expert_gate,
                      f"model.moe_shared_expert_intermediate_size={shared} / moe_shared_expert_gate="
                      f"{self.moe_shared_expert_gate}: model.family={self.family!r} has no shared expert; allowed: "
                      f"null / false, or family {' or '.join(SHARED_EXPERT_FAMILIES)}")
        else:
            check(self.family not in MOE_FAMILIES,
                  f"model.family={self.family!r} needs model.num_moe_experts; allowed: a number of experts")
            check(self.moe_shared_expert_intermediate_size is None,
                  f"model.moe_shared_expert_intermediate_size={self.moe_shared_expert_intermediate_size} needs "
                  f"experts; allowed: null for a dense model")
        return self

    def _validate_hybrid(self) -> None:
        if self.family not in HYBRID_FAMILIES:
            check(self.hybrid_pattern is None, f"model.hybrid_pattern={self.hybrid_pattern!r}: model.family="
                  f"{self.family!r} is not hybrid; allowed: null, or family {' or '.join(HYBRID_FAMILIES)}")
            return
        p = self.hybrid_pattern
        check(not self.is_moe, f"model.num_moe_experts={self.num_moe_experts}: a hybrid model's experts are not "
              f"supported yet; allowed: null")
        check(isinstance(p, str) and len(p) == self.num_layers,
              f"model.hybrid_pattern={p!r}; allowed: one character per layer, model.num_layers={self.num_layers}")
        check("E" not in p, f"model.hybrid_pattern={p!r}: MoE layers (E) are not supported yet; allowed: "
              f"{', '.join(HYBRID_SYMBOLS)}")
        bad = sorted(set(p) - set(HYBRID_SYMBOLS))
        check(not bad, f"model.hybrid_pattern={p!r} has {bad[0] if bad else ''!r}; allowed: "
              f"{', '.join(f'{k} ({v})' for k, v in HYBRID_SYMBOLS.items())}")
        for name in ("mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim", "mamba_chunk_size"):
            check(getattr(self, name) >= 1, f"model.{name}={getattr(self, name)} must be >= 1")
        check(self.mamba_num_heads % self.mamba_num_groups == 0,
              f"model.mamba_num_heads={self.mamba_num_heads} is not a multiple of model.mamba_num_groups="
              f"{self.mamba_num_groups}; allowed: a multiple")
        check(self.mamba_conv_kernel in MAMBA_CONV_KERNELS, f"model.mamba_conv_kernel={self.mamba_conv_kernel}; "
              f"allowed: {', '.join(map(str, MAMBA_CONV_KERNELS))}")
        check(self.mamba_dt_min >= 0, f"model.mamba_dt_min={self.mamba_dt_min} must be >= 0")
        check(not self.gated and not self.add_bias_linear and not self.add_qkv_bias,
              f"model.activation={self.activation!r} / add_bias_linear={self.add_bias_linear} / add_qkv_bias="
              f"{self.add_qkv_bias}: the hybrid stack has non-gated MLPs without biases; allowed: a non-gated "
              f"activation, false, false")

    def check_parallel(self, tp: int, pp: int, ep: int = 1, etp: Optional[int] = None) -> None:
        """One-line errors when the layout does not divide the model (``etp``: the expert tensor parallelism,
        checked when given)."""
        if etp is not None and self.experts_replicated_over_tp and etp != 1:
            raise UserError(f"parallel.expert_tensor_parallel_size={etp}: model.family={self.family!r} has biased "
                            f"experts, which Megatron-Core keeps whole on each rank; allowed: 1")
        for name, value in (("num_attention_heads", self.num_attention_heads),
                            ("num_query_groups", self.num_query_groups),
                            ("ffn_hidden_size", self.ffn_hidden_size),
                            ("padded vocab size", self.padded_vocab_size),
                            *((("mamba_num_heads", self.mamba_num_heads), ("mamba_num_groups", self.mamba_num_groups))
                              if self.is_hybrid else ())):
            if value % tp:
                raise UserError(f"tensor_model_parallel_size={tp} does not divide {name}={value}; "
                                f"allowed: a divisor of {value}")
        if self.num_layers % pp:
            raise UserError(f"pipeline_model_parallel_size={pp} does not divide num_layers="
                            f"{self.num_layers}; allowed: a divisor of {self.num_layers}")
        if self.is_moe:
            if self.num_moe_experts % ep:
                raise UserError(f"expert_model_parallel_size={ep} does not divide num_moe_experts="
                                f"{self.num_moe_experts}; allowed: a divisor of {self.num_moe_experts}")
            for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
                value = getattr(self, name)
                if name == "moe_ffn_hidden_size" and self.experts_replicated_over_tp:
                    continue
                if value is not None and value % tp:
                    raise UserError(f"tensor_model_parallel_size={tp} does not divide {name}={value}; "
                                    f"allowed: a divisor of {value}")

    def check_layout(self, par) -> None:
        """``check_parallel`` for a job's ``parallel`` group."""
        tp = par.tensor_model_parallel_size
        etp = tp if par.expert_tensor_parallel_size is None else par.expert_tensor_parallel_size
        self.check_parallel(tp, par.pipeline_model_parallel_size, par.expert_model_parallel_size, etp)

    def windowed(self, layer: int) -> bool:
        """Whether ``layer`` (0-indexed) attends within the sliding window."""
        return bool(self.sliding_window) and (self.window_layers is None or bool(self.window_layers[layer]))

    def window_of_layers(self, kept: List[int]) -> dict:
        """The window fields of a model made of this model's (0-indexed) layers ``kept``: what depth pruning
        keeps of each layer's attention kind."""
        flags = [self.windowed(i) for i in kept]
        if not any(flags):
            return {"sliding_window": None, "window_layers": None, "local_rotary_base": None}
        return {"sliding_window": self.sliding_window, "window_layers": None if all(flags) else [int(f) for f in flags],
                "local_rotary_base": self.local_rotary_base}

    def pattern_of_layers(self, kept: List[int]) -> dict:
        """The ``hybrid_pattern`` of a model made of this model's (0-indexed) layers ``kept`` (depth pruning); {} for
        a model that is not hybrid."""
        return {"hybrid_pattern": "".join(self.hybrid_pattern[i] for i in kept)} if self.is_hybrid else {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d).validate()

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()


def squared_relu(x):
    return torch.pow(F.relu(x), 2)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _activation(name: str):
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    return {"swiglu": F.silu, "geglu": gelu_tanh, "quick_geglu": quick_gelu, "squared_relu": squared_relu,
            "gelu": F.gelu}[name]


def moe_fields(mc: ModelConfig, ep: int, grouped_gemm: bool = False) -> dict:
    """``TransformerConfig`` fields of an MoE model: dropless top-k routing in fp32, the all-to-all token
    dispatcher, the sequential expert MLP or the grouped GEMM, the shared expert and its gate if any."""
    if not mc.is_moe:
        return {}
    return dict(
        num_moe_experts=mc.num_moe_experts,
        moe_router_topk=mc.moe_router_topk,
        moe_ffn_hidden_size=mc.moe_ffn_hidden_size,
        moe_router_score_function=mc.moe_router_score_function,
        moe_router_pre_softmax=mc.moe_router_pre_softmax,
        moe_router_load_balancing_type="aux_loss" if mc.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=mc.moe_aux_loss_coeff,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=grouped_gemm,
        moe_permute_fusion=False,
        expert_model_parallel_size=ep,
        moe_shared_expert_intermediate_size=mc.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=mc.moe_shared_expert_gate,
    )


def mamba_fields(mc: ModelConfig) -> dict:
    """``TransformerConfig`` fields of a hybrid model's Mamba-2 mixers (the kernel width, chunk size and dt floor
    are the mixer's own arguments: ``models/hybrid.py``)."""
    if not mc.is_hybrid:
        return {}
    return dict(mamba_num_heads=mc.mamba_num_heads, mamba_head_dim=mc.mamba_head_dim,
                mamba_num_groups=mc.mamba_num_groups, mamba_state_dim=mc.mamba_state_dim)


def softmax_scale(mc: ModelConfig) -> Optional[float]:
    """The attention scores' scale when it is not 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar)."""
    return mc.query_pre_attn_scalar ** -0.5 if mc.query_pre_attn_scalar else None


def yarn_fields(mc: ModelConfig) -> dict:
    """The ``yarn_*`` attributes ``GPTModel`` reads from its config for ``position_embedding_type="yarn"``
    (``TransformerConfig`` has no such fields; the MLA config does). Megatron-Core's attention reads them too,
    to scale cos and sin by YaRN's temperature (0.1 ln(factor) + 1, as transformers does)."""
    if mc.yarn_factor is None:
        return {}
    return dict(yarn_rotary_scaling_factor=mc.yarn_factor,
                yarn_original_max_position_embeddings=mc.yarn_original_max_position_embeddings,
                yarn_beta_fast=mc.yarn_beta_fast, yarn_beta_slow=mc.yarn_beta_slow, yarn_mscale=1.0,
                yarn_mscale_all_dim=0.0, yarn_correction_range_round_to_int=mc.yarn_truncate)


def transformer_config(mc: ModelConfig, *, tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None,
                       params_dtype: torch.dtype = torch.float32, cpu: bool = False,
                       sequence_parallel: bool = False, moe_grouped_gemm: bool = False):
    """Build the Megatron-Core ``TransformerConfig`` for ``mc`` at the given layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    mc.check_parallel(tp, pp, ep, etp)
    cfg = TransformerConfig(
        num_layers=mc.num_layers,
        hidden_size=mc.hidden_size,
        ffn_hidden_size=mc.ffn_hidden_size,
        num_attention_heads=mc.num_attention_heads,
        num_query_groups=mc.num_query_groups,
        kv_channels=mc.head_dim,
        normalization=mc.normalization,
        layernorm_epsilon=mc.norm_epsilon,
        layernorm_zero_centered_gamma=mc.layernorm_zero_centered_gamma,
        gated_linear_unit=mc.gated,
        activation_func=_activation(mc.activation),
        add_bias_linear=mc.add_bias_linear,
        add_qkv_bias=mc.add_qkv_bias,
        qk_layernorm=mc.qk_layernorm,
        softmax_scale=softmax_scale(mc),
        softmax_type="learnable" if mc.attention_sinks else "vanilla",
        activation_func_clamp_value=mc.glu_clamp,
        glu_linear_offset=mc.glu_linear_offset,
        window_size=(mc.sliding_window - 1, 0) if mc.sliding_window else None,
        window_attn_skip_freq=list(mc.window_layers) if mc.window_layers else None,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=cpu,
        perform_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        deallocate_pipeline_outputs=False,
        variable_seq_lengths=False,
        **moe_fields(mc, ep, moe_grouped_gemm),
        **({"expert_tensor_parallel_size": etp} if mc.is_moe and etp is not None else {}),
        **mamba_fields(mc),
    )
    for key, value in yarn_fields(mc).items():
        setattr(cfg, key, value)
    return cfg
