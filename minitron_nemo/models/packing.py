"""Packed sequences: several documents in one micro-batch row, no attention across them.

A packed batch carries ``segment_ids`` ``[1, s]`` (the document of each position, counting from 0; the
padding at the end is a segment of its own). ``model_inputs`` turns a batch into the arguments of a
``GPTModel`` forward: for a packed batch, Megatron-Core's ``PackedSeqParams`` in THD format
(``cu_seqlens``), with which rotary positions restart at every document and the core attention is causal
within each document (Transformer Engine on GPU, ``layers.SDPAttention`` per document on CPU).
"""

from __future__ import annotations

import torch

from minitron_nemo.errors import UserError


def cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative document lengths ``[n_docs + 1]`` (int32) of one packed row ``[s]`` or ``[1, s]``."""
    seg = segment_ids.reshape(-1)
    starts = torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1
    zero, end = torch.zeros(1, dtype=torch.long), torch.tensor([seg.numel()])
    return torch.cat([zero, starts.cpu(), end]).to(torch.int32)


def packed_seq_params(segment_ids: torch.Tensor, device):
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    if segment_ids.dim() == 2 and segment_ids.shape[0] != 1:
        raise UserError(f"a packed micro-batch holds one packed row, got {segment_ids.shape[0]}; allowed: "
                        f"trainer.micro_batch_size=1 with data.packing=true")
    cu = cu_seqlens(segment_ids)
    longest = int((cu[1:] - cu[:-1]).max())
    cu = cu.to(device)
    cp = parallel_state.get_context_parallel_group() if parallel_state.model_parallel_is_initialized() else None
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest, cp_group=cp)


def model_inputs(batch: dict, device) -> tuple:
    """``(args, kwargs)`` of a ``GPTModel`` forward for ``batch`` (tokens, positions, no mask; the packing)."""
    tokens = batch["tokens"].to(device)
    positions = batch["position_ids"].to(device) if "position_ids" in batch else \
        torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    kwargs = {}
    if batch.get("segment_ids") is not None:
        kwargs["packed_seq_params"] = packed_seq_params(batch["segment_ids"], device)
    return (tokens, positions, None), kwargs
