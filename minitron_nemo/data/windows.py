"""Token windows from a text file, and their micro-batches.

A window is ``seq_length + 1`` token ids: the model reads the first ``seq_length`` and predicts the last
``seq_length``. Two ways to cut a file:

* ``random_windows`` (calibration): ``num_samples`` windows at random character offsets (seeded). Each
  offset's text is tokenized on its own and its first token (likely a partial word) is dropped, so a
  large file is never tokenized whole.
* ``tiled_windows`` (held-out perplexity): consecutive windows sharing one boundary token, so every token
  after the first is predicted exactly once; the tail is padded with -1 (masked).

``to_batches`` deals the windows over data-parallel ranks (rank r takes windows r, r + DP, ...) and
cuts micro-batches of ``tokens`` / ``labels`` / ``loss_mask``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from minitron_nemo.errors import UserError


def tokenizer_dir(path) -> Path:
    """A checkpoint's ``tokenizer/`` directory, or ``path`` itself (an HF directory)."""
    p = Path(path)
    return p / "tokenizer" if (p / "tokenizer").is_dir() else p


def load_tokenizer(path):
    """The HF tokenizer of a checkpoint or HF directory."""
    from transformers import AutoTokenizer

    d = tokenizer_dir(path)
    try:
        return AutoTokenizer.from_pretrained(str(d))
    except Exception as e:
        raise UserError(f"cannot load the tokenizer from {d} ({type(e).__name__}); "
                        f"allowed: a checkpoint with a tokenizer/ directory or an HF directory") from None


def _read(path, key: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{key}={path} does not exist; allowed: a text file")
    return p.read_text(encoding="utf-8", errors="replace")


def random_windows(path, tokenizer, num_samples: int, seq_length: int, seed: int,
                   key: str = "prune.calibration.data") -> torch.Tensor:
    """``[num_samples, seq_length + 1]`` windows from random offsets of the text file ``path``."""
    text = _read(path, key)
    probe = text[:200_000]
    n_probe = max(len(tokenizer(probe, add_special_tokens=False)["input_ids"]), 1)
    chunk = int((seq_length + 2) * len(probe) / n_probe * 1.3) + 64
    if len(text) < chunk:
        raise UserError(f"{key}={path} is too short for seq_length={seq_length} "
                        f"(~{n_probe * len(text) // max(len(probe), 1)} tokens); allowed: a longer text "
                        f"or a smaller {key.rsplit('.', 1)[0]}.seq_length")
    rng = random.Random(seed)
    offsets = [rng.randrange(0, len(text) - chunk + 1) for _ in range(num_samples)]
    out = []
    for start in range(0, num_samples, 256):
        pieces = [text[o:o + chunk] for o in offsets[start:start + 256]]
        for o, ids in zip(offsets[start:start + 256], tokenizer(pieces, add_special_tokens=False)["input_ids"]):
            ids = ids[1:]
            grow = chunk
            while len(ids) < seq_length + 1 and o + grow < len(text):
                grow *= 2
                ids = tokenizer(text[o:o + grow], add_special_tokens=False)["input_ids"][1:]
            if len(ids) < seq_length + 1:
                o = max(0, len(text) - 4 * grow)
                ids = tokenizer(text[o:], add_special_tokens=False)["input_ids"][1:]
            out.append(ids[: seq_length + 1])
    return torch.tensor(out, dtype=torch.long)


def tiled_windows(tokenizer, text_file, seq_length: int, max_tokens: int | None = None,
                  key: str = "eval.text_file") -> torch.Tensor:
    """``[n, seq_length + 1]`` consecutive windows covering the file (or its first ``max_tokens`` tokens)."""
    if seq_length < 2:
        raise UserError(f"eval.seq_length={seq_length}; allowed: an integer >= 2")
    ids = tokenizer(_read(text_file, key), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[: max_tokens + 1] if max_tokens else ids, dtype=torch.long)
    if ids.numel() < 2:
        raise UserError(f"{key}={text_file} has fewer than 2 tokens")
    n = math.ceil((ids.numel() - 1) / seq_length)
    out = torch.full((n, seq_length + 1), -1, dtype=torch.long)
    for i in range(n):
        w = ids[i * seq_length: i * seq_length + seq_length + 1]
        out[i, : w.numel()] = w
    return out


def to_batches(windows: torch.Tensor, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> list:
    """This data-parallel rank's micro-batches (``tokens``, ``labels``, ``loss_mask`` ``[b, s]``); ids of -1
    (padding) are masked out and read as 0."""
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
