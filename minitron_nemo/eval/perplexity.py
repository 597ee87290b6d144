"""Held-out perplexity: mean next-token NLL over non-overlapping windows of a text file."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from megatron.core import parallel_state

from minitron_nemo.errors import UserError
from minitron_nemo.models.forward import lm_loss_sums


def load_tokenizer(path):
    from transformers import AutoTokenizer

    from minitron_nemo.checkpoint.store import tokenizer_dir

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(path)))


def text_windows(tokenizer, text_file, seq_length: int, max_tokens: int | None = None) -> torch.Tensor:
    """Token windows ``[n, seq_length + 1]``; consecutive windows share one boundary token, so every
    token after the first is predicted exactly once. The tail is padded with -1 (masked)."""
    p = Path(text_file)
    if not p.is_file():
        raise UserError(f"eval.text_file={text_file} does not exist; allowed: a text file")
    if seq_length < 2:
        raise UserError(f"eval.seq_length={seq_length}; allowed: an integer >= 2")
    ids = tokenizer(p.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[: max_tokens + 1] if max_tokens else ids, dtype=torch.long)
    if ids.numel() < 2:
        raise UserError(f"eval.text_file={text_file} has fewer than 2 tokens")
    n = math.ceil((ids.numel() - 1) / seq_length)
    out = torch.full((n, seq_length + 1), -1, dtype=torch.long)
    for i in range(n):
        w = ids[i * seq_length: i * seq_length + seq_length + 1]
        out[i, : w.numel()] = w
    return out


def window_batches(windows: torch.Tensor, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1):
    """Micro-batches (``tokens``, ``labels``, ``loss_mask``) of this data-parallel rank's windows."""
    mine = windows[dp_rank::dp_size]
    batches = []
    for i in range(0, mine.shape[0], micro_batch_size):
        w = mine[i: i + micro_batch_size]
        tokens, labels = w[:, :-1].clone(), w[:, 1:].clone()
        mask = (labels >= 0) & (tokens >= 0)
        tokens[tokens < 0] = 0
        labels[labels < 0] = 0
        batches.append({"tokens": tokens, "labels": labels, "loss_mask": mask.float()})
    return batches


def megatron_perplexity(model, windows: torch.Tensor, micro_batch_size: int = 4) -> dict:
    batches = window_batches(windows, micro_batch_size, parallel_state.get_data_parallel_rank(),
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
        for b in window_batches(windows, micro_batch_size):
            logits = model(b["tokens"]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(),
                                                    reduction="none")
            total += (nll * b["loss_mask"].flatten()).sum().item()
            count += int(b["loss_mask"].sum().item())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
