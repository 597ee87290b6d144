"""Offline distillation: the training loop's forward/loss pair when the teacher is a cache.

The student runs alone (plain DDP chunk, any TP x PP x DP); on the last pipeline stage the forward
also looks up the cached teacher distribution of the micro-batch's samples (by their dataset index),
and the loss is ``bucket_kl``'s KL over the cached ids plus the rest bucket (a whole-vocabulary cache:
the online kernel ``losses.logits_kl_loss`` on the cached log-probabilities). Validation reports
the same keys as online distillation (student LM loss, KD loss, teacher LM loss from the cached
target log-probabilities).

Job checks, in the order the recipe can make them: the cache's identity against the job's config
(teacher, tokenizer, sequence length, seed, temperature, vocabulary) before any compute, then, once the
datasets exist, the sample counts and the tokens of samples spread over the cache.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from minitron_nemo import runtime
from minitron_nemo.checkpoint import store
from minitron_nemo.distill import cache
from minitron_nemo.distill.config import DistillationConfig
from minitron_nemo.distill.losses import _masked, balance, logits_kl_loss, resolve_tp_group
from minitron_nemo.distill.online import token_nll
from minitron_nemo.distill.bucket_kl import bucket_kl_of, student_nll_and_logprobs
from minitron_nemo.errors import UserError
from minitron_nemo.models.packing import model_inputs


def identity(cfg, kd_cfg: DistillationConfig, t_path, t_mc) -> dict:
    """What a cache of this job's teacher pass must be (sample counts are added once datasets exist)."""
    d = cfg.data
    return {"format": cache.FORMAT, "teacher": str(t_path), "teacher_fingerprint": cache.teacher_fingerprint(t_path),
            "tokenizer": store.tokenizer_digest(t_path), "data_source": d.source, "seq_length": int(d.seq_length),
            "seed": int(cfg.seed), "split": str(d.split) if d.source in ("indexed", "chat") else None,
            "temperature": float(kd_cfg.logit_kl_temperature), "padded_vocab_size": t_mc.padded_vocab_size}


def sample_counts(cfg, train_ds, valid_ds, train_samples: int) -> dict:
    """Samples of each split a job of this config can read: the train stream stays below
    ``min(len, train_samples)``; validation below ``max(valid_samples, global batch)``."""
    valid = 0 if valid_ds is None else min(len(valid_ds), max(int(cfg.data.valid_samples),
                                                              int(cfg.trainer.global_batch_size)))
    return {"train_samples": min(len(train_ds), int(train_samples)), "valid_samples": valid}


def open_for_job(cfg, kd_cfg: DistillationConfig, t_path, t_mc) -> cache.TeacherCache:
    """Open ``distill.teacher_cache`` and check it against the job (before any compute)."""
    tc = cache.TeacherCache(kd_cfg.teacher_cache, kd_cfg.teacher_cache_topk)
    job = identity(cfg, kd_cfg, t_path, t_mc)
    cache.check_match(tc.identity, {**job, **{k: tc.identity.get(k) for k in ("train_samples", "valid_samples")}},
                      kd_cfg.teacher_cache)
    tc.check_complete()
    return tc


def check_data(tc: cache.TeacherCache, counts: dict, train_ds, valid_ds, spread: int = 64) -> None:
    """Sample counts, then the tokens of up to ``spread`` samples per split spread over the cache and the
    values of the first sample of up to ``spread`` shards per split."""
    cache.check_match(tc.identity, {**tc.identity, **counts}, tc.root)
    for split, ds in (("train", train_ds), ("valid", valid_ds)):
        n = tc.samples[split]
        if not n:
            continue
        tc.check_values(split, spread)
        idx = cache.spread(n, spread)
        want = tc.hashes(split, idx)
        for i, h in zip(idx, want):
            s = ds[i]
            if cache.sample_hash(s["tokens"], s["labels"]) != h:
                raise UserError(f"distill.teacher_cache={tc.root}: {split} sample {i} has other tokens than this "
                                f"job's data (another data file, tokenizer or preprocessing); allowed: a cache "
                                f"written by recipes/cache_teacher.py with this job's data")


def tag_valid(batches: list) -> list:
    """Validation micro-batches look up the cache's ``valid`` split."""
    return [dict(b, split="valid") for b in batches]


def make_forward(tc: cache.TeacherCache):
    def forward(model, batch):
        device = runtime.device()
        last = parallel_state.is_pipeline_last_stage()
        # The lookup (host work, then a copy the device queues) before the student's forward is queued: on a
        # GPU it then overlaps the work already queued instead of waiting for the forward to finish.
        cached = tc.lookup(batch.get("split", "train"), batch["index"], batch["tokens"], batch["labels"],
                           device) if last else None
        args, kwargs = model_inputs(batch, device)
        out = model(*args, **kwargs)
        return {"student": out, "cached": cached} if last else out
    return forward


def _lm_and_kl(kd_cfg: DistillationConfig, s, labels, cached, mask):
    """(student LM loss, KD loss) of one micro-batch against its cached teacher: over the cached ids plus the rest
    bucket, the NLL and the ids' log-probabilities from one pass over the logits; a whole-vocabulary cache takes the
    online kernel on this rank's vocabulary shard."""
    b, sl, v = s.shape
    group, tau = resolve_tp_group(), float(kd_cfg.logit_kl_temperature)
    if "ids" not in cached:
        lm = _masked(token_nll(s, labels), mask).loss
        lo = (0 if group is None else torch.distributed.get_rank(group)) * v
        teacher = cached["logp"][..., lo:lo + v] * tau  # log-probabilities at tau, as logits the kernel divides
        return lm, logits_kl_loss(s, teacher, mask, temperature=tau, reverse=kd_cfg.reverse_kl,
                                  chunk_size=kd_cfg.kl_chunk_size, tp_group=group).loss
    nll, ls = student_nll_and_logprobs(s.reshape(b * sl, v), labels.reshape(-1), cached["ids"].reshape(b * sl, -1),
                                       tau, group, kd_cfg.kl_chunk_size)
    per = bucket_kl_of(ls, cached["logp"].reshape(b * sl, -1), tau, kd_cfg.reverse_kl)
    return _masked(nll.view(b, sl), mask).loss, _masked(per.view(b, sl), mask).loss


def loss(kd_cfg: DistillationConfig, batch, output):
    """Training loss of one micro-batch: as ``distill.online.kd_loss`` with the cached teacher."""
    s = output["student"]
    mask = batch["loss_mask"].to(s.device).float()
    lm, kl = _lm_and_kl(kd_cfg, s, batch["labels"].to(s.device), output["cached"], mask)
    total = balance(kl, None, lm, skip_lm_loss=kd_cfg.skip_lm_loss, kd_loss_scale=kd_cfg.kd_loss_scale)
    return total, {"lm": lm.detach().float(), "logits": kl.detach().float(), "total": total.detach().float()}


def valid_loss(kd_cfg: DistillationConfig, batch, output):
    """Validation: student LM loss, KD loss against the cache, teacher LM loss from the cache."""
    s, c = output["student"], output["cached"]
    mask = batch["loss_mask"].to(s.device).float()
    lm, kl = _lm_and_kl(kd_cfg, s, batch["labels"].to(s.device), c, mask)
    metrics = {"student_lm": lm.detach(), "kd": kl.detach(), "teacher_lm": _masked(-c["target"], mask).loss}
    return metrics["kd"], metrics


def teacher_perplexity(tc: cache.TeacherCache, test_text, seq_length: int, test_tokens) -> float:
    """The teacher's held-out perplexity that cache_teacher.py measured on the same test windows (NaN if
    it measured none or other windows)."""
    h = tc.manifest.get("teacher_held_out") or {}
    same = (h.get("text") == (str(test_text) if test_text else None) and h.get("tokens") == test_tokens
            and h.get("seq_length") == seq_length)
    return float(h["perplexity"]) if same and "perplexity" in h else float("nan")
