"""DPO step time over an SFT step on the same rows, measured in one run, interleaved; median and spread.

    python bench/bench_dpo_step.py [--rounds 6] [--seq 256] [--pairs 2]

Model: a random 8-layer model (hidden 512, FFN 2048, 8 heads / 4 groups, vocab 16384). SFT: the LM
loss on ``2 * pairs`` rows; DPO: ``pairs`` pairs (the same number of rows) through the policy and the
frozen reference (``align/dpo.py``). Ideal ratio (FLOPs): policy forward + backward plus a reference
forward over the same rows = (6 N + 2 N) / 6 N = 1.33.
"""

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from minitron_nemo import runtime
from minitron_nemo.align import dpo
from minitron_nemo.models.builder import build_model
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.training import optim
from minitron_nemo.training.loop import lm_forward, lm_loss, setup_schedule, train_step

OPT = OmegaConf.create({"lr": 1e-5, "min_lr": 1e-6, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.95,
                        "adam_eps": 1e-8, "clip_grad": 1.0, "decay_style": "constant"})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=2)
    a = ap.parse_args()
    runtime.init_distributed(1, 1)
    mc = ModelConfig(num_layers=8, hidden_size=512, ffn_hidden_size=2048, num_attention_heads=8, num_query_groups=4,
                     vocab_size=16384, share_embeddings_and_output_weights=True)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, mc.vocab_size, (a.pairs, 2, a.seq + 1), generator=g)
    mask = torch.zeros(a.pairs, 2, a.seq)
    mask[..., a.seq // 2:] = 1.0  # the second half of each row is the response
    pairs = {"tokens": tok[..., :-1], "labels": tok[..., 1:], "loss_mask": mask,
             "position_ids": torch.arange(a.seq).expand(a.pairs, 2, -1)}
    rows = dpo.flatten(pairs)
    reference = build_model(mc)
    sides = {}
    for name in ("sft", "dpo"):
        model = build_model(mc)
        ddp = optim.wrap_ddp(model, distributed_optimizer=False)
        opt = optim.build_optimizer(ddp, OPT, torch.float32, False)
        sched = optim.build_scheduler(opt, OPT, 1000, 1)
        if name == "dpo":
            step = dpo.build(dpo.DPOConfig(), model, reference, mc)
            sides[name] = (step.wrap(ddp), ddp, opt, sched, [pairs], step.forward, step.loss, [])
        else:
            sides[name] = (ddp, ddp, opt, sched, [rows], lm_forward, lm_loss, [])
    for r in range(a.rounds + 1):  # round 0 warms up
        for name, (chunk, ddp, opt, sched, batches, fwd, loss, times) in sides.items():
            setup_schedule(chunk, ddp, opt)
            t0 = time.perf_counter()
            train_step(chunk, ddp, opt, sched, batches, fwd, loss)
            if r:
                times.append(time.perf_counter() - t0)
    for name, s in sides.items():
        x = s[-1]
        print(f"{name} step: median {statistics.median(x):.3f}s  min {min(x):.3f}s  max {max(x):.3f}s")
    ratios = [d / s for d, s in zip(sides["dpo"][-1], sides["sft"][-1])]
    print(f"DPO / SFT step (same rows, interleaved): median {statistics.median(ratios):.2f}x  min {min(ratios):.2f}x  "
          f"max {max(ratios):.2f}x over {a.rounds} rounds (FLOP-ideal 1.33x)")


if __name__ == "__main__":
    main()
