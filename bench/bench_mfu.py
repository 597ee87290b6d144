"""Model FLOP utilisation (MFU) of training steps through the project's loop, measured in one run.

    python bench/bench_mfu.py [--shape 1b|small|tiny] [--dtype bfloat16] [--rounds 5] [--steps 2]
                              [--seq N] [--mbs N] [--peak-tflops 989] [--json PATH]

Model: the ``--shape``'s teacher (bench/benchlib.py; ``1b``: 16 layers, hidden 2048, FFN 8192, 32 heads / 8
groups, vocab 128256, sequence 4096) trained on the LM loss: Megatron schedule over two micro-batches, DDP,
Megatron Adam (bf16 parameters with fp32 main parameters and gradients under ``--dtype bfloat16``).
FLOPs per token: ``training.metrics.flops_per_token`` (what training logs use): 6 x the matmul parameters
(every linear layer and the output layer, no embeddings or norms) plus the attention scores and values,
12 x layers x heads x head_dim x sequence, the causal mask not discounted. MFU = FLOPs per step / step time /
peak; ``--peak-tflops`` default 989: an H200's dense bf16 tensor-core peak (NVIDIA's H200 datasheet gives
1,979 TFLOP/s with 2:4 sparsity). Each of ``--rounds`` rounds times ``--steps`` steps; MFU is reported as
median [min, max] over the rounds.
"""

import argparse

import torch

from benchlib import device_name, fmt, lm_step, random_batches, shape, summary, timed, write_json
from minitron_nemo import runtime
from minitron_nemo.models.builder import count_parameters
from minitron_nemo.training.metrics import flops_per_token

H200_BF16_DENSE_TFLOPS = 989.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b", choices=["tiny", "small", "1b"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--mbs", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    sh = shape(a.shape, a.seq, a.mbs)
    mc = sh.teacher
    runtime.init_distributed(1, 1)
    train = lm_step(mc, dt)
    batches = random_batches(mc.vocab_size, sh.mbs, sh.seq)
    step = lambda: train(batches)  # noqa: E731
    step()  # warm-up
    seconds = []
    for r in range(a.rounds):
        seconds.append(timed(step, a.steps))
        print(f"[bench] round {r + 1}/{a.rounds}: step {seconds[-1]:.3f}s", flush=True)
    tokens = len(batches) * sh.mbs * sh.seq
    flops = flops_per_token(mc, sh.seq, backward=True) * tokens
    peak = a.peak_tflops * 1e12
    res = {"device": device_name(), "shape": a.shape, "dtype": a.dtype, "params": count_parameters(mc),
           "seq": sh.seq, "tokens_per_step": tokens, "flops_per_step": flops, "peak_tflops": a.peak_tflops,
           "rounds": a.rounds, "steps_per_round": a.steps, "step_seconds": summary(seconds),
           "tflops": summary(flops / s / 1e12 for s in seconds), "mfu": summary(flops / s / peak for s in seconds)}
    print(f"device {res['device']}  dtype {a.dtype}  {res['params'] / 1e6:.1f}M parameters  seq {sh.seq}  "
          f"tokens/step {tokens}  {flops / 1e12:.2f} TFLOP/step")
    print(f"step {fmt(res['step_seconds'])} s   {fmt(res['tflops'])} TFLOP/s   "
          f"MFU {fmt(res['mfu'])} of {a.peak_tflops:g} TFLOP/s")
    write_json(a.json, res)
    runtime.shutdown()


if __name__ == "__main__":
    main()
