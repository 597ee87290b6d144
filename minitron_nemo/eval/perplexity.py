"""Held-out perplexity: mean next-token NLL over non-overlapping windows of a text file."""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state

from minitron_nemo.data.windows import to_batches
from minitron_nemo.models.forward import lm_loss_sums


def megatron_perplexity(model, windows: torch.Tensor, micro_batch_size: int = 4) -> dict:
    batches = to_batches(windows, micro_batch_size, parallel_state.get_data_parallel_rank(),
                             parallel_state.get_data_parallel_world_size())
    total, count = lm_loss_sums(model, batches)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def hf_perplexity(hf_dir, windows: torch.Tensor, micro_batch_size: int = 4,
                  dtype: torch.dtype = torch.float32) -> dict:
    """The same measurement with transformers (single process), for side-by-side checks."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in to_batches(windows, micro_batch_size):
            logits = model(b["tokens"]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(),
                                                    reduction="none")
            total += (nll * b["loss_mask"].flatten()).sum().item()
            count += int(b["loss_mask"].sum().item())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
