"""Preemption under Slurm: SIGTERM / SIGUSR1 ask the training loop to checkpoint and stop.

The sbatch scripts of ``launchers/submit.py`` forward the time-limit signal (``--signal=B:USR1@120``)
and preemption's SIGTERM to every rank. Handlers installed here only set a flag; the loop polls
``stop_requested()`` once per step (all ranks agree, since saving is collective), saves, and calls
``exit_for_requeue()``: exit code ``REQUEUE_EXIT`` tells the batch script to ``scontrol requeue`` the
job, which then resumes from the latest checkpoint. Handlers are installed on import under Slurm
(``SLURM_JOB_ID`` set) or when ``MINITRON_STOP_SIGNALS=1``; the dist-checkpoint writer's Manager
process has them too (spawned, it re-imports the recipe; forked in CPU mode, it inherits them), so the
signal does not kill it in the middle of that checkpoint, and ``exit_for_requeue`` ends it before leaving.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys

REQUEUE_EXIT = 85
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def _handler(signum, _frame):
    if not _received:
        print(f"[signals] {signal.Signals(signum).name} received: checkpoint at the end of this step, then exit "
              f"{REQUEUE_EXIT}", file=sys.stderr, flush=True)
    _received.append(signum)


def install() -> None:
    for s in SIGNALS:
        signal.signal(s, _handler)


def received() -> bool:
    """This process got a stop signal (no communication)."""
    return bool(_received)


def stop_requested() -> bool:
    """True on every rank when any rank got a stop signal (a max all-reduce when distributed)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return received()
    flag = torch.tensor([1 if _received else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def exit_for_requeue() -> None:
    """Leave after the checkpoint was saved; the batch script requeues the job."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    for child in multiprocessing.active_children():  # os._exit skips multiprocessing's own cleanup
        child.kill()
    sys.stdout.flush()
    os._exit(REQUEUE_EXIT)


if os.environ.get("SLURM_JOB_ID") or os.environ.get("MINITRON_STOP_SIGNALS") == "1":
    install()
