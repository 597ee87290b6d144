"""Training checkpoints: student weights + optimizer + scheduler + data position + RNG; auto-resume.

    WORKDIR/checkpoints/iter_0000100/
        model.yaml, meta.json, tokenizer/, weights/     the student (``store.save_checkpoint``)
        train_state/optimizer/                          Adam moments and fp32 main parameters, each tensor
                                                        keyed by the model parameter it belongs to (Megatron
                                                        ``dist_checkpointing``, like the weights)
        train_state/rank_00000.pt                       scheduler, iteration, Adam step, grad scaler, data
                                                        position, RNG and the layout that saved them (per rank)
        COMPLETE                                        written last; incomplete dirs are ignored

The teacher is never saved. Optimizer state is stored in model space, not as the distributed optimizer's
per-rank buffers, so a checkpoint resumes at any layout: the same TP x PP x DP exactly (RNG included), or
another one (TP, PP or DP changed, the distributed optimizer on or off) with the same weights and optimizer
state, the random state restarting from the seed.
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


def layout() -> dict:
    """This job's parallel layout, as saved with each rank's training state."""
    from megatron.core import parallel_state as ps

    return {"world": runtime.world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size()}


def describe(lay: dict) -> str:
    return f"TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}" + (f" x EP {lay['ep']}" if lay.get("ep", 1) > 1 else "")


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
            (ts / "optimizer").mkdir(parents=True)
        runtime.barrier()
        save_optimizer(optimizer, model, ts / "optimizer")
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state(), "iteration": iteration,
                    "adam_step": adam_step(optimizer), "grad_scalers": grad_scalers(optimizer), "layout": layout(),
                    **state}, ts / f"rank_{runtime.rank():05d}.pt")
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


def _subs(optimizer) -> list:
    """The Megatron optimizers of a (chained) optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def adam_step(optimizer) -> int:
    """Adam's step count (every parameter's; this rank's state has at least one)."""
    steps = {int(st["step"]) for sub in _subs(optimizer) for st in sub.optimizer.state.values() if "step" in st}
    return max(steps, default=0)


def grad_scalers(optimizer) -> list:
    return [sub.grad_scaler.state_dict() if getattr(sub, "grad_scaler", None) else None for sub in _subs(optimizer)]


# The distributed optimizer's state in model space, gathered to each DP group's first rank over gloo when
# saving (its memory stays bounded by one copy per model-parallel shard); any rank reads what it owns.
FORMAT = {"distrib_optim_sharding_type": "fully_reshardable", "distrib_optim_fully_reshardable_mem_efficient": True,
          "chained_optim_avoid_prefix": True}
MAIN_PARAM = "optimizer.state.fp32_param."        # Megatron's name (non-distributed optimizers)
DIST_MAIN_PARAM = "optimizer.state.param."        # the distributed optimizer's name for the same tensors


def optimizer_tensors(optimizer, model, *, loading: bool) -> tuple[list, dict]:
    """Megatron's sharded state dict of ``optimizer``, mapped onto the model's parameters (each Adam moment
    and fp32 main parameter keyed like the weight it belongs to, so any layout reads it): its sharded
    tensors, and the whole nested dict the optimizer loads from."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    nested = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=loading, metadata=FORMAT)
    leaves = [leaf for leaf in nested_values(nested) if isinstance(leaf, ShardedBase)]
    for leaf in leaves:   # one name for the main parameters, whichever optimizer holds them
        if leaf.key.startswith(DIST_MAIN_PARAM):
            leaf.key = MAIN_PARAM + leaf.key[len(DIST_MAIN_PARAM):]
    return leaves, nested


def save_optimizer(optimizer, model, directory) -> None:
    """Collectively write the optimizer's tensors only: what else it holds depends on its kind (distributed
    or not) and is saved with the rank's training state."""
    store.save_sharded(_named(optimizer_tensors(optimizer, model, loading=False)[0]), directory)


def _named(leaves: list) -> dict:
    """Sharded tensors as a flat state dict (each is saved under its own key; these names are local, and a
    rank without any, as the distributed optimizer's other DP ranks when saving, adds no common state)."""
    return {f"t{i}": leaf for i, leaf in enumerate(leaves)}


def _prime(optimizer, step: int) -> None:
    """Give every parameter Adam state (zero moments, the saved step) before it is filled: Megatron's own
    initialisation leaves torch Adam without the "step" its state dicts need."""
    for sub in _subs(optimizer):
        for group in sub.optimizer.param_groups:
            for p in group["params"]:
                st = sub.optimizer.state[p]
                if not st:
                    st.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                st["step"] = torch.tensor(float(step))


def _stored_keys(leaf) -> set:
    """The keys ``leaf`` is saved under: a factory (Megatron-Core saves a fused tensor, such as the Mamba mixer's
    in_proj and conv1d, as its parts) under those of the tensors it builds."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(leaf, ShardedTensorFactory):
        return {t.key for t in nested_values(leaf.build())}
    return {leaf.key}


def load_optimizer(optimizer, model, directory, weights, step: int) -> None:
    """Fill ``optimizer`` from ``directory`` (``save_optimizer``'s tensors, any layout) and set Adam's step.
    fp32 main parameters a checkpoint lacks (saved by an fp32 optimizer, which keeps none) are read from
    ``weights``, the checkpoint's fp32 weights."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    optimizer.reload_model_params()       # main parameters from the loaded weights
    _prime(optimizer, step)
    leaves, nested = optimizer_tensors(optimizer, model, loading=True)
    saved = store.saved_keys(directory)
    present = {id(leaf): _stored_keys(leaf) <= saved for leaf in leaves}
    missing = sorted(leaf.key for leaf in leaves if not present[id(leaf)])
    if any(not k.startswith(MAIN_PARAM) for k in missing):
        raise UserError(f"{directory} has no optimizer state for {missing[0]}; resume with the model it was saved "
                        f"with")
    wanted = [leaf for leaf in leaves if present[id(leaf)]]
    got = store.load_sharded(_named(wanted), directory, "optimizer state")
    loaded = [got[f"t{i}"] for i in range(len(wanted))]
    from_weights = [leaf for leaf in leaves if not present[id(leaf)]]
    for leaf in from_weights:      # the fp32 weights themselves
        leaf.key = leaf.key[len(MAIN_PARAM):]
    if from_weights:
        got = store.load_sharded(_named(from_weights), weights, "checkpoint weights")
        loaded += [got[f"t{i}"] for i in range(len(from_weights))]
    by_leaf = {id(leaf): t for leaf, t in zip(wanted + from_weights, loaded)}

    def fill(leaf):
        if isinstance(leaf, ShardedBase):
            return by_leaf[id(leaf)]
        return leaf.unwrap() if isinstance(leaf, LocalNonpersistentObject) else leaf

    dict_list_map_inplace(fill, nested)
    subs = _subs(optimizer)
    for sub, sub_state in zip(subs, [nested] if len(subs) == 1 else [nested[i] for i in range(len(subs))]):
        param_state = sub_state.pop("param_state", None)
        sub_state.pop("param_state_sharding_type", None)
        sub.load_state_dict(sub_state)
        if param_state is not None:    # the distributed optimizer: this rank's part of each tensor
            for st in sub.optimizer.state.values():   # it copies into every state entry but gives no "step"
                del st["step"]
            sub.load_parameter_state_from_fully_reshardable(param_state)
    for sub in subs:
        # own tensor per parameter: a shared "step" tensor would be advanced once per parameter
        for st in sub.optimizer.state.values():
            st["step"] = torch.tensor(float(step))


def _restore_grad_scalers(optimizer, saved: list) -> None:
    for sub, sd in zip(_subs(optimizer), saved):
        if sd is not None and getattr(sub, "grad_scaler", None):
            sub.grad_scaler.load_state_dict(sd)


def load(path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``path``; returns the saved train state. At the
    layout that saved it every rank reads its own state; at another, rank 0's (the RNG restarts from the
    seed)."""
    path = Path(path)
    ts = path / "train_state"
    own, first = ts / f"rank_{runtime.rank():05d}.pt", ts / "rank_00000.pt"
    if not (ts / "optimizer").is_dir():
        raise UserError(f"{path} has no model-space optimizer state (train_state/optimizer); it was written by "
                        f"an earlier version: resume with that version, or move {path.parent} away to start over")
    s = readers.torch_load(own, "training state") if own.is_file() else None
    same = s is not None and s.get("layout") == layout()
    if not same:
        s = readers.torch_load(first, "training state")
    store.load_weights(model, path)
    # no_grad: the distributed optimizer copies its state into views of parameters that require grad
    with readers.reading(ts, "training state"), torch.no_grad():
        load_optimizer(optimizer, model, ts / "optimizer", path / "weights", int(s.pop("adam_step")))
        _restore_grad_scalers(optimizer, s.pop("grad_scalers"))
        scheduler.load_state_dict(s.pop("scheduler"))
        rng = s.pop("rng")
        if same:
            set_rng_state(rng)
        else:
            runtime.print0(f"[train] {path.name} was saved at {describe(s['layout'])}; resuming at "
                           f"{describe(layout())}: weights and optimizer state resharded, random state from the seed")
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
