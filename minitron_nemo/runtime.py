"""Process setup: device selection, CPU mode, torch.distributed and Megatron-Core parallel state.

On a machine with CUDA GPUs everything runs as in any Megatron-Core job (NCCL, one GPU per rank).
Without a GPU the same code runs in *CPU mode*, the path for development, tests and demos:
  * the gloo backend,
  * every CUDA device placement (``device="cuda"``, ``tensor.cuda()``, ``torch.cuda.current_device``)
    redirected to the CPU through a ``TorchFunctionMode``,
  * Megatron's CUDA RNG tracker backed by the CPU generator,
  * CUDA streams and events (``torch.cuda.current_stream``/``Stream``/``Event``/``stream``...),
    memory statistics and NVTX ranges replaced by CPU stand-ins: work on the CPU is synchronous,
    so every wait is a no-op (Megatron-Core 0.19 calls ``torch.cuda.current_stream()`` in DDP's
    gradient sync on every step),
  * a torch SDPA core attention in the layer spec (see ``models/builder.py``).
CPU mode is chosen automatically when ``torch.cuda.is_available()`` is false.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from minitron_nemo.errors import UserError

_CPU_MODE: bool | None = None
_MODE_STACK = None


def cpu_mode() -> bool:
    """True when this process runs without a GPU (decided once, on first call)."""
    global _CPU_MODE
    if _CPU_MODE is None:
        _CPU_MODE = os.environ.get("MINITRON_FORCE_CPU", "0") == "1" or not torch.cuda.is_available()
    return _CPU_MODE


def device() -> torch.device:
    return torch.device("cpu") if cpu_mode() else torch.device("cuda", torch.cuda.current_device())


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpu(TorchFunctionMode):
    """Redirects CUDA placements to the CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], torch.device("cpu")) + tuple(args[2:])
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = torch.device("cpu")
        kwargs.pop("pin_memory", None)
        return func(*args, **kwargs)


def _cpu_rng_get(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream`` in CPU mode: CPU kernels run synchronously, so waits are no-ops."""

    def __init__(self, device=None, priority=0, **kwargs):
        self.device = torch.device("cpu")
        self.priority = priority

    @staticmethod
    def priority_range():
        return 0, 0

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        event = event if event is not None else _CpuEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event`` in CPU mode (``elapsed_time`` measures host time)."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, **kwargs):
        self._time = None

    def record(self, stream=None) -> None:
        self._time = time.perf_counter()

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event) -> float:
        return (end_event._time - self._time) * 1000.0


_CPU_STREAM = _CpuStream()


def enable_cpu_mode() -> None:
    """Install the CPU redirections (idempotent)."""
    global _MODE_STACK
    if _MODE_STACK is not None:
        return
    # One function object per patched name: torch Dynamo's trace rules reject an object registered
    # under two torch.cuda names with different rules ("Duplicate torch object").
    torch.cuda.current_device = lambda: 0
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    # Megatron's RNG tracker forks "CUDA" generator states: back them with the CPU generator.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Streams and events (Megatron-Core 0.19's DDP start_grad_sync calls current_stream() every step).
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.current_stream = lambda *a, **k: _CPU_STREAM
    torch.cuda.default_stream = lambda *a, **k: _CPU_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.set_stream = lambda *a, **k: None
    torch.cuda.is_current_stream_capturing = lambda: False
    torch.cuda.nvtx.range_push = lambda *a, **k: None
    torch.cuda.nvtx.range_pop = lambda *a, **k: None
    # Memory statistics.
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_reserved = lambda *a, **k: 0
    torch.cuda.memory_reserved = lambda *a, **k: 0
    torch.cuda.memory_stats = lambda *a, **k: {}
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_rng_get
    mrandom._set_cuda_rng_state = _cpu_rng_set
    mode = _CudaToCpu()
    mode.__enter__()
    _MODE_STACK = mode
    # The mode is thread-local state that autograd does not carry into custom Functions' backward
    # (Megatron's MoE dispatchers allocate "CUDA" buffers there): run each of them under it too.
    _backward_under_mode(torch.autograd.function.BackwardCFunction)
    dist.all_to_all_single = _all_to_all_single_with_list_splits(dist.all_to_all_single)


def _backward_under_mode(cls) -> None:
    apply = cls.apply

    def apply_on_cpu(self, *args):
        with _CudaToCpu():
            return apply(self, *args)

    cls.apply = apply_on_cpu


def _all_to_all_single_with_list_splits(fn):
    """Megatron's all-to-all token dispatcher passes its split sizes as CPU tensors (NCCL's binding takes
    them); gloo's binding takes only sequences of ints."""

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return fn(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    return all_to_all_single


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def init_distributed(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                     seed: int = 1234, timeout_minutes: int = 30, expert_model_parallel_size: int = 1) -> None:
    """Initialise torch.distributed (torchrun, srun or a single process) and Megatron parallel state.

    Experts are split over ``expert_model_parallel_size`` ranks and each expert over the TP ranks
    (Megatron-Core's default expert tensor parallelism)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if cpu_mode():
        enable_cpu_mode()
    _env_from_slurm()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = "0", "1", "0"
        if not cpu_mode():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="gloo" if cpu_mode() else "nccl",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    mp = tensor_model_parallel_size * pipeline_model_parallel_size
    if world % mp != 0:
        raise UserError(f"world size {world} is not divisible by tensor x pipeline parallel "
                        f"{tensor_model_parallel_size}x{pipeline_model_parallel_size}")
    if world % (mp * expert_model_parallel_size) != 0:
        raise UserError(f"world size {world} is not divisible by tensor x pipeline x expert parallel "
                        f"{tensor_model_parallel_size}x{pipeline_model_parallel_size}x{expert_model_parallel_size}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def init_parallel(par, seed: int = 1234) -> None:
    """``init_distributed`` from a job's ``parallel`` group."""
    init_distributed(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed,
                     expert_model_parallel_size=par.expert_model_parallel_size)


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
