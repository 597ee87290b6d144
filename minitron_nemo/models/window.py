"""Sliding-window attention for the CPU layer spec: ``WindowedSDPAttention``, the ``core_attention`` of
layers whose queries see only the last ``window`` positions (Mistral's ``sliding_window``).

The model's ``TransformerConfig.window_size`` = ``(window - 1, 0)`` (Megatron-Core's convention, which
Transformer Engine's attention applies on GPU) says which layers: Megatron-Core's
``is_layer_window_attention`` (all layers, or a pattern through ``window_attn_skip_freq``). A layer outside
the pattern attends causally over the whole sequence.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.utils import is_layer_window_attention

from minitron_nemo.models.layers import SDPAttention


def banded_causal_mask(sq: int, sk: int, left: int, device=None) -> torch.Tensor:
    """``[sq, sk]`` booleans, True where query i (the last ``sq`` of ``sk`` positions) may attend key j:
    ``i - left <= j <= i``."""
    i = torch.arange(sk - sq, sk, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    return (j <= i) & (j >= i - left)


class WindowedSDPAttention(SDPAttention):
    """``SDPAttention`` with a banded causal mask on the layers the config's window pattern names."""

    def __init__(self, config, layer_number, *args, **kwargs):
        super().__init__(config, layer_number, *args, **kwargs)
        windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.window_left = config.window_size[0] if windowed else None

    def allowed(self, sq: int, sk: int, device) -> torch.Tensor | None:
        return None if self.window_left is None else banded_causal_mask(sq, sk, self.window_left, device)
