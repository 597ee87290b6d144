"""A tiny training job (no model download) with the distillation job's CLI, checkpoints and resume.

    [srun|torchrun] python tests/slurm/tiny_job.py --config-name smollm2_demo workdir=DIR trainer.train_iters=N
        checkpointing.save_interval=K          (TINY_STEP_SECONDS=S: sleep per step, default 0.2)

Data-parallel least squares on gloo: gradients all-reduced, a checkpoint every K steps under
WORKDIR/checkpoints/step_XXXX.pt, automatic resume from the latest, and the preemption hook of
``minitron_nemo.launch_signals`` polled every step. Writes WORKDIR/result.json with the final loss.
"""

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from minitron_nemo import launch_signals, runtime
from minitron_nemo.config import compose
from minitron_nemo.errors import user_errors_exit


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 8, generator=g)
    return x, x @ torch.arange(1.0, 9.0) + 0.1 * torch.randn(16, generator=g)


@user_errors_exit
def main():
    pause = float(os.environ.get("TINY_STEP_SECONDS", "0.2"))
    cfg = compose("smollm2_demo")
    iters, every = int(cfg.trainer.train_iters), int(cfg.checkpointing.save_interval)
    root = Path(cfg.workdir) / "checkpoints"
    runtime._env_from_slurm()
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    w, step = torch.zeros(8), 0
    found = sorted(root.glob("step_*.pt"))
    if found:
        s = torch.load(found[-1])
        w, step = s["w"], s["step"]
        runtime.print0(f"[tiny] resumed from {found[-1]} (step {step})")
    runtime.print0(f"[tiny] rank {rank}/{world} on {os.uname().nodename}, master "
                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")

    def save():
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            torch.save({"w": w, "step": step}, root / f".tmp_{step:04d}.pt")
            os.replace(root / f".tmp_{step:04d}.pt", root / f"step_{step:04d}.pt")
            print(f"[tiny] checkpoint step {step}", flush=True)

    while step < iters:
        x, y = batch(step, rank)
        loss = ((x @ w - y) ** 2).mean()
        grad = 2 * x.T @ (x @ w - y) / len(y)
        if dist.is_initialized():
            dist.all_reduce(grad)
            grad /= world
            dist.all_reduce(loss)
            loss /= world
        w = w - 0.05 * grad
        step += 1
        runtime.print0(f"[tiny] step {step} loss {loss.item():.6f}")
        time.sleep(pause)
        if step % every == 0 and step < iters:
            save()
        if launch_signals.stop_requested():
            save()
            runtime.print0(f"[tiny] stopping at step {step} for requeue")
            launch_signals.exit_for_requeue()
    save()
    if rank == 0:
        Path(cfg.workdir, "result.json").write_text(json.dumps({"loss": loss.item(), "step": step, "world": world}))
    runtime.print0(f"[tiny] done: final loss {loss.item():.6f}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
