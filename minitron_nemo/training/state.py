"""Training checkpoints: student weights + optimizer + scheduler + data position + RNG; auto-resume.

    WORKDIR/checkpoints/iter_0000100/
        model.yaml, meta.json, tokenizer/, weights/     the student (``store.save_checkpoint``)
        train_state/rank_00000.pt                       optimizer (with the distributed optimizer: this rank's
                                                        shard of main parameters and Adam states), scheduler,
                                                        iteration, RNG (per rank)
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
        shard = dist_opt_shard(optimizer) if _uses_dist_opt(optimizer) else None
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    "iteration": iteration, "dist_opt_shard": shard, **state}, ts / f"rank_{runtime.rank():05d}.pt")
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
    if runtime.rank() == 0:
        for old in checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return path


def _inner_optimizers(optimizer) -> list:
    """The torch optimizers inside a Megatron (chained) optimizer."""
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def dist_opt_shard(optimizer) -> list:
    """This rank's part of a distributed optimizer: its main-parameter shards and their Adam states, in
    param-group order (with the data-parallel layout it was saved at, it restores exactly)."""
    out = []
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                out.append({"param": p.detach().clone(), **{k: (v.detach().clone() if torch.is_tensor(v) else v)
                                                             for k, v in inner.state.get(p, {}).items()}})
    return out


def load_dist_opt_shard(optimizer, shard: list) -> None:
    params = [(inner, p) for inner in _inner_optimizers(optimizer) for g in inner.param_groups for p in g["params"]]
    if len(params) != len(shard):
        raise UserError(f"the saved distributed-optimizer state has {len(shard)} parameter shards, this layout "
                        f"{len(params)}; resume needs the layout (TP x PP x DP) it was saved with")
    for (inner, p), saved in zip(params, shard):
        if saved["param"].shape != p.shape:
            raise UserError(f"a saved distributed-optimizer shard has shape {tuple(saved['param'].shape)}, this "
                            f"layout {tuple(p.shape)}; resume needs the layout (TP x PP x DP) it was saved with")
        p.copy_(saved["param"])
        # own tensors per parameter: Megatron's load_state_dict gives every parameter the same "step" tensor,
        # which torch's Adam would then advance once per parameter
        inner.state[p] = {k: v for k, v in saved.items() if k != "param"}


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
    # no_grad: the distributed optimizer copies its state into views of parameters that require grad
    with readers.reading(f, "training state"), torch.no_grad():
        optimizer.load_state_dict(s.pop("optimizer"))
        shard = s.pop("dist_opt_shard", None)
        if _uses_dist_opt(optimizer) != (shard is not None):
            raise UserError(f"{f} was saved {'with' if shard is not None else 'without'} the distributed optimizer; "
                            f"resume with trainer.optim.use_distributed_optimizer="
                            f"{'true' if shard is not None else 'false'} (the setting it was saved with)")
        if shard is not None:
            load_dist_opt_shard(optimizer, shard)
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
