"""Process setup: device selection, torch.distributed and Megatron-Core parallel state, rank helpers.

On a machine with CUDA GPUs everything runs as in any Megatron-Core job (NCCL, one GPU per rank).
Without a GPU (or with ``MINITRON_FORCE_CPU=1``) the same code runs in *CPU mode*, the path for
development, tests and demos: ``cpu_mode()`` decides it, ``init_distributed`` then uses the gloo backend
and installs the CUDA-to-CPU redirections of ``minitron_nemo/cpu_mode.py`` (device placements, the CUDA
RNG tracker, streams, events, memory statistics), and the layer spec uses a torch SDPA core attention
(see ``models/builder.py``).
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

from minitron_nemo.cpu_mode import enable_cpu_mode
from minitron_nemo.errors import UserError

_CPU_MODE: bool | None = None


def cpu_mode() -> bool:
    """True when this process runs without a GPU (decided once, on first call)."""
    global _CPU_MODE
    if _CPU_MODE is None:
        _CPU_MODE = os.environ.get("MINITRON_FORCE_CPU", "0") == "1" or not torch.cuda.is_available()
    return _CPU_MODE


def device() -> torch.device:
    return torch.device("cpu") if cpu_mode() else torch.device("cuda", torch.cuda.current_device())


# Set by minitron_nemo.launch for its ranks: a file rank 0 writes its store's port into. Rank 0 binds the port
# itself (port 0: the system picks a free one), so no other job can take it between its choice and its use.
STORE_FILE = "MINITRON_STORE_FILE"


def _launch_store(path: str, rank: int, world: int, timeout: datetime.timedelta):
    """The one-node job's TCP store: rank 0 hosts it and writes its port to ``path``; the others wait for the
    file, then connect."""
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if rank == 0:
        store = dist.TCPStore(host, 0, world, True, timeout=timeout, wait_for_workers=False)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(str(store.port))
        os.replace(tmp, path)
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 did not start the job's store within {timeout} ({path} never appeared)")
        time.sleep(0.02)
    with open(path) as f:
        port = int(f.read())
    return dist.TCPStore(host, port, world, False, timeout=timeout)


def _env_from_slurm() -> None:
    """Fill torch.distributed variables from SLURM_* when launched by ``srun`` (one task per GPU)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")


def world_size() -> int:
    """The number of ranks: torch.distributed's once it is initialised, before that the launcher's."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ else 1


def check_world(world: int, tp: int, pp: int, ep: int) -> None:
    """The launcher's world size against the layout, before any process group starts (every rank reaches
    the same verdict, so rank 0's line is the one shown)."""
    if world % (tp * pp) != 0:
        raise UserError(f"world size {world} is not divisible by tensor x pipeline parallel {tp}x{pp}; "
                        f"allowed: a multiple of {tp * pp} processes")
    if world % (tp * pp * ep) != 0:
        raise UserError(f"world size {world} is not divisible by tensor x pipeline x expert parallel "
                        f"{tp}x{pp}x{ep}; allowed: a multiple of {tp * pp * ep} processes")


def init_distributed(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                     seed: int = 1234, timeout_minutes: int = 30, expert_model_parallel_size: int = 1,
                     expert_tensor_parallel_size: int | None = None) -> None:
    """Initialise torch.distributed (torchrun, srun or a single process) and Megatron parallel state.

    Experts are split over ``expert_model_parallel_size`` ranks and each expert over
    ``expert_tensor_parallel_size`` ranks (None: the TP ranks, Megatron-Core's default; biased experts, as
    gpt-oss has, need 1)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if cpu_mode():
        enable_cpu_mode()
    _env_from_slurm()
    check_world(world_size(), tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store, rank_, world = None, rank(), world_size()
        if "RANK" not in os.environ:   # one process: an in-memory store, no port to take (and no launcher
            store = dist.HashStore()   # variables set, which a process this one starts would inherit)
        elif os.environ.get(STORE_FILE):
            store = _launch_store(os.environ[STORE_FILE], rank_, world, timeout)
        if not cpu_mode():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "gloo" if cpu_mode() else "nccl"
        if store is None:              # torchrun's or srun's rendezvous (MASTER_ADDR, MASTER_PORT)
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank_, world_size=world, timeout=timeout)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def init_parallel(par, seed: int = 1234) -> None:
    """``init_distributed`` from a job's ``parallel`` group."""
    init_distributed(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed,
                     expert_model_parallel_size=par.expert_model_parallel_size,
                     expert_tensor_parallel_size=par.expert_tensor_parallel_size)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    """This process's global rank: torch.distributed's once it is initialised; before that the launcher's
    (torchrun's ``RANK``, srun's ``SLURM_PROCID``), 0 for a plain single process."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def barrier() -> None:
    """Wait for every rank (a no-op without torch.distributed)."""
    if dist.is_initialized():
        dist.barrier()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)
