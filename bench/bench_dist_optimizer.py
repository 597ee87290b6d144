"""The distributed optimizer against the replicated one at DP=2, measured in one run: training-step time and
the time to write the optimizer's state (model space, ``training.state.save_optimizer``; the distributed
optimizer gathers its shards over gloo first).

    python bench/bench_dist_optimizer.py [--rounds 5] [--steps 3] [--seq 256] [--mbs 2] [--json PATH]

Starts itself on two ranks (torch.distributed.run). Model: 8 layers, hidden 512, FFN 2048, 8 heads / 4
groups, vocab 16384 (fp32). Each round times both optimizers, one after the other, alternating which goes
first; the report gives the median and min-max of each and of their ratio per round.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchlib import summary
from minitron_nemo import runtime
from minitron_nemo.models.builder import build_model
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.training import optim
from minitron_nemo.training.loop import lm_forward, lm_loss, setup_schedule, train_step
from minitron_nemo.training.state import save_optimizer

OPT = OmegaConf.create({"lr": 1e-4, "min_lr": 1e-5, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.95,
                        "adam_eps": 1e-8, "clip_grad": 1.0, "decay_style": "cosine"})
KINDS = ("replicated", "distributed")


def setup(mc, kind):
    torch.manual_seed(0)
    model = build_model(mc, params_dtype=torch.float32)
    dist_opt = kind == "distributed"
    ddp = optim.wrap_ddp(model, distributed_optimizer=dist_opt)
    opt = optim.build_optimizer(ddp, OPT, torch.float32, dist_opt)
    sched = optim.build_scheduler(opt, OPT, 1000, 1)
    setup_schedule(ddp, ddp, opt)
    return model, ddp, opt, sched


def step_time(job, batches, steps) -> float:
    model, ddp, opt, sched = job
    runtime.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(ddp, ddp, opt, sched, batches, lm_forward, lm_loss)
    runtime.barrier()
    return (time.perf_counter() - t0) / steps


def save_time(job, root: Path, name: str) -> float:
    model, ddp, opt, sched = job
    d = root / name
    if runtime.rank() == 0:
        d.mkdir(parents=True)
    runtime.barrier()
    t0 = time.perf_counter()
    save_optimizer(opt, model, d)
    runtime.barrier()
    return time.perf_counter() - t0


def worker(a) -> None:
    runtime.init_distributed(1, 1)
    mc = ModelConfig(num_layers=8, hidden_size=512, ffn_hidden_size=2048, num_attention_heads=8,
                     num_query_groups=4, vocab_size=16384, share_embeddings_and_output_weights=True)
    g = torch.Generator().manual_seed(runtime.rank())
    batches = []
    for _ in range(2):
        tok = torch.randint(0, mc.vocab_size, (a.mbs, a.seq + 1), generator=g)
        batches.append({"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(a.mbs, a.seq),
                        "position_ids": torch.arange(a.seq).expand(a.mbs, -1)})
    jobs = {k: setup(mc, k) for k in KINDS}
    for k in KINDS:                                  # warm-up: first steps allocate the optimizer state
        step_time(jobs[k], batches, 1)
    steps = {k: [] for k in KINDS}
    saves = {k: [] for k in KINDS}
    where = [tempfile.mkdtemp(prefix="bench_dist_opt_") if runtime.rank() == 0 else None]
    torch.distributed.broadcast_object_list(where, src=0)
    root = Path(where[0])
    for r in range(a.rounds):
        order = KINDS if r % 2 == 0 else KINDS[::-1]
        for k in order:
            steps[k].append(step_time(jobs[k], batches, a.steps))
            saves[k].append(save_time(jobs[k], root, f"{r}_{k}"))
        runtime.print0(f"[bench] round {r + 1}/{a.rounds}: step " + ", ".join(
            f"{k} {steps[k][-1]:.3f}s" for k in KINDS) + "; save " + ", ".join(f"{k} {saves[k][-1]:.3f}s" for k in KINDS))
    res = {"device": "cpu" if runtime.cpu_mode() else torch.cuda.get_device_name(), "ranks": runtime.world_size(),
           "tokens_per_step": 2 * a.mbs * a.seq * runtime.world_size(),
           "step_s": {k: summary(v) for k, v in steps.items()},
           "save_s": {k: summary(v) for k, v in saves.items()},
           "step_ratio": summary([d / p for d, p in zip(steps["distributed"], steps["replicated"])]),
           "save_ratio": summary([d / p for d, p in zip(saves["distributed"], saves["replicated"])])}
    if runtime.rank() == 0:
        for what in ("step", "save"):
            s = res[f"{what}_ratio"]
            print(f"{what}: distributed / replicated = {s['median']:.3f} (min {s['min']:.3f}, max {s['max']:.3f}; "
                  f"distributed {res[what + '_s']['distributed']['median']:.3f}s, replicated "
                  f"{res[what + '_s']['replicated']['median']:.3f}s)")
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    runtime.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if "RANK" in os.environ:
        return worker(a)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              __file__, *sys.argv[1:]], env=env))


if __name__ == "__main__":
    main()
