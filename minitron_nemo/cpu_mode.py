"""CPU mode: Megatron-Core without a GPU (the path for development, tests and demos).

Megatron-Core is written for CUDA: it places tensors on ``"cuda"``, keeps its RNG states in CUDA
generators, and synchronises on CUDA streams and events. ``enable_cpu_mode()`` makes that code run on
the CPU, unchanged, by patching torch and Megatron-Core in this process (once; it is idempotent):

  * every CUDA device placement (``device="cuda"``/an int device, ``tensor.cuda()``,
    ``tensor.to("cuda")``, ``pin_memory=``) is redirected to the CPU through a ``TorchFunctionMode``
    that stays entered for the rest of the process, and is re-entered around every custom autograd
    Function's backward (the mode is thread-local state autograd does not carry there; Megatron's MoE
    dispatchers allocate "CUDA" buffers in backward);
  * ``torch.cuda.current_device``/``set_device``/``synchronize``/``empty_cache`` become no-ops (device 0);
  * the CUDA RNG calls (``torch.cuda.manual_seed``, ``get_rng_state``/``set_rng_state``, and Megatron's
    ``tensor_parallel.random._get_cuda_rng_state``/``_set_cuda_rng_state``) are backed by the CPU
    generator, so Megatron's CUDA RNG tracker forks CPU states;
  * CUDA streams and events (``torch.cuda.Stream``/``Event``/``current_stream``/``default_stream``/
    ``stream``/``set_stream``/``is_current_stream_capturing``), NVTX ranges and memory statistics are
    replaced by CPU stand-ins: CPU work is synchronous, so every wait is a no-op (Megatron-Core 0.19
    calls ``torch.cuda.current_stream()`` in DDP's gradient sync on every step);
  * ``torch.distributed.all_to_all_single`` accepts split sizes given as tensors (Megatron's all-to-all
    token dispatcher passes them so; gloo's binding takes only sequences of ints).

Whether a process runs in CPU mode, and the gloo backend it then uses, is decided in ``runtime.py``
(``runtime.cpu_mode()``, ``runtime.init_distributed``, which calls ``enable_cpu_mode``); the torch SDPA
core attention and torch norms of the CPU layer spec are in ``models/builder.py`` and ``models/layers.py``.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_MODE_STACK = None


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
    # The tracker warns when the CPU generator moves inside a fork; here the "CUDA" state it forks is the CPU
    # generator, so every random initialisation inside a fork (the Mamba mixer's) would warn, meaninglessly.
    logging.getLogger(mrandom.__name__).addFilter(
        lambda record: record.getMessage() != "CPU RNG state changed within GPU RNG context")
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
