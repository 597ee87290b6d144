"""Hybrid Mamba-Transformer models (Nemotron-H): Megatron-Core's hybrid model from a ``ModelConfig``.

``ModelConfig.hybrid_pattern`` is Megatron-Core's ``hybrid_override_pattern``: one character per layer, ``M`` a
Mamba-2 layer, ``*`` an attention layer, ``-`` an MLP layer, each a residual block with its own pre-norm. The
stack is Megatron-Core's ``MambaStack`` with a spec of local (non Transformer Engine) parts:

* Mamba layers: ``MambaLayer`` with ``TorchNorm`` as its pre-norm (``MambaPreNorm``) (the Transformer Engine spec fuses that norm
  into ``in_proj``) and ``MambaMixer`` (``in_proj`` a ``ColumnParallelLinear``, ``out_proj`` a
  ``RowParallelLinear``; its kernel width and chunk size as the mixer's spec params). Without the
  ``mamba_ssm`` / ``causal_conv1d`` CUDA packages the mixer runs on ``models/mamba_cpu.py``'s kernels. A dt
  floor (``mamba_dt_min``: transformers clamps the step at ``time_step_min``) makes the mixer
  ``DtFloorMambaMixer``, which passes ``dt_limit=(floor, inf)`` to the scan kernels (Megatron-Core's mixer
  passes none);
* attention layers: ``TransformerLayer`` with the local spec's attention (``SDPAttention``, ``TorchNorm``), no
  position embedding (Nemotron-H's attention has no RoPE);
* MLP layers: ``MLPLayer`` with the local spec's MLP;
* the final norm: a ``TorchNorm`` (``TorchNormStack``; Megatron-Core's stack builds Transformer Engine's norm).

Pipeline stages take ``num_layers / pp`` consecutive pattern characters each (Megatron-Core's uniform split of a
pattern without ``|``), so layer ``i`` is global layer ``i`` of the pattern on every layout.

What differs between Megatron-Core versions is in ``_megatron()`` only: 0.16 builds ``MambaModel``
(``mamba_stack_spec``, ``hybrid_override_pattern``), 0.19 ``HybridModel`` (``hybrid_stack_spec``,
``hybrid_layer_pattern``; ``MambaStack`` is its ``HybridStack``); the mixer's convolution is a ``conv1d`` module
up to 0.16 and two parameters from 0.19 (``mamba_cpu.conv1d_parameters``; the checkpoint key is
``conv1d.weight`` in both, ``models/layout.py`` renames the state-dict key).
"""

from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

from megatron.core import parallel_state

from minitron_nemo.models import mamba_cpu
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.models.layers import SDPAttention, TorchNorm


@functools.lru_cache(maxsize=None)
def _megatron() -> SimpleNamespace:
    """Megatron-Core's hybrid classes for this version (the CPU kernels installed first where missing)."""
    mm = mamba_cpu.install_cpu_kernels()
    from megatron.core.ssm import mamba_block
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer

    try:  # Megatron-Core 0.19: HybridModel (MambaModel is its deprecated wrapper)
        from megatron.core.models.hybrid.hybrid_model import HybridModel as Model
        spec_key, pattern_key = "hybrid_stack_spec", "hybrid_layer_pattern"
    except ImportError:  # 0.16
        from megatron.core.models.mamba import MambaModel as Model
        spec_key, pattern_key = "mamba_stack_spec", "hybrid_override_pattern"

    class TorchNormStack(mamba_block.MambaStack):
        """Megatron-Core's stack with a ``TorchNorm`` as its final norm (it builds Transformer Engine's)."""

        def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
            super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
            self.post_layer_norm = post_layer_norm
            if self.post_process and post_layer_norm:
                self.final_norm = TorchNorm(config, config.hidden_size, eps=config.layernorm_epsilon)

    class DtFloorMambaMixer(mm.MambaMixer):
        """``MambaMixer`` whose SSM step is clamped to ``>= dt_min`` (transformers' ``time_step_min``): the scan
        kernels take ``dt_limit``, which Megatron-Core's mixer does not pass. Dynamic-batching inference (the
        decode kernel has no limit) is not covered."""

        def __init__(self, *args, dt_min: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.dt_min = float(dt_min)

        def forward(self, *args, **kwargs):
            with _dt_limit(mm, (self.dt_min, float("inf"))):
                return super().forward(*args, **kwargs)

    return SimpleNamespace(mixer_module=mm, Stack=TorchNormStack, StackSubmodules=mamba_block.MambaStackSubmodules,
                           MambaLayer=MambaLayer, MambaLayerSubmodules=MambaLayerSubmodules, MLPLayer=MLPLayer,
                           DtFloorMambaMixer=DtFloorMambaMixer, Model=Model, spec_key=spec_key,
                           pattern_key=pattern_key)


class MambaPreNorm(TorchNorm):
    """A Mamba layer's pre-norm: ``TorchNorm`` with the config's epsilon when the layer passes none
    (Megatron-Core 0.16's ``MambaLayer`` passes config and width only, 0.19's the epsilon too)."""

    def __init__(self, config, hidden_size: int, eps: float | None = None, **kwargs):
        super().__init__(config, hidden_size, eps=config.layernorm_epsilon if eps is None else eps, **kwargs)


@contextlib.contextmanager
def _dt_limit(mm, limit):
    """The mixer module's scan kernels with ``dt_limit=limit`` for the duration (looked up at call time)."""
    names = ("mamba_split_conv1d_scan_combined", "mamba_chunk_scan_combined")
    saved = {n: getattr(mm, n) for n in names}
    for n, fn in saved.items():
        setattr(mm, n, functools.partial(fn, dt_limit=limit))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(mm, n, fn)


def stack_spec(mc: ModelConfig):
    """The ``ModuleSpec`` of the hybrid stack (local parts; see the module docstring)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    mg = _megatron()
    local = get_gpt_layer_local_spec().submodules
    local.self_attention.submodules.core_attention = SDPAttention
    mixer = ModuleSpec(
        module=mg.DtFloorMambaMixer if mc.mamba_dt_min > 0 else mg.mixer_module.MambaMixer,
        params={"d_conv": mc.mamba_conv_kernel, "chunk_size": mc.mamba_chunk_size,
                **({"dt_min": mc.mamba_dt_min} if mc.mamba_dt_min > 0 else {})},
        submodules=mg.mixer_module.MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear))
    return ModuleSpec(module=mg.Stack, submodules=mg.StackSubmodules(
        mamba_layer=ModuleSpec(module=mg.MambaLayer, submodules=mg.MambaLayerSubmodules(
            norm=MambaPreNorm, mixer=mixer,
            mamba_bda=get_bias_dropout_add)),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm, self_attention=local.self_attention, self_attn_bda=get_bias_dropout_add)),
        mlp_layer=ModuleSpec(module=mg.MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=TorchNorm, mlp=local.mlp, mlp_bda=get_bias_dropout_add)),
    ))


def build_model(mc: ModelConfig, cfg):
    """This rank's hybrid model chunk for the ``TransformerConfig`` ``cfg`` (``builder.build_model`` places it on
    the GPU)."""
    mg = _megatron()
    return mg.Model(
        config=cfg,
        vocab_size=mc.padded_vocab_size,
        max_sequence_length=mc.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=mc.share_embeddings_and_output_weights,
        position_embedding_type="none",
        **{mg.spec_key: stack_spec(mc), mg.pattern_key: mc.hybrid_pattern},
    )


def is_mamba_layer(layer) -> bool:
    """A hybrid model's Mamba layer (Megatron-Core's ``MambaLayer``: ``norm`` and ``mixer``; it returns the hidden
    states alone, where a transformer layer returns them with a context)."""
    return hasattr(layer, "mixer")


def layer_parameters(mc: ModelConfig) -> dict:
    """Parameters of one layer of each kind (``"mamba"``, ``"attention"``, ``"mlp"``), its pre-norm included."""
    h, f = mc.hidden_size, mc.ffn_hidden_size
    heads, inner = mc.mamba_num_heads, mc.mamba_num_heads * mc.mamba_head_dim
    bc = 2 * mc.mamba_num_groups * mc.mamba_state_dim
    conv = inner + bc
    q, kv = mc.num_attention_heads * mc.head_dim, 2 * mc.num_query_groups * mc.head_dim
    per_kind = {
        "mamba": h * (2 * inner + bc + heads) + conv * (mc.mamba_conv_kernel + 1) + 3 * heads + inner + inner * h,
        "attention": h * (q + kv) + q * h,
        "mlp": 2 * h * f,
    }
    return {kind: n + h for kind, n in per_kind.items()}


def count_parameters(mc: ModelConfig) -> int:
    """Parameters of the unpadded hybrid model (``builder.count_parameters``)."""
    h, per_kind = mc.hidden_size, layer_parameters(mc)
    layers = sum(per_kind[mc.layer_kind(i)] for i in range(mc.num_layers))
    out = 0 if mc.share_embeddings_and_output_weights else mc.vocab_size * h
    return layers + h + mc.vocab_size * h + out
