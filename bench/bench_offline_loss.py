"""The offline-distillation loss alone: forward and backward of the student's LM loss plus the KL against a top-K
cache, from the student's logits, three ways, interleaved in one run.

    python bench/bench_offline_loss.py [--tokens N] [--vocab V] [--topk K] [--dtype float32|bfloat16]
                                       [--tau T] [--rounds 7] [--reps 3] [--out PATH]

  * ce:       the LM loss only (``online.token_nll``, Megatron's vocab-parallel cross entropy): what a
              student-only step computes from its logits;
  * separate: that cross entropy, plus the student's log-probabilities at the cached ids by a torch
              ``log_softmax`` over the vocabulary, then ``bucket_kl_of``;
  * fused:    ``bucket_kl.student_nll_and_logprobs`` (one pass over the logits for both), then ``bucket_kl_of``:
              what ``offline.loss`` runs.
Each round times every mode in turn (``--reps`` calls each); ratios are per round, reported as median [min, max].
On a GPU also each mode's peak allocated memory above the logits. Defaults: 2048 tokens x vocab 32768 in fp32
on CPU; 8192 x 131072 in bf16 on a GPU (the GPU suite's offline-KD shape).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import device_name, fmt, interleaved, summary  # noqa: E402
from minitron_nemo import runtime  # noqa: E402
from minitron_nemo.distill.bucket_kl import bucket_kl_of, student_nll_and_logprobs  # noqa: E402
from minitron_nemo.distill.online import token_nll  # noqa: E402

MODES = ("ce", "separate", "fused")


def inputs(n: int, v: int, k: int, dtype, device):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(1, n, v, generator=g) * 2).to(dtype=dtype, device=device).requires_grad_(True)
    labels = torch.randint(0, v, (1, n), generator=g).to(device)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(min(n, 64))]).repeat(n // min(n, 64) + 1, 1)[:n]
    teacher = torch.log_softmax(torch.randn(n, k, generator=g) - 1.0, dim=-1) - 0.1  # leaves a rest bucket
    return logits, labels, ids.to(device), teacher.to(device)


def losses(tau: float):
    def ce(x, labels, ids, teacher):
        return token_nll(x, labels).mean()

    def separate(x, labels, ids, teacher):
        lp = torch.log_softmax(x[0].float() / tau, dim=-1).gather(-1, ids)
        return token_nll(x, labels).mean() + bucket_kl_of(lp, teacher, tau).mean()

    def fused(x, labels, ids, teacher):
        nll, lp = student_nll_and_logprobs(x[0], labels[0], ids, tau)
        return nll.mean() + bucket_kl_of(lp, teacher, tau).mean()
    return {"ce": ce, "separate": separate, "fused": fused}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", "--json", default=None, help="also write the results as JSON here")
    a = ap.parse_args()
    runtime.init_distributed(1, 1)
    gpu = not runtime.cpu_mode()
    n = a.tokens or (8192 if gpu else 2048)
    v = a.vocab or (131072 if gpu else 32768)
    dtype = getattr(torch, a.dtype or ("bfloat16" if gpu else "float32"))
    device = runtime.device()
    x, labels, ids, teacher = inputs(n, v, a.topk, dtype, device)
    fns = losses(a.tau)

    def step_of(fn):
        def step(_):
            x.grad = None
            fn(x, labels, ids, teacher).backward()
            if gpu:
                torch.cuda.synchronize()
        return step

    with torch.no_grad():  # the three agree before they are timed
        vals = {m: float(fns[m](x, labels, ids, teacher)) for m in ("separate", "fused")}
    print(f"[bench] {n} tokens x vocab {v}, top-{a.topk}, {dtype}, tau {a.tau}: loss separate {vals['separate']:.6f} "
          f"fused {vals['fused']:.6f}", flush=True)
    per = interleaved({m: step_of(fns[m]) for m in MODES}, None, a.rounds, a.reps)
    memory = {}
    if gpu:
        for m in MODES:
            x.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step_of(fns[m])(None)
            memory[m] = torch.cuda.max_memory_allocated() - base
    res = {"device": device_name(), "tokens": n, "vocab": v, "topk": a.topk, "dtype": str(dtype).replace("torch.", ""),
           "tau": a.tau, "rounds": a.rounds, "reps": a.reps, "loss": vals,
           "seconds": {m: summary(per[m]) for m in MODES},
           "fused_over_separate": summary([f / s for f, s in zip(per["fused"], per["separate"])]),
           "fused_over_ce": summary([f / c for f, c in zip(per["fused"], per["ce"])]),
           "separate_over_ce": summary([s / c for s, c in zip(per["separate"], per["ce"])]),
           "peak_bytes_above_logits": memory or None}
    for key in ("fused_over_separate", "fused_over_ce", "separate_over_ce"):
        print(f"[bench] {key}: {fmt(res[key])}")
    if memory:
        print("[bench] peak memory above the logits: " + "  ".join(f"{m} {b / 2**30:.2f} GiB" for m, b in memory.items()))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    runtime.shutdown()


if __name__ == "__main__":
    main()
