"""Teacher cache: the teacher's top-K distribution per token, on disk, for offline distillation.

``recipes/cache_teacher.py`` writes it, ``recipes/distill.py distill.teacher_cache=DIR`` reads it. Layout::

    DIR/manifest.json          written last, by rank 0: the cache is complete only when it exists
    DIR/identity.json          what the cache is of (written first; a re-run with other settings is refused)
    DIR/{train,valid}/NNNNN/   one shard of ``cache.shard_samples`` consecutive dataset samples:
        ids.bin     [n, seq, K]  token ids, by descending teacher probability (uint16 when the padded
                                 vocabulary fits, else int32)
        logp.bin    [n, seq, K]  the teacher's log-probabilities of those ids (``cache.dtype``)
        lse.bin     [n, seq]     fp32 log-normaliser of the full distribution of logits / tau
        target.bin  [n, seq]     fp32 teacher log-probability (tau = 1) of the next token (teacher LM loss)
        hashes.bin  [n]          int64 digest of each sample's tokens (the job checks it has the same data)
        shard.json  first sample, count, shapes
    A whole-vocabulary cache (K = the padded vocabulary) is *dense*: no ids.bin, and logp.bin holds
    every token's log-probability in vocabulary order (no sort when writing, no gather when training).

Samples are addressed by their index in the GPT dataset that ``distill.py`` builds from the same
config (same blend, seed, sequence length and sample count), so a cache does not depend on the
parallel layout or micro-batch size of either job. Log-probabilities rather than raw logits are
stored: the likely tokens then have values near 0, where bf16/fp16 rounding is smallest, and the
logits are ``logp + lse``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minitron_nemo import outputs, readers
from minitron_nemo.checkpoint import store
from minitron_nemo.errors import UserError
from minitron_nemo.models.config import DTYPES  # the cached log-probabilities' dtype
from minitron_nemo.training import faults

FORMAT = 1
SPLITS = ("train", "valid")
MANIFEST, IDENTITY = "manifest.json", "identity.json"


def sample_hash(tokens: torch.Tensor, labels: torch.Tensor) -> int:
    """A 63-bit digest of one sample's input and label tokens."""
    data = np.ascontiguousarray(torch.cat([tokens.reshape(-1), labels.reshape(-1)[-1:]]).numpy().astype(np.int64))
    return int.from_bytes(hashlib.blake2b(data.tobytes(), digest_size=8).digest(), "little") >> 1


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:,.1f} TiB"


def teacher_fingerprint(path) -> str:
    """SHA-256 over the teacher's model config and, for each of its (non-hidden) files, name, size and
    the first and last MiB: a different checkpoint changes it; reading it costs a few MiB per file."""
    p = Path(path)
    h = hashlib.sha256(json.dumps(store.model_config_of(p).to_dict(), sort_keys=True).encode())
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if f != p else f.name}:{size}".encode())
        with readers.reading(f, "teacher file"), open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()


@dataclass(frozen=True)
class Layout:
    """Shapes and dtypes of one cache's arrays."""
    topk: int
    seq_length: int
    dtype: str
    padded_vocab_size: int

    @property
    def dense(self) -> bool:
        """The whole vocabulary, in vocabulary order (no ids)."""
        return self.topk == self.padded_vocab_size

    @property
    def id_dtype(self):
        return np.uint16 if self.padded_vocab_size <= 1 << 16 else np.int32

    @property
    def bytes_per_token(self) -> int:
        ids = 0 if self.dense else np.dtype(self.id_dtype).itemsize
        return self.topk * (ids + DTYPES[self.dtype].itemsize) + 8

    def shapes(self, n: int) -> dict:
        s, k = self.seq_length, self.topk
        shapes = {"ids": ((n, s, k), self.id_dtype), "logp": ((n, s, k), np.uint16 if DTYPES[self.dtype].itemsize == 2
                                                              else np.float32),
                  "lse": ((n, s), np.float32), "target": ((n, s), np.float32), "hashes": ((n,), np.int64)}
        if self.dense:
            del shapes["ids"]
        return shapes


def num_shards(samples: int, shard_samples: int) -> int:
    return math.ceil(samples / shard_samples) if samples else 0


def spread(n: int, count: int) -> list:
    """Up to ``count`` indices spread evenly over ``0..n-1``, the first and the last among them (all if
    ``n <= count``)."""
    m = min(count, n)
    return sorted({round(j * (n - 1) / max(m - 1, 1)) for j in range(m)})


def shard_dir(root, split: str, s: int) -> Path:
    return Path(root) / split / f"{s:05d}"


def done_shards(root, split: str) -> set:
    d = Path(root) / split
    return {int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "shard.json").is_file()} if d.is_dir() else set()


def clean_partial(root) -> None:
    """Remove shards a killed run left half-written (hidden temp dirs)."""
    for split in SPLITS:
        d = Path(root) / split
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".") and ".tmp" in p.name:
                    shutil.rmtree(p, ignore_errors=True)


def _to_numpy(x: torch.Tensor, np_dtype) -> np.ndarray:
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.contiguous().view(torch.int16).numpy().view(np.uint16)
    return x.numpy().astype(np_dtype, copy=False)


def write_shard(root, split: str, s: int, first: int, layout: Layout, arrays: dict) -> Path:
    """Write one shard into a hidden temp dir and rename it into place (atomic; a kill leaves no shard)."""
    final = shard_dir(root, split, s)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    n = int(arrays["hashes"].shape[0])
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for name, (shape, np_dtype) in layout.shapes(n).items():
            a = arrays[name]
            if name == "logp":
                a = a.to(DTYPES[layout.dtype])
            a = _to_numpy(a.cpu(), np_dtype) if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np_dtype)
            if a.shape != shape:
                raise RuntimeError(f"shard array {name} has shape {a.shape}, expected {shape}")
            a.tofile(tmp / f"{name}.bin")
        (tmp / "shard.json").write_text(json.dumps({"first": first, "count": n}))
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = outputs.write_error(e, final.parent)
        if err is not None:
            raise err from None
        raise
    return final


# ----------------------------------------------------------------------------- identity
# Keys a job must match (the cache's own choices, K and dtype, are not among them)
MATCH = ("format", "teacher_fingerprint", "tokenizer", "seq_length", "seed", "split", "temperature",
         "padded_vocab_size", "train_samples", "valid_samples")


def check_match(cache_id: dict, job_id: dict, where) -> None:
    """One-line error naming the first key where a cache and a job differ."""
    for k in MATCH:
        if cache_id.get(k) != job_id.get(k):
            a, b = cache_id.get(k), job_id.get(k)
            if k == "teacher_fingerprint":
                raise UserError(f"distill.teacher_cache={where} was written from teacher {cache_id.get('teacher')} "
                                f"and this job's teacher {job_id.get('teacher')} differs (another checkpoint); "
                                f"allowed: a cache of this teacher (recipes/cache_teacher.py with this config)")
            raise UserError(f"distill.teacher_cache={where} does not match this job: {k} is {a!r} in the cache "
                            f"and {b!r} here; allowed: a cache written by recipes/cache_teacher.py with this "
                            f"job's config")


# ----------------------------------------------------------------------------- values
def sum_tolerance(dtype: str, padded_vocab_size: int) -> float:
    """How far above 0 the log of the cached probabilities' sum may round: each log-probability is off by
    at most half an ulp of its ``dtype`` relative to itself, which moves the log-sum by at most the
    distribution's entropy (at most ln V) times that."""
    return max(1e-4, float(torch.finfo(DTYPES[dtype]).eps) * math.log(padded_vocab_size))


def bad_values(logp: torch.Tensor, lse: np.ndarray, target: np.ndarray, tol: float) -> tuple[str, str] | None:
    """``(file, what)`` if one sample's cached values cannot be a teacher's: log-probabilities ``[s, K]``
    not finite or above 0, or whose probabilities sum above 1 (+ rounding ``tol``); a non-finite
    normaliser; a next-token log-probability not finite or above 0. None if they can."""
    if not bool(torch.isfinite(logp).all()):
        return "logp.bin", "non-finite log-probabilities"
    if bool((logp > 0).any()):
        return "logp.bin", f"log-probabilities above 0 (up to {float(logp.max()):.4g})"
    total = float(torch.logsumexp(logp, dim=-1).max()) if logp.numel() else -math.inf
    if total > tol:
        return "logp.bin", f"probabilities summing to {math.exp(min(total, 700.0)):.4g} > 1"
    if not np.isfinite(lse).all():
        return "lse.bin", "a non-finite log-normaliser"
    if not np.isfinite(target).all() or (target > tol).any():
        return "target.bin", "next-token log-probabilities that are not finite or above 0"
    return None


# ----------------------------------------------------------------------------- reading
class TeacherCache:
    """A complete cache opened for training: ``lookup(split, index, tokens, labels)`` per micro-batch."""

    def __init__(self, root, topk: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"distill.teacher_cache={root} does not exist; allowed: a directory written by "
                            f"recipes/cache_teacher.py")
        if not (self.root / MANIFEST).is_file():
            raise UserError(f"distill.teacher_cache={root} is incomplete (no {MANIFEST}: its cache_teacher run "
                            f"did not finish); allowed: a complete cache (re-run recipes/cache_teacher.py to finish it)")
        self.manifest = readers.read_json(self.root / MANIFEST, "teacher cache manifest")
        m = self.manifest
        try:
            self.identity = dict(m["identity"])
            self.layout = Layout(int(m["topk"]), int(m["identity"]["seq_length"]), str(m["dtype"]),
                                 int(m["identity"]["padded_vocab_size"]))
            self.shard_samples = int(m["shard_samples"])
            self.samples = {s: int(m["splits"][s]["samples"]) for s in SPLITS}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"cannot read teacher cache manifest {self.root / MANIFEST}: missing or bad "
                            f"field {e}") from None
        if self.layout.dtype not in DTYPES:
            raise UserError(f"teacher cache {self.root}: dtype {self.layout.dtype!r} is not one of {', '.join(sorted(DTYPES))}")
        k = self.layout.topk if topk is None else int(topk)
        if self.layout.dense and k != self.layout.topk:
            raise UserError(f"distill.teacher_cache_topk={topk} but the cache {root} holds the whole vocabulary in "
                            f"vocabulary order; allowed: null (or a top-K cache: cache.topk=K)")
        if not 1 <= k <= self.layout.topk:
            raise UserError(f"distill.teacher_cache_topk={topk} but the cache {root} holds the top "
                            f"{self.layout.topk} tokens; allowed: 1..{self.layout.topk} or null (all)")
        self.topk = k
        self._open = {}

    def check_complete(self) -> None:
        """Every shard the manifest names is on disk with files of the right size."""
        for split in SPLITS:
            n = self.samples[split]
            for s in range(num_shards(n, self.shard_samples)):
                self._shard(split, s)

    def _shard(self, split: str, s: int) -> dict:
        key = (split, s)
        if key not in self._open:
            d = shard_dir(self.root, split, s)
            count = min(self.shard_samples, self.samples[split] - s * self.shard_samples)
            arrays = {}
            for name, (shape, np_dtype) in self.layout.shapes(count).items():
                f = d / f"{name}.bin"
                want = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
                with readers.reading(f, "teacher cache shard"):
                    size = f.stat().st_size
                    if size != want:
                        raise ValueError(f"{size} bytes, expected {want} (truncated or from another cache)")
                    arrays[name] = np.memmap(f, dtype=np_dtype, mode="r", shape=shape)
            self._open[key] = arrays
        return self._open[key]

    def _rows(self, split: str, index) -> list:
        n = self.samples[split]
        out = []
        for i in (int(x) for x in index):
            if not 0 <= i < n:
                raise UserError(f"teacher cache {self.root} holds {n} {split} samples but the job asks for sample "
                                f"{i}; allowed: a cache written with this job's config")
            out.append((i // self.shard_samples, i % self.shard_samples, i))
        return out

    def hashes(self, split: str, index) -> list:
        return [int(self._shard(split, s)["hashes"][r]) for s, r, _ in self._rows(split, index)]

    def _logp(self, a: dict, r: int) -> torch.Tensor:
        """Sample row ``r``'s first ``topk`` log-probabilities ``[s, K]`` in fp32."""
        lp = torch.from_numpy(np.array(a["logp"][r, :, :self.topk]))
        return lp.view(DTYPES[self.layout.dtype]).float() if DTYPES[self.layout.dtype].itemsize == 2 else lp

    def fault(self, split: str, i: int, logp: torch.Tensor | None = None) -> str | None:
        """What is wrong with the cached values of ``split`` sample ``i`` (naming its shard file), or None."""
        (s, r, _), = self._rows(split, [i])
        a = self._shard(split, s)
        logp = self._logp(a, r) if logp is None else logp
        bad = bad_values(logp, a["lse"][r], a["target"][r], sum_tolerance(self.layout.dtype,
                                                                             self.layout.padded_vocab_size))
        if bad is None:
            return None
        return (f"teacher cache shard file {shard_dir(self.root, split, s) / bad[0]} holds {bad[1]} in {split} "
                f"sample {i}, which no teacher gives (a damaged file)")

    def check_values(self, split: str, count: int = 64) -> None:
        """Before compute: the values of the first sample of up to ``count`` shards spread over ``split``
        (a damaged shard file is refused at once; every sample is checked again when training reads it)."""
        for s in spread(num_shards(self.samples[split], self.shard_samples), count):
            why = self.fault(split, s * self.shard_samples)
            if why is not None:
                raise UserError(f"distill.teacher_cache={self.root}: {why}; allowed: a cache written by "
                                f"recipes/cache_teacher.py (delete the shard's directory and "
                                f"{MANIFEST}, then re-run it to write the shard again)")

    def lookup(self, split: str, index, tokens=None, labels=None, device=None) -> dict:
        """``{"ids" [b, s, K] int64, "logp" [b, s, K] fp32, "target" [b, s] fp32}`` of the samples (dense: no
        ``ids`` and ``logp`` ``[b, s, V]`` in vocabulary order)
        ``index``; with ``tokens``/``labels``, checks they are the cached samples' tokens."""
        ids, logp, target = [], [], []
        k = self.topk
        for j, (s, r, i) in enumerate(self._rows(split, index)):
            a = self._shard(split, s)
            if tokens is not None and sample_hash(tokens[j], labels[j]) != int(a["hashes"][r]):
                raise UserError(f"the tokens of {split} sample {i} differ from those in the teacher cache "
                                f"{self.root} (other data, tokenizer or seed); allowed: a cache written with "
                                f"this job's data")
            if not self.layout.dense:
                ids.append(torch.from_numpy(a["ids"][r, :, :k].astype(np.int64)))
            logp.append(self._logp(a, r))
            why = self.fault(split, i, logp[-1])
            if why is not None:  # the training loop stops every rank before the optimizer steps
                faults.note(why)
            target.append(torch.from_numpy(np.array(a["target"][r])))
        out = {"logp": torch.stack(logp), "target": torch.stack(target), **({"ids": torch.stack(ids)} if ids else {})}
        if device is None:
            return out
        if torch.device(device).type == "cuda":  # page-locked: the copies are queued without a host wait
            return {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
        return {k: v.to(device) for k, v in out.items()}
