"""Cache the teacher's top-K distribution per token, for offline distillation without the teacher.

    python recipes/cache_teacher.py --config-name JOB cache.dir=DIR cache.topk=64 [key=value ...]
    torchrun --nproc_per_node=N recipes/cache_teacher.py --config-name JOB cache.dir=DIR parallel.tensor_model_parallel_size=2
    python recipes/distill.py --config-name JOB distill.teacher_cache=DIR     # trains without loading the teacher

Same job config as ``recipes/distill.py``: the teacher (the corrected one when it exists), the data
(blend, split, seed, sequence length) and the number of training samples (``trainer.train_iters`` or
``train_tokens`` x global batch) decide which samples are cached, so the cache holds exactly the
token stream and validation samples that distill.py reads with that config. Per token: the top
``cache.topk`` token ids (null = the whole vocabulary), their log-probabilities (``cache.dtype``), the
fp32 log-normaliser, and the fp32 log-probability of the next token. Shards are written atomically;
a killed run resumes at the first missing shard. ``DIR/manifest.json`` appears last, when complete.
"""

import json
import math
import shutil
import time
from pathlib import Path

from minitron_nemo import outputs, runtime, schemas
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose_job, dtype
from minitron_nemo.data.windows import load_tokenizer, tiled_windows
from minitron_nemo.distill import cache, cache_writer, offline
from minitron_nemo.distill import online as kd
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError
from minitron_nemo.eval import perplexity as ppl
from minitron_nemo.models.builder import grouped_gemm_default
from minitron_nemo.readers import read_json
from minitron_nemo.training import data as tdata
from minitron_nemo.training import optim
from minitron_nemo.training.setup import check_model_shape, teacher_source


def existing_identity(root: Path, want: dict, overwrite: bool) -> None:
    """A cache dir of other settings is refused (or, with ``overwrite=true``, emptied of its shards)."""
    f = root / cache.IDENTITY
    if not f.is_file():
        return
    have = read_json(f, "teacher cache identity")
    diff = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    if not diff:
        return
    if not overwrite:
        k = diff[0]
        raise UserError(f"cache.dir={root} holds a cache with {k}={have.get(k)!r}, this run has {want.get(k)!r}; "
                        f"allowed: the same settings (to resume it), overwrite=true (to replace it) or a new cache.dir")
    if runtime.is_rank0():
        for name in (*cache.SPLITS, cache.MANIFEST, cache.IDENTITY):
            p = root / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


@user_errors_exit
def main():
    cfg, job = compose_job("smollm2_demo", schemas.TrainingJob)
    par, t, c = cfg.parallel, cfg.trainer, cfg.cache
    if not c.dir:
        raise UserError("cache.dir=DIR is required: where the teacher cache goes")
    t_path, corrected = teacher_source(cfg)
    t_mc = store.model_config_of(t_path)
    check_model_shape(cfg, t_mc, f"teacher {t_path}")
    t_mc.check_layout(par)
    topk = int(c.topk) if c.topk is not None else t_mc.padded_vocab_size
    if topk > t_mc.padded_vocab_size:
        raise UserError(f"cache.topk={topk} exceeds the teacher's padded vocabulary {t_mc.padded_vocab_size}; "
                        f"allowed: 1..{t_mc.padded_vocab_size} or null (all)")
    seq, gbs = int(cfg.data.seq_length), int(t.global_batch_size)
    train_samples = optim.train_iterations(t, seq) * gbs
    tdata.claim_cache(cfg.data, {"teacher": t_path})
    root = outputs.claim_workdir(c.dir, key="cache.dir", sources={"teacher": t_path})
    want = {**offline.identity(cfg, job.distill, t_path, t_mc), "topk": topk, "dtype": c.dtype,
            "shard_samples": int(c.shard_samples), "requested_train_samples": train_samples}
    existing_identity(root, want, bool(cfg.overwrite))
    if (root / cache.MANIFEST).is_file():
        runtime.print0(f"[cache] {root} is complete; nothing to do")
        return

    runtime.init_parallel(par, cfg.seed)
    t0 = time.time()
    if runtime.is_rank0():
        cache.clean_partial(root)
        outputs.write_text_atomic(root / cache.IDENTITY, json.dumps(want, indent=1))
    runtime.print0(f"[cache] teacher {t_path}{' (corrected)' if corrected else ''} -> {root}: top {topk} of "
                   f"{t_mc.padded_vocab_size} tokens, {c.dtype}")
    teacher = store.load_model(t_path, t_mc, dtype(cfg.dtype), grouped_gemm=grouped_gemm_default(t_mc))
    kd.freeze(teacher)
    train_ds, valid_ds = tdata.build(cfg.data, store.tokenizer_dir(t_path), root, train_samples, cfg.seed)
    counts = offline.sample_counts(cfg, train_ds, valid_ds, train_samples)
    layout = cache.Layout(topk, seq, c.dtype, t_mc.padded_vocab_size)
    tau, mbs, shard = float(cfg.distill.logit_kl_temperature), int(t.micro_batch_size), int(c.shard_samples)
    runtime.print0(f"[cache] {counts['train_samples']} train + {counts['valid_samples']} validation samples of "
                   f"{seq} tokens, {layout.bytes_per_token} bytes per token "
                   f"({cache.human_bytes(layout.bytes_per_token * seq * sum(counts.values()))} in all)")

    # validation samples first: the teacher's sanity check reads them before the long pass
    stats = {}
    check_split = "valid" if counts["valid_samples"] else "train"
    stats[check_split] = cache_writer.write_split(teacher, valid_ds if check_split == "valid" else train_ds,
                                                  check_split, counts[f"{check_split}_samples"], root, layout,
                                                  shard, mbs, tau)
    n_check = min(counts[f"{check_split}_samples"], shard)
    teacher_loss = cache_writer.teacher_valid_loss(root, check_split, n_check, shard, layout,
                                                   valid_ds if check_split == "valid" else train_ds)
    kd.check_teacher_sane(teacher_loss, t_mc, float(cfg.teacher.max_loss_fraction), t_path)
    runtime.print0(f"[cache] teacher {check_split} loss {teacher_loss:.4f} (ln vocab {math.log(t_mc.vocab_size):.2f})")
    if check_split == "valid":
        stats["train"] = cache_writer.write_split(teacher, train_ds, "train", counts["train_samples"], root, layout,
                                                  shard, mbs, tau)
    else:
        stats["valid"] = {"shards": 0, "written": 0, "seconds": 0.0, "samples": 0}

    test_text = cfg.data.test_text or (tdata.text_files(cfg.data).get("test") if cfg.data.source != "indexed" else None)
    held_out = None
    if test_text and cfg.teacher.held_out:
        windows = tiled_windows(load_tokenizer(t_path), test_text, seq, cfg.data.test_tokens)
        held_out = {"text": str(test_text), "tokens": cfg.data.test_tokens, "seq_length": seq,
                    "perplexity": ppl.megatron_perplexity(teacher, windows, mbs)["perplexity"]}
    secs = time.time() - t0
    if runtime.is_rank0():
        written = sum(s["samples"] for s in stats.values())
        size = sum(f.stat().st_size for split in cache.SPLITS if (root / split).is_dir()
                   for f in (root / split).rglob("*.bin"))
        tokens = seq * sum(counts.values())
        manifest = {"identity": {**offline.identity(cfg, job.distill, t_path, t_mc), **counts}, "topk": topk,
                    "dtype": c.dtype,
                    "shard_samples": shard, "bytes_per_token": layout.bytes_per_token, "bytes": size,
                    "splits": {s: {"samples": counts[f"{s}_samples"], "shards": stats[s]["shards"]}
                               for s in cache.SPLITS},
                    "teacher_loss": {"split": check_split, "samples": n_check, "loss": teacher_loss},
                    "teacher_held_out": held_out, "seconds": round(secs, 1),
                    "samples_per_s_this_run": written / max(secs, 1e-9)}
        outputs.write_text_atomic(root / cache.MANIFEST, json.dumps(manifest, indent=1))
        print(f"[cache] done in {secs:.0f}s: {tokens:,} tokens, {cache.human_bytes(size)} "
              f"({size / max(tokens, 1):.0f} bytes per token) in {root}", flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
