"""Training checkpoints: student weights + optimizer + scheduler + data position + RNG; auto-resume.

    WORKDIR/checkpoints/iter_0000100/
        model.yaml, meta.json, tokenizer/, weights/     the student (``store.save_checkpoint``)
        train_state/rank_00000.pt                       optimizer, scheduler, iteration, RNG (per rank)
        train_state/dist_opt_00000.pt                   distributed-optimizer parameter state (if used)
        COMPLETE                                        written last; incomplete dirs are ignored

The teacher is never saved. Resume needs the same TP/PP/DP layout as the run that saved.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minitron_nemo import readers, runtime
from minitron_nemo.checkpoint import store
from minitron_nemo.errors import UserError
from minitron_nemo.outputs import write_error

PATTERN = re.compile(r"^iter_(\d{7})$")


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": None if runtime.cpu_mode() else torch.cuda.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_state(s: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and not runtime.cpu_mode():
        torch.cuda.set_rng_state(s["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(s["tracker"])


def checkpoints(root) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if PATTERN.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def latest(root) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def save(root, iteration: int, model, mc, optimizer, scheduler, state: dict, *, tokenizer_src, meta: dict,
         keep_last: int) -> Path:
    """Collectively save a training checkpoint, then drop all but the ``keep_last`` newest."""
    path = Path(root) / f"iter_{iteration:07d}"
    if runtime.rank() == 0 and path.exists():
        shutil.rmtree(path)
    try:
        store.save_checkpoint(model, path, mc, tokenizer_src=tokenizer_src, meta={**meta, "iteration": iteration})
        ts = path / "train_state"
        if runtime.rank() == 0:
            ts.mkdir(exist_ok=True)
        runtime.barrier()
        if hasattr(optimizer, "save_parameter_state") and _uses_dist_opt(optimizer):
            optimizer.save_parameter_state(str(ts / "dist_opt.pt"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    "iteration": iteration, **state}, ts / f"rank_{runtime.rank():05d}.pt")
        runtime.barrier()
        if runtime.rank() == 0:
            (path / "COMPLETE").write_text(str(iteration))
    except BaseException as exc:  # an incomplete checkpoint is never resumed from: free its space
        if runtime.rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        err = write_error(exc, path)
        if err is not None:
            raise err from None
        raise
        for old in checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return path


def _uses_dist_opt(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in subs)


def load(path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``path``; returns the saved train state."""
    path = Path(path)
    f = path / "train_state" / f"rank_{runtime.rank():05d}.pt"
    if not f.is_file():
        raise UserError(f"{path} has no training state for rank {runtime.rank()}; resume needs the layout "
                        f"(TP x PP x DP) it was saved with")
    store.load_weights(model, path)
    s = readers.torch_load(f, "training state")
    with readers.reading(f, "training state"):
        optimizer.load_state_dict(s.pop("optimizer"))
        if _uses_dist_opt(optimizer):
            optimizer.load_parameter_state(str(path / "train_state" / "dist_opt.pt"))
        scheduler.load_state_dict(s.pop("scheduler"))
        set_rng_state(s.pop("rng"))
        s["iteration"], s["consumed_samples"]  # noqa: B018 (present, or a KeyError naming the file)
    return s


def agree(ok: bool) -> bool:
    """True when ``ok`` holds on every rank."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=runtime.device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def load_latest_readable(root, model, optimizer, scheduler) -> tuple[Path, dict] | None:
    """Resume from the newest complete checkpoint that every rank can read, saying which ones were
    skipped; a one-line error naming the file when none can be read."""
    found = checkpoints(root)
    for i, path in enumerate(reversed(found)):
        err = None
        try:
            state = load(path, model, optimizer, scheduler)
        except UserError as e:
            err = e
        if agree(err is None):
            return path, state
        why = str(err) if err else "unreadable on another rank"
        if i + 1 == len(found):
            raise UserError(f"{why}; no older complete checkpoint under {root} to resume from (move "
                            f"{root} away to start over)")
        runtime.print0(f"[train] skipping {path.name}: {why}; resuming from the checkpoint before it")
    return None
