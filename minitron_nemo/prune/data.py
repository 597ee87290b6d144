"""Calibration windows: ``num_samples`` windows of ``seq_length`` tokens drawn at random (seeded).

Source: a Megatron indexed dataset prefix (``PREFIX.bin/.idx`` from ``recipes/preprocess_data.py``;
random samples of its GPTDataset) or a text file (``data/windows.random_windows`` with the checkpoint's
tokenizer). Every rank draws the same windows; ``data/windows.to_batches`` deals them over DP ranks.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from minitron_nemo.data.windows import load_tokenizer, random_windows
from minitron_nemo.errors import UserError


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
        w = random_windows(data, load_tokenizer(tokenizer_dir), num_samples, seq_length, seed)
    if vocab_size is not None and int(w.max()) >= vocab_size:
        raise UserError(f"the tokenizer in {tokenizer_dir} produced id {int(w.max())} >= the model's "
                        f"vocab_size={vocab_size}; allowed: the checkpoint's own tokenizer")
    return w
