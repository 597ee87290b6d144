"""What the benchmarks share: model shapes (``--shape``), random batches, timing and the median/min/max summary.

Shapes (a teacher and its width-pruned student, a sequence length and a micro-batch size):
  * ``tiny``: seconds on a CPU (the GPU suite's dry run, bench/gpu_suite.sh --dry-run);
  * ``small``: the benchmarks' defaults (8 layers, hidden 512, vocab 16384; student hidden 384, FFN 1024);
  * ``1b``: a Llama-3.2-1B-like teacher (16 layers, hidden 2048, FFN 8192, 32 heads / 8 groups, vocab 128256,
    tied embeddings; 1.24B parameters) and its width-pruned student (hidden 1536, FFN 4096, heads kept; 0.62B),
    sequence 4096: the GPU suite's shape.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from minitron_nemo import runtime
from minitron_nemo.models.builder import build_model
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.training import optim
from minitron_nemo.training.loop import lm_forward, lm_loss, setup_schedule, train_step

# The optimizer settings of every benchmark's training steps (Megatron Adam, clipping at 1).
OPT = OmegaConf.create({"lr": 1e-4, "min_lr": 1e-5, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.95,
                        "adam_eps": 1e-8, "clip_grad": 1.0, "decay_style": "cosine"})


@dataclass(frozen=True)
class Shape:
    teacher: ModelConfig
    student: ModelConfig
    seq: int
    mbs: int


def _shape(teacher: ModelConfig, seq: int, mbs: int, **student) -> Shape:
    return Shape(teacher.validate(), teacher.replace(**student).validate(), seq, mbs)


_SMALL = ModelConfig(num_layers=8, hidden_size=512, ffn_hidden_size=2048, num_attention_heads=8, num_query_groups=4,
                     vocab_size=16384, share_embeddings_and_output_weights=True)
_TINY = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                    kv_channels=16, vocab_size=512, share_embeddings_and_output_weights=True)
_1B = ModelConfig(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
                  kv_channels=64, vocab_size=128256, share_embeddings_and_output_weights=True,
                  max_position_embeddings=8192, rotary_base=500000.0)

SHAPES = {
    "tiny": _shape(_TINY, 64, 2, hidden_size=48, ffn_hidden_size=64),
    "small": _shape(_SMALL, 256, 4, hidden_size=384, ffn_hidden_size=1024),
    "1b": _shape(_1B, 4096, 1, hidden_size=1536, ffn_hidden_size=4096),
}


def shape(name: str, seq: int | None = None, mbs: int | None = None) -> Shape:
    """The named shape, with ``seq`` / ``mbs`` replaced where given."""
    s = SHAPES[name]
    return Shape(s.teacher, s.student, seq or s.seq, mbs or s.mbs)


def lm_step(mc: ModelConfig, dtype):
    """``step(batches)``: one LM-loss training step of a fresh ``mc`` model through the project's loop (Megatron
    schedule, DDP, Megatron Adam with the benchmarks' ``OPT``)."""
    ddp = optim.wrap_ddp(build_model(mc, params_dtype=dtype), distributed_optimizer=False)
    opt = optim.build_optimizer(ddp, OPT, dtype, False)
    sched = optim.build_scheduler(opt, OPT, 1000, 1)
    setup_schedule(ddp, ddp, opt)
    return lambda batches: train_step(ddp, ddp, opt, sched, batches, lm_forward, lm_loss)


def random_batches(vocab: int, mbs: int, seq: int, n: int = 2, seed: int = 0) -> list:
    """``n`` micro-batches of random tokens (next-token labels, every position in the loss)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tok = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        out.append({"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(mbs, seq),
                    "position_ids": torch.arange(seq).expand(mbs, -1)})
    return out


def sync() -> None:
    if not runtime.cpu_mode():
        torch.cuda.synchronize()


def timed(fn, reps: int = 1) -> float:
    """Seconds per call of ``fn`` over ``reps`` calls (the device synchronised before and after)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def interleaved(steps: dict, batches, rounds: int, reps: int) -> dict:
    """``{name: [seconds per step, one per round]}``: each step function warmed up once, then every round
    times each in turn (``reps`` steps), so load changes hit all sides alike."""
    for step in steps.values():
        step(batches)  # warm-up
    per = {m: [] for m in steps}
    for r in range(rounds):
        for m, step in steps.items():
            per[m].append(timed(lambda: step(batches), reps))
        print(f"[bench] round {r + 1}/{rounds}: " + "  ".join(f"{m} {per[m][-1]:.3f}s" for m in per), flush=True)
    return per


def top_ops(step, batches, rows: int = 12) -> list:
    """The ``rows`` operators taking the most device time (the GPU's kernels; the CPU's time in CPU mode) in
    one call of ``step(batches)`` under torch.profiler, each ``{"name", "ms", "calls"}``, printed as well."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and not runtime.cpu_mode()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step(batches)
        if cuda:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, attr, 0.0))
    out = [{"name": e.key[:90], "ms": round(getattr(e, attr, 0.0) / 1e3, 3), "calls": e.count} for e in events[:rows]]
    total = sum(getattr(e, attr, 0.0) for e in events) / 1e3
    print(f"  top {rows} of {total:.1f} ms ({'device' if cuda else 'CPU'} self time, one step):")
    for o in out:
        print(f"    {o['ms']:9.3f} ms  {o['calls']:5d}x  {o['name']}")
    return out


def summary(xs) -> dict:
    xs = list(xs)
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt(s: dict) -> str:
    return f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"


def device_name() -> str:
    return "cpu" if runtime.cpu_mode() else torch.cuda.get_device_name()


def write_json(path, result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=1))
