"""Stop signals: a user's Ctrl-C / SIGTERM, and Slurm's preemption / time-limit signals.

Inside the training loop (``graceful()``), SIGINT and SIGTERM (and SIGUSR1) only set a flag; the loop
polls ``stop_requested()`` once per step (all ranks agree, since saving is collective), saves a
checkpoint, and calls ``stop()``:

* under Slurm, for SIGTERM / SIGUSR1: exit ``REQUEUE_EXIT``; the batch script of
  ``launchers/submit.py`` (which forwards ``--signal=B:USR1@120`` and preemption's SIGTERM to every
  rank) then runs ``scontrol requeue`` and the job resumes from the checkpoint;
* otherwise: one line on stderr (the iteration, the checkpoint, and that a re-run resumes) and exit
  130 (SIGINT) or 143 (SIGTERM). A second Ctrl-C stops at once, without a new checkpoint.

Outside the loop (``entry()``, called by every recipe's entry point) Ctrl-C and SIGTERM raise
``Interrupted``, which the entry point turns into one line and exit 130 / 143; outputs are written
atomically, so an interrupted write leaves the previous output as it was.

Under Slurm (``SLURM_JOB_ID`` set) or with ``MINITRON_STOP_SIGNALS=1`` the flag handlers for SIGTERM /
SIGUSR1 are installed on import, so that the dist-checkpoint writer's forked processes inherit them and
the signal does not kill them in the middle of a checkpoint; ``exit_for_requeue`` ends any child left
before leaving.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys

from minitron_nemo import runtime
from minitron_nemo.outputs import release_locks

REQUEUE_EXIT = 85
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM outside the training loop."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def under_slurm() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID")) or os.environ.get("MINITRON_STOP_SIGNALS") == "1"


def _handler(signum, _frame):
    if not _received and under_slurm() and signum != signal.SIGINT:
        print(f"[signals] {signal.Signals(signum).name} received: checkpoint at the end of this step, then exit "
              f"{REQUEUE_EXIT}", file=sys.stderr, flush=True)
    elif not _received:
        print(f"[signals] {signal.Signals(signum).name}: finishing this step, then checkpoint and stop "
              f"(Ctrl-C again to stop at once)", flush=True)
    elif signum == signal.SIGINT:
        raise Interrupted(signum)
    _received.append(signum)


def _raise(signum, _frame):
    raise Interrupted(signum)


def install() -> None:
    for s in SIGNALS:
        signal.signal(s, _handler)


def entry() -> None:
    """Entry points: Ctrl-C / SIGTERM become ``Interrupted`` (SIGTERM keeps the flag handler under Slurm)."""
    signal.signal(signal.SIGINT, _raise)
    if not under_slurm():
        signal.signal(signal.SIGTERM, _raise)


@contextlib.contextmanager
def graceful():
    """The training loop: stop signals set a flag that the loop polls between steps."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    before = {s: signal.getsignal(s) for s in sigs}
    for s in sigs:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def received() -> bool:
    """This process got a stop signal (no communication)."""
    return bool(_received)


def stop_requested() -> int:
    """The stop signal's number on every rank when any rank got one (a max all-reduce), else 0."""
    import torch
    import torch.distributed as dist

    mine = _received[0] if _received else 0
    if not dist.is_initialized():
        return mine
    flag = torch.tensor([mine], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def _leave(code: int, line: str | None = None) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    for child in multiprocessing.active_children():  # os._exit skips multiprocessing's own cleanup
        child.kill()
    release_locks()
    sys.stdout.flush()
    if line and runtime.rank() == 0:
        print(line, file=sys.stderr, flush=True)
    os._exit(code)


def exit_for_requeue() -> None:
    """Leave after the checkpoint was saved; the batch script requeues the job."""
    _leave(REQUEUE_EXIT)


def stop(signum: int, where: str) -> None:
    """Leave after a stop signal: requeue under Slurm (SIGTERM / SIGUSR1), else one line and 128 + signal."""
    if under_slurm() and signum != signal.SIGINT:
        exit_for_requeue()
    _leave(128 + signum, f"interrupted by {signal.Signals(signum).name} {where}")


if under_slurm():
    install()
