"""Attention sinks (gpt-oss): one learned logit per head that joins every softmax denominator, so a query may
give part of its attention to no position at all.

Megatron-Core holds the logits as core attention's ``softmax_offset`` (``TransformerConfig.softmax_type =
"learnable"``, one per head of this TP rank); Transformer Engine applies them on GPU. Torch's fused SDPA has
no such term, so the CPU core attention (``models/layers.py``) computes these layers' softmax here.
"""

from __future__ import annotations

import torch


def attention_with_sinks(q, k, v, sinks, scale: float, allowed: torch.Tensor | None = None):
    """``softmax([q k^T * scale, sink]) v`` without the sink's column: ``q`` ``[b, h, sq, d]``, ``k`` / ``v``
    ``[b, h, sk, d]`` (groups already repeated), ``sinks`` ``[h]``, ``allowed`` ``[sq, sk]`` booleans (None:
    causal, the last ``sq`` of ``sk`` positions)."""
    sq, sk = q.shape[2], k.shape[2]
    if allowed is None:
        i = torch.arange(sk - sq, sk, device=q.device).unsqueeze(1)
        allowed = torch.arange(sk, device=q.device).unsqueeze(0) <= i
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(scores.shape[0], -1, sq, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)
