"""Torch implementations of the two layer-spec parts that Megatron-Core's local spec takes from apex.

``SDPAttention`` replaces ``DotProductAttention`` as ``core_attention`` (causal, GQA aware, any device).
``TorchNorm`` is LayerNorm / RMSNorm with optional zero-centred gamma (Nemotron), where the local
spec's ``WrappedTorchNorm`` refuses zero-centred gamma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

from minitron_nemo.models.sinks import attention_with_sinks


class SDPAttention(DotProductAttention):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Inputs follow Megatron's layout: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``.
    Output ``[sq, b, np * hn]``.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert attention_bias is None
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        ctx = self._causal(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3))
        sq, b = query.shape[0], query.shape[1]
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _causal(self, q, k, v):
        """Causal attention of ``[b, heads, s, d]`` queries over ``[b, groups, s, d]`` keys and values."""
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        p = self.config.attention_dropout if self.training else 0.0
        mask = self.allowed(q.shape[2], k.shape[2], q.device)
        if self.softmax_offset is not None:  # attention sinks (gpt-oss)
            scale = self.softmax_scale if self.softmax_scale is not None else q.shape[-1] ** -0.5
            return attention_with_sinks(q, k, v, self.softmax_offset, scale, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None,
                                              scale=self.softmax_scale)

    def allowed(self, sq: int, sk: int, device) -> torch.Tensor | None:
        """``[sq, sk]`` booleans, True where a query may attend a key; None: plain causal attention."""
        return None

    def _packed(self, query, key, value, params):
        """THD format (``[t, heads, d]``, documents delimited by ``cu_seqlens_q``): causal within each document."""
        assert params.qkv_format == "thd"
        cu = params.cu_seqlens_q.tolist()
        out = []
        for a, b in zip(cu[:-1], cu[1:]):
            q, k, v = (x[a:b].permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
            out.append(self._causal(q, k, v)[0].permute(1, 0, 2))
        return torch.cat(out).reshape(query.shape[0], self.hidden_size_per_partition)


class TorchNorm(torch.nn.Module):
    """LayerNorm or RMSNorm over the last dim; ``zero_centered_gamma`` stores ``gamma - 1``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.config = config
        self.rms = config.normalization == "RMSNorm"
        self.zero_centered = bool(config.layernorm_zero_centered_gamma)
        self.eps = eps
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(
            torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in self.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)

    def forward(self, x):
        w = self.weight + 1 if self.zero_centered else self.weight
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        return F.layer_norm(x, (x.shape[-1],), w, self.bias, self.eps)
