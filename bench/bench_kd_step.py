"""KD step time over student-only step time, against the FLOP-ideal ratio, measured in one run.

    python bench/bench_kd_step.py [--steps 4] [--seq 256] [--mbs 4] [--dtype float32|bfloat16]

Teacher: a random 8-layer model (hidden 512, FFN 2048, 8 heads / 4 groups, vocab 16384); student:
its width-pruned shape (hidden 384, FFN 1024). Both take full training steps through the project's
loop (Megatron schedule, DDP, optimizer): KD = teacher forward + student forward/backward + KL;
student-only = student forward/backward + LM loss. Ideal ratio = (2 N_t + 6 N_s) / (6 N_s).
"""

import argparse
import time

import torch
from omegaconf import OmegaConf

from minitron_nemo import runtime
from minitron_nemo.distill import online as kd
from minitron_nemo.distill.config import DistillationConfig
from minitron_nemo.models.builder import build_model, count_parameters
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.training import optim
from minitron_nemo.training.loop import lm_forward, lm_loss, setup_schedule, train_step

OPT = OmegaConf.create({"lr": 1e-4, "min_lr": 1e-5, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.95,
                        "adam_eps": 1e-8, "clip_grad": 1.0, "decay_style": "cosine"})


def timed(chunk, ddp, opt, sched, batches, forward, loss, steps):
    setup_schedule(chunk, ddp, opt)
    train_step(chunk, ddp, opt, sched, batches, forward, loss)  # warm-up
    if not runtime.cpu_mode():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(chunk, ddp, opt, sched, batches, forward, loss)
    if not runtime.cpu_mode():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    runtime.init_distributed(1, 1)
    t_mc = ModelConfig(num_layers=8, hidden_size=512, ffn_hidden_size=2048, num_attention_heads=8,
                       num_query_groups=4, vocab_size=16384, share_embeddings_and_output_weights=True)
    s_mc = t_mc.replace(hidden_size=384, ffn_hidden_size=1024)
    teacher = build_model(t_mc, params_dtype=dt)
    kd.freeze(teacher)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        tok = torch.randint(0, t_mc.vocab_size, (a.mbs, a.seq + 1), generator=g)
        batches.append({"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(a.mbs, a.seq),
                        "position_ids": torch.arange(a.seq).expand(a.mbs, -1)})
    times = {}
    for mode in ("student", "kd"):
        student = build_model(s_mc, params_dtype=dt)
        ddp = optim.wrap_ddp(student, distributed_optimizer=False)
        opt = optim.build_optimizer(ddp, OPT, dt, False)
        sched = optim.build_scheduler(opt, OPT, 1000, 1)
        if mode == "kd":
            cfg = DistillationConfig()
            chunk = kd.KDStage(ddp, teacher, s_mc, t_mc, cfg)
            times[mode] = timed(chunk, ddp, opt, sched, batches, kd.kd_forward,
                                lambda b, o: kd.kd_loss(cfg, b, o), a.steps)
        else:
            times[mode] = timed(ddp, ddp, opt, sched, batches, lm_forward, lm_loss, a.steps)
    n_t, n_s = count_parameters(t_mc), count_parameters(s_mc)
    ideal = (2 * n_t + 6 * n_s) / (6 * n_s)
    measured = times["kd"] / times["student"]
    tokens = 2 * a.mbs * a.seq
    print(f"device {'cpu' if runtime.cpu_mode() else torch.cuda.get_device_name()}  dtype {a.dtype}  "
          f"teacher {n_t / 1e6:.1f}M  student {n_s / 1e6:.1f}M  tokens/step {tokens}")
    print(f"student-only step {times['student']:.3f}s ({tokens / times['student']:.0f} tokens/s)")
    print(f"KD step           {times['kd']:.3f}s ({tokens / times['kd']:.0f} tokens/s)")
    print(f"KD / student-only = {measured:.3f}   FLOP-ideal = {ideal:.3f}   measured / ideal = {measured / ideal:.3f}")
    runtime.shutdown()


if __name__ == "__main__":
    main()
