"""The teacher pass of ``recipes/cache_teacher.py``: forward the teacher over dataset samples, keep its
top-K per token, write shards (format: ``distill/cache.py``).

Work is split by shard: shard ``s`` of a split belongs to data-parallel rank ``s % DP``; inside a
replica the teacher runs through Megatron's pipeline schedule (any TP x PP) and the last pipeline
stage's TP rank 0 writes the shard. Shards already on disk are skipped, so a killed run resumes.
"""

from __future__ import annotations

import time

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from minitron_nemo import runtime
from minitron_nemo.data.indexed import BATCH_KEYS, PACKED_KEYS
from minitron_nemo.distill import cache
from minitron_nemo.distill.online import token_nll
from minitron_nemo.distill.bucket_kl import teacher_topk
from minitron_nemo.models.forward import run_forward


def micro_batches(samples: list, mbs: int) -> list:
    """Micro-batches of ``mbs`` samples; the last one is padded with copies of its last sample."""
    out = []
    for j in range(0, len(samples), mbs):
        items = samples[j:j + mbs]
        items = items + [items[-1]] * (mbs - len(items))
        out.append({k: torch.stack([s[k] for s in items]) for k in BATCH_KEYS + PACKED_KEYS if k in items[0]})
    return out


def teacher_pass(teacher, samples: list, mbs: int, layout: cache.Layout, tau: float) -> dict | None:
    """Shard arrays of ``samples`` on the writer rank (None elsewhere)."""
    got = []
    group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None

    def keep(logits, batch):
        b, s, v = logits.shape
        if layout.dense:  # every token in vocabulary order: the full log-softmax, no sort
            full = logits if group is None else gather_from_tensor_model_parallel_region(logits)
            lse = torch.logsumexp(full.float() / tau, dim=-1)
            ids, logp = None, full.float() / tau - lse[..., None]
        else:
            ids, logp, lse = teacher_topk(logits.reshape(b * s, v), layout.topk, tau, group)
            ids = ids.view(b, s, -1)
        target = -token_nll(logits, batch["labels"].to(logits.device))
        got.append((ids, logp.reshape(b, s, -1), lse.reshape(b, s), target.float()))

    run_forward(teacher, micro_batches(samples, mbs), keep)
    if not (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0):
        return None
    n = len(samples)
    ids, logp, lse, target = (None if got[0][i] is None else torch.cat([g[i] for g in got])[:n].cpu()
                              for i in range(4))
    return {**({} if ids is None else {"ids": ids}), "logp": logp, "lse": lse, "target": target,
            "hashes": torch.tensor([cache.sample_hash(x["tokens"], x["labels"]) for x in samples], dtype=torch.int64)}


def write_split(teacher, dataset, split: str, samples: int, root, layout: cache.Layout, shard_samples: int,
                mbs: int, tau: float) -> dict:
    """Write the missing shards of ``split`` (samples ``0..samples-1`` of ``dataset``); returns
    ``{"shards", "written", "seconds", "samples"}`` (this rank's share)."""
    total = cache.num_shards(samples, shard_samples)
    done = cache.done_shards(root, split)
    runtime.barrier()  # every rank lists the finished shards before any rank writes one
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    todo = [s for s in range(total) if s % dp == r and s not in done]
    if runtime.is_rank0():
        runtime.print0(f"[cache] {split}: {samples} samples in {total} shards, {len(done & set(range(total)))} "
                       f"already written, {total - len(done & set(range(total)))} to write")
    t0, n_done = time.time(), 0
    for i, s in enumerate(todo):
        first = s * shard_samples
        count = min(shard_samples, samples - first)
        arrays = teacher_pass(teacher, [dataset[j] for j in range(first, first + count)], mbs, layout, tau)
        if arrays is not None:
            cache.write_shard(root, split, s, first, layout, arrays)
        n_done += count
        dt = time.time() - t0
        rate = n_done / max(dt, 1e-9)
        left = sum(min(shard_samples, samples - x * shard_samples) for x in todo[i + 1:])
        runtime.print0(f"[cache] {split} shard {s + 1}/{total}: {rate:.2f} samples/s "
                       f"({rate * layout.seq_length * dp:,.0f} tokens/s over {dp} replicas), ETA {left / rate:.0f}s")
    runtime.barrier()
    return {"shards": total, "written": len(todo), "seconds": time.time() - t0, "samples": n_done}


def teacher_valid_loss(root, split: str, samples: int, shard_samples: int, layout: cache.Layout, dataset) -> float:
    """Mean teacher next-token NLL over the cached samples of ``split`` (from the target log-probs), on the
    tokens the loss counts (each sample's ``loss_mask`` in ``dataset``: answer tokens of conversations, no
    padding), as the online check (``models.forward.lm_loss_sums``) counts them."""
    import numpy as np

    total, count = 0.0, 0.0
    for s in range(cache.num_shards(samples, shard_samples)):
        n = min(shard_samples, samples - s * shard_samples)
        shape, dtype = layout.shapes(n)["target"]
        a = np.fromfile(cache.shard_dir(root, split, s) / "target.bin", dtype=dtype).reshape(shape).astype(np.float64)
        mask = np.stack([np.asarray(dataset[s * shard_samples + j]["loss_mask"], dtype=np.float64) for j in range(n)])
        total += -float((a * mask.reshape(a.shape)).sum())
        count += float(mask.sum())
    return total / max(count, 1.0)
