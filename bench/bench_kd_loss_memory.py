"""Peak memory of the KD logits loss (forward + backward) versus plain cross-entropy on the same logits.

    python bench/bench_kd_loss_memory.py [--tokens 4096] [--vocab 131072] [--cases ce,kd,kd_reverse]

Each case runs in a fresh subprocess. "Extra" memory is the peak during forward + backward minus the
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
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minitron_nemo.distill.losses import logits_kl_loss  # noqa: E402

GiB = 1 << 30


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
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.one:
        print(json.dumps(run_case(a.one, a.tokens, a.vocab, a.chunk_size, device)))
        return
    print(f"device={device} tokens={a.tokens} vocab={a.vocab} bf16 logits "
          f"({a.tokens * a.vocab * 2 / GiB:.2f} GiB each), chunk_size={a.chunk_size or 'auto'}", flush=True)
    res = {}
    for case in a.cases.split(","):
        cmd = [sys.executable, __file__, "--one", case, "--tokens", str(a.tokens), "--vocab", str(a.vocab)]
        if a.chunk_size:
            cmd += ["--chunk-size", str(a.chunk_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = res[case] = json.loads(out.strip().splitlines()[-1])
        print(f"  {case:11s} extra peak {r['extra_bytes'] / GiB:6.3f} GiB   (inputs {r['input_bytes'] / GiB:.2f} GiB, "
              f"fwd+bwd {r['seconds']:.2f} s)", flush=True)
    if "ce" in res:
        for case, r in res.items():
            if case != "ce":
                print(f"ratio {case}/ce (extra peak memory of forward+backward): "
                      f"{r['extra_bytes'] / res['ce']['extra_bytes']:.3f}")


if __name__ == "__main__":
    main()
