"""Calibration batches: ``num_samples`` windows of ``seq_length`` tokens drawn at random (seeded).

Source: a Megatron indexed dataset prefix (``PREFIX.bin/.idx`` from ``recipes/preprocess_data.py``;
random samples of its GPTDataset) or a text file (tokenized with the checkpoint's tokenizer). Text
windows start at random character offsets; each offset's text is tokenized on its own and its first token (likely a partial word) is
dropped, so a large file is never tokenized whole. Every rank draws the same windows; data-parallel
rank r takes windows r, r + DP, ...
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from minitron_nemo.errors import UserError


def load_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:
        raise UserError(f"cannot load the tokenizer from {tokenizer_dir} ({type(e).__name__}); "
                        f"allowed: a checkpoint with a tokenizer/ directory") from None


def text_windows(path, tokenizer, num_samples: int, seq_length: int, seed: int) -> torch.Tensor:
    """``[num_samples, seq_length + 1]`` token windows from random offsets of a text file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prune.calibration.data={path} does not exist; allowed: a text file")
    text = p.read_text(encoding="utf-8", errors="replace")
    probe = text[:200_000]
    n_probe = max(len(tokenizer(probe, add_special_tokens=False)["input_ids"]), 1)
    chunk = int((seq_length + 2) * len(probe) / n_probe * 1.3) + 64
    if len(text) < chunk:
        raise UserError(f"prune.calibration.data={path} is too short for seq_length={seq_length} "
                        f"(~{n_probe * len(text) // max(len(probe), 1)} tokens); allowed: a longer text "
                        f"or a smaller prune.calibration.seq_length")
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


def to_batches(windows: torch.Tensor, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1):
    """This DP rank's micro-batches (dicts with tokens / labels / loss_mask ``[b, s]``)."""
    mine = windows[dp_rank::dp_size]
    batches = []
    for i in range(0, mine.shape[0], micro_batch_size):
        w = mine[i:i + micro_batch_size]
        batches.append({"tokens": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous(),
                        "loss_mask": torch.ones(w.shape[0], w.shape[1] - 1)})
    return batches


def is_indexed_prefix(data) -> bool:
    return Path(str(data) + ".bin").is_file() and Path(str(data) + ".idx").is_file()


def check_data(data) -> None:
    if not (Path(data).is_file() or is_indexed_prefix(data)):
        raise UserError(f"prune.calibration.data={data} does not exist; allowed: a text file or an indexed "
                        f"dataset prefix (PREFIX.bin / PREFIX.idx)")


def indexed_windows(prefix, tokenizer_dir, num_samples: int, seq_length: int, seed: int) -> torch.Tensor:
    """``[num_samples, seq_length + 1]`` windows: random samples (seeded) of the prefix's GPTDataset."""
    from minitron_nemo.data.indexed import HFTokenizer, build_gpt_datasets

    train = build_gpt_datasets(HFTokenizer(tokenizer_dir), seq_length, blend=[str(prefix)], split="1,0,0",
                               seed=seed)[0]
    rng = random.Random(seed)
    n = len(train)
    idx = rng.sample(range(n), num_samples) if num_samples <= n else [rng.randrange(n) for _ in range(num_samples)]
    items = [train[i] for i in idx]
    return torch.stack([torch.cat([it["tokens"], it["labels"][-1:]]) for it in items]).long()


def calibration_windows(data: str, tokenizer_dir, num_samples: int, seq_length: int, seed: int,
                        vocab_size: int | None = None) -> torch.Tensor:
    """Windows from ``data`` (indexed prefix or text file); ids are checked against the model's vocabulary."""
    if num_samples < 1 or seq_length < 2:
        raise UserError(f"prune.calibration.num_samples={num_samples}, seq_length={seq_length}; "
                        f"allowed: num_samples >= 1, seq_length >= 2")
    check_data(data)
    if is_indexed_prefix(data):
        w = indexed_windows(data, tokenizer_dir, num_samples, seq_length, seed)
    else:
        w = text_windows(data, load_tokenizer(tokenizer_dir), num_samples, seq_length, seed)
    if vocab_size is not None and int(w.max()) >= vocab_size:
        raise UserError(f"the tokenizer in {tokenizer_dir} produced id {int(w.max())} >= the model's "
                        f"vocab_size={vocab_size}; allowed: the checkpoint's own tokenizer")
    return w
