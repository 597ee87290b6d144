"""Megatron indexed datasets: tokenize text into ``PREFIX.bin/.idx``, build GPT datasets, batch them.

* ``HFTokenizer``: the small Megatron tokenizer adapter ``GPTDatasetConfig`` needs (``eod``, ``pad``,
  ``vocab_size``, ``unique_identifiers``) around a Hugging Face tokenizer.
* ``iter_documents`` / ``write_indexed_dataset``: text or JSONL -> ``IndexedDatasetBuilder`` (EOD appended
  to every document), written to temp files then renamed.
* ``build_gpt_datasets``: train/valid/test ``GPTDataset`` (or ``BlendedDataset``) through
  ``BlendedMegatronDatasetBuilder``; works in one process and under torch.distributed (rank 0 builds
  the index caches, the other ranks wait at a barrier then load them).
* ``batches``: Megatron-style (pretraining sampler) micro-batches of ``tokens``, ``labels``,
  ``loss_mask``, ``position_ids``, each ``[micro_batch, seq]``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from minitron_nemo.errors import UserError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


# ---------------------------------------------------------------------------------------------- tokenizer

class HFTokenizer:
    """Megatron tokenizer interface (duck-typed ``MegatronTokenizerBase``) over ``AutoTokenizer.from_pretrained(path)``.

    ``eod`` (appended after every document) defaults to the tokenizer's EOS token. ``pad`` is -1 (none)
    when the HF pad token equals ``eod``, so that Megatron does not mask real EOD tokens as padding.
    """

    def __init__(self, path, eod: str | int | None = None):
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise UserError(f"tokenizer={path}: not a directory; give a Hugging Face tokenizer or model dir")
        if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise UserError(f"tokenizer={path}: no tokenizer.json / tokenizer_config.json / tokenizer.model there")
        try:
            self.hf = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a Hugging Face tokenizer from {path}: {' '.join(str(e).split())[:300]}")
        self.path = str(path)
        self.eod = self._token_id(self.hf.eos_token if eod is None else eod)
        pad = self.hf.pad_token_id
        self.pad = -1 if pad is None or pad == self.eod else int(pad)
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [self.path]), ("eod", self.eod)])

    def _token_id(self, tok) -> int:
        if tok is None:
            raise UserError(f"tokenizer {self.path} has no EOS token; pass eod=<token>")
        if isinstance(tok, int) or (isinstance(tok, str) and tok.isdigit()):
            return int(tok)
        i = self.hf.convert_tokens_to_ids(tok)
        if i is None or i == self.hf.unk_token_id and tok != self.hf.unk_token:
            raise UserError(f"eod token {tok!r} is not in the vocabulary of {self.path}")
        return int(i)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def vocab(self) -> dict:
        return self.hf.get_vocab()

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as the HF tokenizer makes them (its own BOS policy), no EOD."""
        return self.hf(text, verbose=False)["input_ids"]

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self.hf(texts, verbose=False)["input_ids"]

    def detokenize(self, ids) -> str:
        return self.hf.decode(list(ids))

    def apply_chat_template(self, *args, **kwargs):
        return self.hf.apply_chat_template(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- preprocessing

def expand_inputs(spec: str | list) -> list[Path]:
    """Comma-separated files / globs (or a list of them) -> sorted existing files; UserError when none."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    if not items:
        raise UserError("no input given")
    out = []
    for s in items:
        hits = sorted(glob.glob(os.path.expanduser(str(s))))
        files = [Path(h) for h in hits if Path(h).is_file()]
        if not files:
            raise UserError(f"input not found: {s}")
        out += files
    return out


def iter_documents(paths: list[Path], doc: str = "file", json_key: str = "text") -> Iterator[str]:
    """Documents from text files (``doc`` = file | paragraph | line) or ``.jsonl``/``.json`` lines (``json_key``)."""
    if doc not in ("file", "paragraph", "line"):
        raise UserError(f"doc={doc!r}: expected file, paragraph or line")
    for p in paths:
        if p.suffix in (".jsonl", ".json"):
            with open(p, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{p}:{n}: invalid JSON ({e.msg})")
                    if not isinstance(rec, dict) or json_key not in rec:
                        raise UserError(f"{p}:{n}: no key {json_key!r} (set json_key=...)")
                    yield str(rec[json_key])
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{p} is not utf-8 text")
        if doc == "file":
            parts = [text]
        elif doc == "paragraph":
            parts = re.split(r"\n[ \t]*\n", text)
        else:
            parts = text.splitlines()
        yield from (t for t in parts if t.strip())


def write_indexed_dataset(docs: Iterable[str], tokenizer: HFTokenizer, output_prefix, batch_docs: int = 256,
                          log: Callable[[str], None] | None = None) -> dict:
    """Tokenize ``docs`` (EOD appended to each) into ``output_prefix.bin/.idx``; returns stats.

    Written under temp names and renamed at the end, so an existing dataset stays intact on failure.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp-{os.getpid()}"
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    n_docs = n_tokens = 0
    t0 = last = time.time()
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    try:
        def flush(batch):
            nonlocal n_docs, n_tokens
            for ids in tokenizer.tokenize_batch(batch):
                if not ids or ids[-1] != tokenizer.eod:
                    ids = ids + [tokenizer.eod]
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)

        batch = []
        for d in docs:
            batch.append(d)
            if len(batch) == batch_docs:
                flush(batch)
                batch = []
                if log and time.time() - last > 5:
                    last = time.time()
                    log(f"{n_docs} docs, {n_tokens} tokens, {n_tokens / (last - t0):.0f} tokens/s")
        flush(batch)
        if n_docs == 0:
            raise UserError("the input holds no documents")
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    finally:
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
    dt = max(time.time() - t0, 1e-9)
    return {"docs": n_docs, "tokens": n_tokens, "seconds": dt, "tokens_per_s": n_tokens / dt}


# ---------------------------------------------------------------------------------------------- datasets

def parse_blend(blend) -> tuple[list[str], list[float] | None] | None:
    """Megatron blend: a prefix, ``[prefix, ...]``, or ``[weight, prefix, weight, prefix, ...]`` (list or
    whitespace-separated string) -> ``(prefixes, weights or None)``; checks the files exist."""
    if blend is None:
        return None
    items = blend.split() if isinstance(blend, str) else [str(x) for x in blend]
    if not items:
        raise UserError("empty data blend")

    def is_num(s):
        try:
            float(s)
            return True
        except ValueError:
            return False

    if len(items) % 2 == 0 and all(is_num(w) for w in items[0::2]):
        weights, prefixes = [float(w) for w in items[0::2]], items[1::2]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise UserError(f"blend weights must be >= 0 with a positive sum: {weights}")
    else:
        weights, prefixes = None, items
    for p in prefixes:
        if is_num(p) or not (os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx")):
            raise UserError(f"dataset prefix {p!r}: {p}.bin/.idx not found (run recipes/preprocess_data.py)")
    return [os.path.abspath(p) for p in prefixes], weights


def _fingerprint(prefixes: list[str]) -> str:
    """Identity of the data files (path, size, mtime): index caches of older data are never reused."""
    h = hashlib.md5(usedforsecurity=False)
    for p in sorted(set(prefixes)):
        for ext in (".bin", ".idx"):
            st = os.stat(p + ext)
            h.update(f"{p}{ext}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def build_gpt_datasets(tokenizer: HFTokenizer, seq_length: int, blend=None, blend_per_split=None,
                       split: str = "969,30,1", samples=(None, None, None), seed: int = 1234,
                       cache_dir=None, eod_mask_loss: bool = False,
                       is_built_on_rank: Callable[[], bool] | None = None) -> list:
    """``[train, valid, test]`` Megatron datasets (``GPTDataset``, ``BlendedDataset`` or None per split).

    ``blend``: one blend split by ``split`` ("train,valid,test" weights); or ``blend_per_split``:
    ``[train_blend, valid_blend, test_blend]`` (each may be None). ``samples``: samples per split
    (None: one epoch; needed when a blend has weights). Index caches go to ``cache_dir`` (default:
    ``<dir of first prefix>/index_cache/<fingerprint of the data files>``). Call on every rank.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if (blend is None) == (blend_per_split is None):
        raise UserError("give exactly one of blend and blend_per_split")
    if seq_length < 1:
        raise UserError(f"seq_length must be >= 1, got {seq_length}")
    if blend is not None:
        blend, per_split = parse_blend(blend), None
        prefixes = blend[0]
    else:
        if len(blend_per_split) != 3:
            raise UserError("blend_per_split needs 3 entries: train, valid, test (None to skip)")
        per_split = [parse_blend(b) for b in blend_per_split]
        prefixes = [p for b in per_split if b for p in b[0]]
        split = None
        if not prefixes:
            raise UserError("blend_per_split has no datasets")
    samples = list(samples)
    blends = [blend] * 3 if blend is not None else per_split
    for b, n in zip(blends, samples):
        if b is not None and b[1] is not None and len(b[0]) > 1 and n is None:
            raise UserError("a weighted blend needs a sample count for its split")
    if split is not None:
        _check_split(prefixes, split)
    if cache_dir is None:
        cache_dir = Path(prefixes[0]).parent / "index_cache" / _fingerprint(prefixes)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, blend_per_split=per_split, split=split,
        path_to_cache=str(cache_dir), tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=eod_mask_loss, create_attention_mask=False,
        mid_level_dataset_surplus=0.005)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, samples, is_built_on_rank or (lambda: True), config)
    with _rank0_without_process_group():
        return builder.build()


def _check_split(prefixes: list[str], split: str) -> None:
    """Every split with a positive weight must get documents from every prefix (Megatron loops forever
    on an empty split that is asked for samples)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ValueError, ZeroDivisionError):
        raise UserError(f"split={split!r}: expected up to 3 non-negative weights such as '969,30,1'")
    for p in prefixes:
        n = len(IndexedDataset(p).sequence_lengths)
        for name, bounds in zip(("train", "valid", "test"), matrix):
            if bounds is not None and round(bounds[1] * n) <= round(bounds[0] * n):
                raise UserError(f"split={split!r} leaves no document of {p} ({n} docs) for {name}; "
                                f"use more documents (e.g. preprocess with doc=paragraph) or blend_per_split")


@contextlib.contextmanager
def _rank0_without_process_group():
    """Megatron-Core 0.16.1's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unguarded on an
    index-cache miss; without a process group (plain single process) let it read rank 0."""
    dist = torch.distributed
    if dist.is_initialized():
        yield
        return
    get_rank = dist.get_rank
    dist.get_rank = lambda *a, **k: 0
    try:
        yield
    finally:
        dist.get_rank = get_rank


# ---------------------------------------------------------------------------------------------- batches

def batches(dataset, micro_batch_size: int, dp_rank: int | None = None, dp_size: int | None = None,
            consumed_samples: int = 0, cycle: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches ``{tokens, labels, loss_mask, position_ids}`` (``[micro_batch, seq]``) of ``dataset``.

    Megatron's pretraining sampler: the global stream of samples is cut into steps of
    ``micro_batch_size * dp_size``; data-parallel rank r takes the r-th slice of each. An incomplete
    final step is dropped (``cycle`` restarts from sample 0). DP rank/size default to Megatron's
    parallel state (or 0/1 without it).
    """
    if dp_rank is None or dp_size is None:
        from megatron.core import parallel_state as ps

        init = ps.model_parallel_is_initialized()
        dp_rank = ps.get_data_parallel_rank() if init else 0
        dp_size = ps.get_data_parallel_world_size() if init else 1
    step, n = micro_batch_size * dp_size, len(dataset)
    if step > n:
        raise UserError(f"dataset has {n} samples, fewer than micro_batch x data_parallel = {step}")
    i = consumed_samples % n if cycle else consumed_samples
    while True:
        if i + step > n:
            if not cycle:
                return
            i = 0
        first = i + dp_rank * micro_batch_size
        items = [dataset[j] for j in range(first, first + micro_batch_size)]
        yield {k: torch.stack([s[k] for s in items]) for k in BATCH_KEYS}
        i += step
