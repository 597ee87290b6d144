"""Peak memory of the KD logits loss (forward + backward) versus plain cross-entropy on the same logits.

    python bench/bench_kd_loss_memory.py [--tokens 4096] [--vocab 131072] [--cases ce,kd,kd_reverse] [--rounds 1]
                                         [--json PATH]

Each case runs in a fresh subprocess; ``--rounds`` repeats the cases in turn, and each round gives a ratio
of every case to ``ce`` (reported as median [min, max]). "Extra" memory is the peak during forward + backward minus the
memory held before the loss (its inputs: student logits, teacher logits for KD, labels for CE), so it
counts the logits' gradient and every temporary. On GPU it comes from ``torch.cuda.max_memory_allocated``;
on CPU from the process's peak RSS (``ru_maxrss``, large tensors are mmap-backed and returned on free),
measured after a small warm-up of the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minitron_nemo.distill.losses import logits_kl_loss  # noqa: E402

GiB = 1 << 30


def summary(xs) -> dict:
    xs = list(xs)
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def _loss(case: str, student, teacher, labels, chunk):
    if case == "ce":
        return F.cross_entropy(student, labels)
    if case == "kd":
        return logits_kl_loss(student, teacher, chunk_size=chunk).loss
    if case == "kd_reverse":
        return logits_kl_loss(student, teacher, reverse=True, chunk_size=chunk).loss
    if case == "kd_top100":
        return logits_kl_loss(student, teacher, top_k=100).loss
    raise SystemExit(f"unknown case {case}")


def run_case(case: str, tokens: int, vocab: int, chunk, device: str) -> dict:
    dt = torch.bfloat16
    # Warm-up on small inputs so that library initialisation is not counted.
    w = torch.randn(8, 512, device=device, dtype=dt, requires_grad=True)
    _loss(case, w, torch.randn_like(w), torch.zeros(8, dtype=torch.long, device=device), chunk).backward()
    del w
    student = torch.randn(tokens, vocab, device=device, dtype=dt).mul_(3).requires_grad_()
    teacher = torch.randn(tokens, vocab, device=device, dtype=dt).mul_(3) if case != "ce" else None
    labels = torch.randint(0, vocab, (tokens,), device=device) if case == "ce" else None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_peak()
    t0 = time.perf_counter()
    _loss(case, student, teacher, labels, chunk).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
    else:
        extra = _rss_peak() - before
    inputs = student.numel() * student.element_size() * (1 if teacher is None else 2)
    return {"case": case, "extra_bytes": extra, "input_bytes": inputs, "seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--chunk-size", type=int, default=None, help="tokens per KL chunk (default: automatic)")
    ap.add_argument("--cases", default="ce,kd")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.one:
        print(json.dumps(run_case(a.one, a.tokens, a.vocab, a.chunk_size, device)))
        return
    print(f"device={device} tokens={a.tokens} vocab={a.vocab} bf16 logits "
          f"({a.tokens * a.vocab * 2 / GiB:.2f} GiB each), chunk_size={a.chunk_size or 'auto'}", flush=True)
    cases = a.cases.split(",")
    runs = {case: [] for case in cases}
    for r in range(a.rounds):
        for case in cases:
            res = run_in_child(case, a)
            runs[case].append(res)
            print(f"  round {r + 1}/{a.rounds} {case:11s} extra peak {res['extra_bytes'] / GiB:6.3f} GiB   "
                  f"(inputs {res['input_bytes'] / GiB:.2f} GiB, fwd+bwd {res['seconds']:.2f} s)", flush=True)
    ratios = {}
    if "ce" in runs:
        for case in cases:
            if case != "ce":
                ratios[case] = summary(x["extra_bytes"] / max(c["extra_bytes"], 1) for x, c in zip(runs[case], runs["ce"]))
                print(f"ratio {case}/ce (extra peak memory of forward+backward): {ratios[case]['median']:.3f} "
                      f"[{ratios[case]['min']:.3f}, {ratios[case]['max']:.3f}]")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "device": device if device == "cpu" else torch.cuda.get_device_name(), "tokens": a.tokens,
            "vocab": a.vocab, "chunk_size": a.chunk_size, "rounds": a.rounds,
            "extra_bytes": {c: summary(x["extra_bytes"] for x in runs[c]) for c in cases},
            "input_bytes": {c: runs[c][0]["input_bytes"] for c in cases},
            "over_ce": ratios}, indent=1))


def run_in_child(case: str, a) -> dict:
    cmd = [sys.executable, __file__, "--one", case, "--tokens", str(a.tokens), "--vocab", str(a.vocab)]
    if a.chunk_size:
        cmd += ["--chunk-size", str(a.chunk_size)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"case {case} failed: {(p.stderr.strip().splitlines() or ['exit ' + str(p.returncode)])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
