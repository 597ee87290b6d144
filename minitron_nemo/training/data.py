"""Training data for the recipes: text files or Megatron blends -> GPT datasets -> micro-batches.

``data.source``: ``shakespeare`` (the cached by-play split), ``text`` (``data.train_text`` /
``valid_text`` / ``test_text``, tokenized once into ``WORKDIR/data``), ``indexed`` (``data.blend``
split by ``data.split``, or ``data.blend`` + ``data.valid_blend``) or ``chat`` (conversations written by
``recipes/preprocess_data.py format=chat``, one per sample, the loss on answer tokens unless
``data.answer_only=false``: ``data/chat_samples.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from minitron_nemo import runtime
from minitron_nemo.data import indexed
from minitron_nemo.errors import UserError

SOURCES = ("shakespeare", "text", "indexed", "chat")


def text_files(dcfg) -> dict:
    """``{"train", "valid", "test"}`` text files of a ``shakespeare`` or ``text`` source (None if unset)."""
    if dcfg.source == "shakespeare":
        from minitron_nemo.data import assets

        return {k: str(v) for k, v in assets.shakespeare_splits().items()}
    files = {"train": dcfg.train_text, "valid": dcfg.valid_text, "test": dcfg.test_text}
    for k, v in files.items():
        if v is not None and not Path(v).is_file():
            raise UserError(f"data.{k}_text={v} does not exist; allowed: a utf-8 text file")
    return files


def check(dcfg) -> None:
    if dcfg.source not in SOURCES:
        raise UserError(f"data.source={dcfg.source!r}; allowed: {', '.join(SOURCES)}")
    if dcfg.source == "text" and not dcfg.train_text:
        raise UserError("data.source=text needs data.train_text=FILE")
    if dcfg.source == "chat":
        if not dcfg.blend:
            raise UserError("data.source=chat needs data.blend=PREFIX (written by recipes/preprocess_data.py "
                            "format=chat)")
        from minitron_nemo.data.chat_samples import open_chat_prefix

        open_chat_prefix(dcfg.blend, "data.blend")
        if dcfg.valid_blend:
            open_chat_prefix(dcfg.valid_blend, "data.valid_blend")
    if dcfg.source == "indexed":
        if not dcfg.blend:
            raise UserError("data.source=indexed needs data.blend=PREFIX (or a weighted blend)")
        indexed.parse_blend(dcfg.blend)
        if dcfg.valid_blend:
            indexed.parse_blend(dcfg.valid_blend)


def claim_cache(dcfg, sources: dict) -> None:
    """``data.cache_dir`` through the output policy (never inside a source such as the teacher); call it
    beside the job's other claims, before any compute."""
    if dcfg.get("cache_dir"):
        from minitron_nemo import outputs

        outputs.claim_cache_dir(dcfg.cache_dir, key="data.cache_dir", sources=sources)


def _tokenize(files: dict, tokenizer_dir, out_dir) -> dict:
    """Tokenize each split's text once into ``out_dir/<split>`` (rank 0; the others wait)."""
    prefixes = {}
    for split in ("train", "valid"):
        if files.get(split):
            prefixes[split] = str(Path(out_dir) / split)
    if runtime.is_rank0():
        tok = indexed.HFTokenizer(tokenizer_dir)
        for split, prefix in prefixes.items():
            if not Path(prefix + ".idx").is_file():
                docs = indexed.iter_documents([Path(files[split])], "file")
                stats = indexed.write_indexed_dataset(docs, tok, prefix, source=f"data.{split}_text={files[split]}")
                runtime.print0(f"[data] {files[split]} -> {prefix} ({stats['tokens']} tokens)")
    if dist.is_initialized():
        dist.barrier()
    return prefixes


def build(dcfg, tokenizer_dir, workdir, train_samples: int, seed: int):
    """``(train_dataset, valid_dataset or None)``."""
    tok = indexed.HFTokenizer(tokenizer_dir)
    seq = int(dcfg.seq_length)
    valid_samples = int(dcfg.valid_samples)
    if dcfg.source == "chat":
        from minitron_nemo.data.chat_samples import build_chat_datasets

        return build_chat_datasets(dcfg, tok.pad if tok.pad >= 0 else tok.eod, (train_samples, valid_samples), seed,
                                   log=runtime.print0)
    if dcfg.source == "indexed":
        if dcfg.valid_blend:
            per = [dcfg.blend, dcfg.valid_blend, None]
            ds = indexed.build_gpt_datasets(tok, seq, blend_per_split=per, seed=seed,
                                            samples=(train_samples, valid_samples, None))
        else:
            ds = indexed.build_gpt_datasets(tok, seq, blend=dcfg.blend, split=str(dcfg.split), seed=seed,
                                            samples=(train_samples, valid_samples, None))
        return ds[0], ds[1]
    data_dir = Path(workdir) / "data"
    if dcfg.get("cache_dir"):  # shared between jobs: one subfolder per tokenizer
        from minitron_nemo.checkpoint.store import tokenizer_digest

        data_dir = Path(dcfg.cache_dir) / (tokenizer_digest(tokenizer_dir) or "tokenizer")[:16]
    prefixes = _tokenize(text_files(dcfg), tokenizer_dir, data_dir)
    per = [[prefixes["train"]], [prefixes["valid"]] if "valid" in prefixes else None, None]
    ds = indexed.build_gpt_datasets(tok, seq, blend_per_split=per, seed=seed,
                                    cache_dir=str(data_dir / "index_cache"))
    return ds[0], ds[1]


def train_iterator(dataset, micro_batch_size: int):
    """``consumed_samples -> iterator`` over this DP rank's micro-batches (cycles over epochs)."""
    return lambda consumed: indexed.batches(dataset, micro_batch_size, consumed_samples=consumed, cycle=True)


def valid_batches(dataset, micro_batch_size: int, num_samples: int) -> list:
    """This DP rank's share of the first ``num_samples`` validation samples."""
    if dataset is None or num_samples <= 0:
        return []
    dp = parallel_state.get_data_parallel_world_size()
    n = max(1, num_samples // (micro_batch_size * dp))
    it = indexed.batches(dataset, micro_batch_size, cycle=True)
    return [next(it) for _ in range(n)]
