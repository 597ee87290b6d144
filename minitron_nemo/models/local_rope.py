"""A RoPE base of its own for the sliding-window layers (Gemma 3: base 10,000 on the local layers, 1,000,000
and linear scaling on the global ones).

Megatron-Core's ``GPTModel`` computes one rotary embedding for all layers (the model's ``rotary_base`` and
scaling: the global layers'). ``LocalRopeSelfAttention`` is the self-attention of the layer spec: on a layer
the config's window pattern names (``is_layer_window_attention``, as for the windowed core attention) it
replaces the model's rotary embedding by one of the same length at ``local_rotary_base``, without scaling;
on the other layers it is Megatron-Core's ``SelfAttention``. The inverse frequencies are not parameters, so
checkpoints do not change. Context parallelism (which slices the embedding per rank) is not supported with it.
"""

from __future__ import annotations

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.utils import is_layer_window_attention


class LocalRopeSelfAttention(SelfAttention):
    def __init__(self, config, submodules, layer_number, *args, local_rotary_base: float, rotary_percent: float = 1.0,
                 **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.local_rope = None
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            self.local_rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=rotary_percent,
                                              rotary_base=local_rotary_base,
                                              use_cpu_initialization=config.use_cpu_initialization)

    def forward(self, hidden_states, *args, rotary_pos_emb=None, **kwargs):
        if self.local_rope is not None and rotary_pos_emb is not None:
            emb = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            rotary_pos_emb = self.local_rope(emb.shape[0])
        return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)
