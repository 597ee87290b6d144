"""Offline distillation: step time, memory, cache-writing speed and size, measured in one run.

    python bench/bench_offline_kd.py [--shape small|tiny|1b] [--dtype float32|bfloat16] [--rounds 5] [--steps 2]
                                     [--seq N] [--mbs N] [--topk 64] [--out PATH]

Models: ``--shape`` (bench/benchlib.py; default ``small``: a random 8-layer teacher, hidden 512, FFN 2048,
vocab 16384, and its width-pruned student, hidden 384, FFN 1024), parameters in ``--dtype``. Every step is a full training step of the project's loop (Megatron schedule,
DDP, optimizer):
  * student-only: LM loss, no teacher;
  * offline: the student plus a lookup in a real teacher cache on disk (``--topk`` tokens, bf16) and
    the cached-KL loss (``distill/offline.py``);
  * online: teacher forward + student + full-vocabulary KL (``distill/online.py``).
The three are interleaved for ``--rounds`` rounds of ``--steps`` steps; ratios are per round, reported
as median [min, max]. Cache writing (teacher forward + top-K + shard write) is interleaved the same
way with a plain teacher forward over the same samples. Peak memory: the peak resident set of a fresh
process that builds the models a mode needs and takes two steps: the resident memory added above the
process after its imports (the peak counter is reset after them: imports alone set the peak, alike for
every mode); on GPU also
``max_memory_allocated``. Bytes per token: the files of caches written for K = 8, 64, 512.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchlib import OPT, SHAPES, interleaved, shape, summary, timed, top_ops
from minitron_nemo import runtime
from minitron_nemo.distill import cache, cache_writer, offline
from minitron_nemo.distill import online as kd
from minitron_nemo.distill.config import DistillationConfig
from minitron_nemo.models.builder import build_model
from minitron_nemo.models.forward import run_forward
from minitron_nemo.training import optim
from minitron_nemo.training.loop import lm_forward, lm_loss, setup_schedule, train_step

MODES = ("student", "offline", "online")


def samples(n, seq, vocab):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        w = torch.randint(0, vocab, (seq + 1,), generator=g)
        out.append({"tokens": w[:-1], "labels": w[1:], "loss_mask": torch.ones(seq), "position_ids": torch.arange(seq)})
    return out


def batches_of(data, mbs, first=0):
    bs = cache_writer.micro_batches(data[first:first + 2 * mbs], mbs)
    for j, b in enumerate(bs):
        b["index"] = torch.arange(first + j * mbs, first + (j + 1) * mbs)
    return bs


def write_cache(root, teacher, t_mc, data, topk, seq, mbs, dtype="bfloat16"):
    layout = cache.Layout(topk, seq, dtype, t_mc.padded_vocab_size)
    n = len(data)
    arrays = cache_writer.teacher_pass(teacher, data, mbs, layout, 1.0)
    cache.write_shard(root, "train", 0, 0, layout, arrays)
    manifest = {"identity": {"seq_length": seq, "padded_vocab_size": t_mc.padded_vocab_size}, "topk": topk,
                "dtype": dtype, "shard_samples": n, "splits": {"train": {"samples": n}, "valid": {"samples": 0}}}
    (Path(root) / cache.MANIFEST).write_text(json.dumps(manifest))
    return layout


def trainer_parts(mode, teacher, tc, sh, dt):
    student = build_model(sh.student, params_dtype=dt)
    ddp = optim.wrap_ddp(student, distributed_optimizer=False)
    opt = optim.build_optimizer(ddp, OPT, dt, False)
    sched = optim.build_scheduler(opt, OPT, 10_000, 1)
    cfg = DistillationConfig()
    if mode == "student":
        parts = (ddp, lm_forward, lm_loss)
    elif mode == "offline":
        parts = (ddp, offline.make_forward(tc), lambda b, o: offline.loss(cfg, b, o))
    else:
        parts = (kd.KDStage(ddp, teacher, sh.student, sh.teacher, cfg), kd.kd_forward, lambda b, o: kd.kd_loss(cfg, b, o))
    chunk, fwd, loss = parts
    setup_schedule(chunk, ddp, opt)
    return lambda batches: train_step(chunk, ddp, opt, sched, batches, fwd, loss)


def _status_kib(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss():
    """Reset the kernel's peak resident set (VmHWM) of this process to its current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """Peak resident set since the last ``reset_peak_rss``."""
    return _status_kib("VmHWM") * 1024


def memory_child(a):
    """One mode in this (fresh) process: build what it needs, take two steps, report the peak resident memory
    above the process after its imports (the peak of the whole process is set by imports, alike for every
    mode, so the kernel's peak counter is reset once they are done)."""
    runtime.init_distributed(1, 1)
    sh, dt = shape(a.shape, a.seq, a.mbs), getattr(torch, a.dtype)
    data = samples(4 * sh.mbs, sh.seq, sh.teacher.vocab_size)
    base = rss_bytes()
    reset_peak_rss()
    tc = cache.TeacherCache(a.cache_dir) if a.memory == "offline" else None
    teacher = None
    if a.memory == "online":
        teacher = build_model(sh.teacher, params_dtype=dt)
        kd.freeze(teacher)
    step = trainer_parts(a.memory, teacher, tc, sh, dt)
    for _ in range(2):
        step(batches_of(data, sh.mbs))
    added = peak_rss_bytes() - base
    gpu = None if runtime.cpu_mode() else torch.cuda.max_memory_allocated()
    print(json.dumps({"rss_added_bytes": added, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      * 1024, "gpu_bytes": gpu}))
    runtime.shutdown()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--mbs", type=int, default=None)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--out", "--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one step of each mode: its top operators by device time (result: profile)")
    ap.add_argument("--memory", default=None, choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory:
        return memory_child(a)
    runtime.init_distributed(1, 1)
    torch.manual_seed(0)
    sh, dt = shape(a.shape, a.seq, a.mbs), getattr(torch, a.dtype)
    t_mc, s_mc = sh.teacher, sh.student
    teacher = build_model(t_mc, params_dtype=dt)
    kd.freeze(teacher)
    data = samples(4 * sh.mbs, sh.seq, t_mc.vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix="bench_offline_"))
    sizes = {}
    for k in sorted({8, 64, 512, a.topk}):
        root = tmp / f"k{k}"
        layout = write_cache(root, teacher, t_mc, data, k, sh.seq, sh.mbs)
        files = sum(f.stat().st_size for f in (root / "train").rglob("*.bin"))
        sizes[k] = {"bytes_per_token_files": files / (len(data) * sh.seq), "bytes_per_token_layout": layout.bytes_per_token,
                    "ids": layout.id_dtype.__name__}
    tc = cache.TeacherCache(tmp / f"k{a.topk}")

    # training steps, interleaved
    steps = {m: trainer_parts(m, teacher, tc, sh, dt) for m in MODES}
    bs = batches_of(data, sh.mbs)
    per = interleaved(steps, bs, a.rounds, a.steps)

    # cache writing vs a plain teacher forward, interleaved
    layout = cache.Layout(a.topk, sh.seq, "bfloat16", t_mc.padded_vocab_size)
    wdir = tmp / "write"
    write_t, fwd_t = [], []
    for r in range(a.rounds):
        write_t.append(timed(lambda: cache.write_shard(wdir, "train", r, 0, layout, cache_writer.teacher_pass(
            teacher, data, sh.mbs, layout, 1.0)), 1))
        fwd_t.append(timed(lambda: run_forward(teacher, cache_writer.micro_batches(data, sh.mbs), lambda o, b: None), 1))

    mem = {}
    env = {k: v for k, v in os.environ.items()  # a fresh process group in each child
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    for m in MODES:
        p = subprocess.run([sys.executable, __file__, "--memory", m, "--cache-dir", str(tmp / f"k{a.topk}"),
                            "--shape", a.shape, "--dtype", a.dtype, "--seq", str(sh.seq), "--mbs", str(sh.mbs)],
                           capture_output=True, text=True, env=env)
        if p.returncode:
            raise SystemExit(f"memory run of {m} failed: {p.stderr.strip().splitlines()[-1:]}")
        mem[m] = json.loads(p.stdout.strip().splitlines()[-1])

    tokens = 2 * sh.mbs * sh.seq
    res = {"device": "cpu" if runtime.cpu_mode() else torch.cuda.get_device_name(), "shape": a.shape,
           "dtype": a.dtype, "tokens_per_step": tokens,
           "topk": a.topk, "rounds": a.rounds, "steps_per_round": a.steps,
           "step_seconds": {m: summary(per[m]) for m in MODES},
           "offline_over_student": summary([o / s for o, s in zip(per["offline"], per["student"])]),
           "offline_over_online": summary([o / n for o, n in zip(per["offline"], per["online"])]),
           "cache_write_over_teacher_forward": summary([w / f for w, f in zip(write_t, fwd_t)]),
           "cache_write_tokens_per_s": summary([len(data) * sh.seq / w for w in write_t]),
           "teacher_forward_tokens_per_s": summary([len(data) * sh.seq / f for f in fwd_t]),
           "peak_memory": mem, "bytes_per_token": sizes}
    if a.profile:
        res["profile"] = {}
        for m in MODES:
            print(f"[profile] {m}")
            res["profile"][m] = top_ops(steps[m], bs)
    print(f"device {res['device']}  student {s_mc.hidden_size}/{s_mc.ffn_hidden_size}  teacher "
          f"{t_mc.hidden_size}/{t_mc.ffn_hidden_size}  vocab {t_mc.vocab_size}  tokens/step {tokens}  K {a.topk}")
    fmt = lambda s: f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"  # noqa: E731
    for m in MODES:
        print(f"  {m:<8} step {fmt(res['step_seconds'][m])} s")
    print(f"  offline / student-only     {fmt(res['offline_over_student'])}   (goal <= 1.05)")
    print(f"  offline / online KD        {fmt(res['offline_over_online'])}")
    print(f"  cache write / teacher fwd  {fmt(res['cache_write_over_teacher_forward'])}   "
          f"({res['cache_write_tokens_per_s']['median']:,.0f} vs {res['teacher_forward_tokens_per_s']['median']:,.0f} tokens/s)")
    for m in MODES:
        g = mem[m]["gpu_bytes"]
        print(f"  memory {m:<8} peak resident during 2 steps, above the process after imports: "
              f"{mem[m]['rss_added_bytes'] / 2**20:,.0f} MiB" + (f"; GPU peak {g / 2**20:,.0f} MiB" if g else ""))
    for k, s in sizes.items():
        print(f"  K={k:<4} {s['bytes_per_token_files']:.0f} bytes/token (bf16 log-probs, {s['ids']} ids)")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    runtime.shutdown()


if __name__ == "__main__":
    main()
