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
import struct
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from minitron_nemo.errors import UserError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
PACKED_KEYS = ("segment_ids",)  # packed samples (data/chat_samples.py): the document of each position


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
        """``eod`` as a token id: an int / integer string in ``0..vocab_size-1``, or a token of the vocabulary."""
        n = len(self.hf)
        allowed = f"allowed: a token id 0..{n - 1} or a token string of the vocabulary of {self.path}"
        if tok is None:
            raise UserError(f"tokenizer {self.path} has no EOS token; pass eod=<token> ({allowed})")
        if isinstance(tok, (int, np.integer)) or (isinstance(tok, str) and re.fullmatch(r"[+-]?\d+", tok.strip())):
            i = int(tok)
            if not 0 <= i < n:
                raise UserError(f"eod={tok} is out of range; {allowed}")
            return i
        i = self.hf.convert_tokens_to_ids(tok)
        if i is None or i == self.hf.unk_token_id and tok != self.hf.unk_token:
            raise UserError(f"eod={tok!r} is not a token of the vocabulary; {allowed}")
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
        if not texts:  # HF fast tokenizers raise IndexError on an empty batch
            return []
        return self.hf(list(texts), verbose=False)["input_ids"]

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


def _utf8_error(p: Path, e: UnicodeDecodeError, line: int | None = None) -> UserError:
    where = f"line {line}: byte 0x{e.object[e.start]:02x} at byte {e.start} of the line" if line is not None \
        else f"byte 0x{e.object[e.start]:02x} at offset {e.start}"
    return UserError(f"input {p} is not UTF-8 text ({where}); allowed: UTF-8 text or JSONL files "
                     f"(convert with iconv -t UTF-8)")


def _read_error(p: Path, e: OSError) -> UserError:
    return UserError(f"cannot read input {p}: {e.strerror or e}")


def _jsonl_documents(p: Path, json_key: str) -> Iterator[str]:
    """One document per non-blank line of a JSONL file: the string under ``json_key`` of a JSON object."""
    try:
        with open(p, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise _utf8_error(p, e, n)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{p}:{n}: invalid JSON ({e.msg}, column {e.colno}); "
                                    f"allowed: one JSON object per line")
                if not isinstance(rec, dict):
                    raise UserError(f"{p}:{n}: a JSON {type(rec).__name__}, not an object; "
                                    f"allowed: one JSON object per line with the text under {json_key!r}")
                if json_key not in rec:
                    keys = ", ".join(map(repr, list(rec)[:8])) or "none"
                    raise UserError(f"{p}:{n}: no key {json_key!r} (keys: {keys}); set json_key=...")
                text = rec[json_key]
                if not isinstance(text, str):
                    raise UserError(f"{p}:{n}: {json_key!r} is a JSON {type(text).__name__}; allowed: a string")
                if "\\u" in line:  # escaped lone surrogates decode to str but are not valid text
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise UserError(f"{p}:{n}: {json_key!r} holds an unpaired UTF-16 surrogate escape; "
                                        f"allowed: valid Unicode text")
                yield text
    except OSError as e:
        raise _read_error(p, e)


def iter_documents(paths: list[Path], doc: str = "file", json_key: str = "text") -> Iterator[str]:
    """Documents from text files (``doc`` = file | paragraph | line) or ``.jsonl``/``.json`` lines (``json_key``).

    Bad input (not UTF-8, invalid JSON, a line without a string under ``json_key``) raises a
    ``UserError`` naming the file (and line).
    """
    if doc not in ("file", "paragraph", "line"):
        raise UserError(f"doc={doc!r}: expected file, paragraph or line")
    for p in map(Path, paths):
        if p.suffix in (".jsonl", ".json"):
            yield from _jsonl_documents(p, json_key)
            continue
        try:
            text = p.read_bytes().decode("utf-8-sig")
            text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads
        except UnicodeDecodeError as e:
            raise _utf8_error(p, e)
        except OSError as e:
            raise _read_error(p, e)
        if doc == "file":
            parts = [text]
        elif doc == "paragraph":
            parts = re.split(r"\n[ \t]*\n", text)
        else:
            parts = text.splitlines()
        yield from (t for t in parts if t.strip())


@contextlib.contextmanager
def atomic_indexed(prefixes: dict):
    """``IndexedDatasetBuilder`` per output prefix (``{prefix: numpy dtype}``), written under temp names and
    renamed together when the block ends without an error; on any failure (bad input, disk full, interrupt)
    the temp files are removed and existing outputs stay intact. An ``OSError`` while writing (e.g. ENOSPC)
    becomes a ``UserError`` naming the output. Yields ``{prefix: builder}``."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tmps = {str(p): f"{p}.tmp-{os.getpid()}" for p in prefixes}
    builders = {}
    try:
        for p, dtype in prefixes.items():
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            builders[str(p)] = IndexedDatasetBuilder(tmps[str(p)] + ".bin", dtype=dtype)
        yield builders
        for p, b in builders.items():
            b.finalize(tmps[p] + ".idx")  # closes the .bin, writes the .idx
        for p, tmp in tmps.items():
            os.replace(tmp + ".bin", p + ".bin")
            os.replace(tmp + ".idx", p + ".idx")
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        names = ", ".join(f"{p}.bin/.idx" for p in tmps)
        raise UserError(f"cannot write the dataset {names}{where}: {e.strerror or e}") from None
    finally:
        for b in builders.values():
            with contextlib.suppress(OSError):  # closing may fail again on a full disk
                b.data_file.close()
        for tmp in tmps.values():
            for ext in (".bin", ".idx"):
                with contextlib.suppress(OSError):
                    os.remove(tmp + ext)


def write_indexed_dataset(docs: Iterable[str], tokenizer: HFTokenizer, output_prefix, batch_docs: int = 256,
                          log: Callable[[str], None] | None = None, source: str | None = None) -> dict:
    """Tokenize ``docs`` (EOD appended to each) into ``output_prefix.bin/.idx`` (``atomic_indexed``);
    returns stats. No documents at all is a ``UserError`` (naming ``source``, the input's description): a
    0-document dataset cannot train.
    """
    from megatron.core.datasets.indexed_dataset import DType

    if batch_docs < 1:
        raise ValueError(f"batch_docs must be >= 1, got {batch_docs}")
    prefix = str(output_prefix)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    n_docs = n_tokens = 0
    t0 = last = time.time()

    with atomic_indexed({prefix: dtype}) as builders:
        builder = builders[prefix]

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
            if len(batch) >= batch_docs:
                flush(batch)
                batch = []
                if log and time.time() - last > 5:
                    last = time.time()
                    log(f"{n_docs} docs, {n_tokens} tokens, {n_tokens / (last - t0):.0f} tokens/s")
        if batch:  # the remainder; none when the count is a multiple of batch_docs
            flush(batch)
        if n_docs == 0:
            raise UserError(f"{source or 'the input'} holds no documents (only empty or blank text); "
                            f"allowed: input with at least one non-blank document")
    dt = max(time.time() - t0, 1e-9)
    return {"docs": n_docs, "tokens": n_tokens, "seconds": dt, "tokens_per_s": n_tokens / dt}


# ---------------------------------------------------------------------------------------------- datasets

_IDX_MAGIC = b"MMIDIDX\x00\x00"  # Megatron's _INDEX_HEADER; then <Q version 1, <B dtype, <Q sequences, <Q documents
_IDX_HEAD = 9 + 8 + 1 + 8 + 8
_IDX_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # Megatron DType code -> item size


def check_indexed_prefix(prefix) -> dict:
    """Check that ``prefix.bin/.idx`` is a readable Megatron indexed dataset, else ``UserError`` naming the file.

    Checks the ``.idx`` magic header, version and dtype code, that its length matches the sequence and
    document counts it declares, that sequence lengths / pointers / document indices are consistent, and
    that the ``.bin`` is exactly as long as the index says. Megatron itself would fail on such files
    with an assertion, a numpy buffer error or an out-of-range read deep inside a dataset build.
    Returns ``{"sequences", "documents", "tokens", "dtype_size"}``.
    """
    prefix = str(prefix)
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    hint = "allowed: a PREFIX.bin/.idx pair written by recipes/preprocess_data.py (re-run it)"
    for f in (idx, bin_):
        if not os.path.isfile(f):
            raise UserError(f"dataset prefix {prefix!r}: {f} not found (run recipes/preprocess_data.py)")

    def bad(what, f=idx):
        return UserError(f"{f} is corrupt or truncated: {what}; {hint}")

    try:
        idx_size, bin_size = os.path.getsize(idx), os.path.getsize(bin_)
        with open(idx, "rb") as fh:
            head = fh.read(_IDX_HEAD)
        if len(head) < len(_IDX_MAGIC) or head[:len(_IDX_MAGIC)] != _IDX_MAGIC:
            raise bad(f"no Megatron index header (starts with {head[:len(_IDX_MAGIC)]!r})")
        if len(head) < _IDX_HEAD:
            raise bad(f"{idx_size} bytes, shorter than the {_IDX_HEAD}-byte header")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(_IDX_MAGIC):])
        if version != 1:
            raise bad(f"index version {version}, only version 1 is supported")
        if code not in _IDX_DTYPE_SIZES:
            raise bad(f"unknown token dtype code {code}")
        expect = _IDX_HEAD + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if idx_size not in (expect, expect + n_seq):  # + n_seq: per-sequence modes of multimodal data
            raise bad(f"{idx_size} bytes, but its {n_seq} sequences and {n_doc} document boundaries need {expect}")
        if n_seq == 0 or n_doc < 2:
            raise bad("it holds no documents")
        lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=_IDX_HEAD, shape=(n_seq,))
        pointers = np.memmap(idx, dtype=np.int64, mode="r", offset=_IDX_HEAD + 4 * n_seq, shape=(n_seq,))
        doc_idx = np.memmap(idx, dtype=np.int64, mode="r", offset=_IDX_HEAD + 12 * n_seq, shape=(n_doc,))
        item = _IDX_DTYPE_SIZES[code]
        if lengths.min() < 0:
            raise bad("a negative sequence length")
        ends = np.cumsum(lengths, dtype=np.int64) * item
        if pointers[0] != 0 or not np.array_equal(pointers[1:], ends[:-1]):
            raise bad("sequence pointers do not match the sequence lengths")
        if doc_idx[0] != 0 or doc_idx[-1] != n_seq or np.any(np.diff(doc_idx) < 0):
            raise bad("document indices are not an increasing list from 0 to the sequence count")
        need = int(ends[-1])
        del lengths, pointers, doc_idx
    except OSError as e:
        raise UserError(f"cannot read the dataset {prefix}.bin/.idx: {e.strerror or e}")
    if bin_size != need:
        raise bad(f"{bin_size} bytes, but {idx} indexes {need} bytes "
                  f"({'truncated' if bin_size < need else 'not the .bin this index was written with'})", bin_)
    return {"sequences": int(n_seq), "documents": int(n_doc) - 1, "tokens": need // item, "dtype_size": item}


def parse_blend(blend) -> tuple[list[str], list[float] | None] | None:
    """Megatron blend: a prefix, ``[prefix, ...]``, or ``[weight, prefix, weight, prefix, ...]`` (list or
    whitespace-separated string) -> ``(prefixes, weights or None)``; checks the files exist and are
    readable datasets (``check_indexed_prefix``: every dataset the project opens goes through here)."""
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
        check_indexed_prefix(p)
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
    """Micro-batches ``{tokens, labels, loss_mask, position_ids}`` (``[micro_batch, seq]``) of ``dataset``,
    plus ``index`` (``[micro_batch]``, the samples' indices in ``dataset``).

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
        batch = {k: torch.stack([s[k] for s in items]) for k in BATCH_KEYS + PACKED_KEYS if k in items[0]}
        batch["index"] = torch.arange(first, first + micro_batch_size)  # dataset sample ids (teacher cache)
        yield batch
        i += step
