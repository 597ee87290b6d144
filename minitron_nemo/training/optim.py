"""Megatron-Core DDP, optimizer (bf16 with fp32 main params, grad clipping) and LR schedule.

CPU mode: Megatron's mixed-precision optimizers check ``param.type()`` against ``torch.cuda.*Tensor``
names; ``cuda_type_names()`` makes CPU tensors report those names while the optimizer is built and
stepped. The distributed optimizer (optimizer state sharded over the data-parallel ranks) runs on CPU as
on GPU: gloo has reduce-scatter and all-gather into one tensor. It is used when requested and the job has
more than one data-parallel rank (with one, there is nothing to shard).
"""

from __future__ import annotations

import contextlib
import math

import torch
from megatron.core import parallel_state
from torch.overrides import TorchFunctionMode

from minitron_nemo import runtime
from minitron_nemo.errors import UserError


class _CudaTypeNames(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def cuda_type_names():
    """Context in which CPU tensors report CUDA type names (no-op on GPU)."""
    return _CudaTypeNames() if runtime.cpu_mode() else contextlib.nullcontext()


def use_distributed_optimizer(requested: bool) -> bool:
    """``trainer.optim.use_distributed_optimizer``, where there are data-parallel ranks to shard over."""
    return bool(requested) and parallel_state.get_data_parallel_world_size() > 1


def wrap_ddp(model, *, distributed_optimizer: bool, overlap: bool = False, overlap_param_gather: bool = False):
    """Megatron-Core ``DistributedDataParallel`` around this rank's model chunk (fp32 grad buffers);
    ``overlap``: gradient reduction per bucket during backward; ``overlap_param_gather`` (with the distributed
    optimizer only): the updated parameters gathered during the next forward."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                        use_distributed_optimizer=distributed_optimizer,
                                        overlap_param_gather=overlap_param_gather)
    return DistributedDataParallel(model.config, cfg, model)


def build_optimizer(ddp, opt_cfg, params_dtype: torch.dtype, distributed_optimizer: bool,
                    overlap_param_gather: bool = False):
    """Megatron Adam(W) with fp32 main params when training in bf16/fp16."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    oc = OptimizerConfig(optimizer="adam", lr=float(opt_cfg.lr), min_lr=float(opt_cfg.min_lr),
                         weight_decay=float(opt_cfg.weight_decay), adam_beta1=float(opt_cfg.adam_beta1),
                         adam_beta2=float(opt_cfg.adam_beta2), adam_eps=float(opt_cfg.adam_eps),
                         clip_grad=float(opt_cfg.clip_grad), bf16=params_dtype == torch.bfloat16,
                         fp16=params_dtype == torch.float16, params_dtype=params_dtype,
                         use_distributed_optimizer=distributed_optimizer,
                         overlap_param_gather=overlap_param_gather)
    with cuda_type_names():
        return get_megatron_optimizer(oc, [ddp])


def build_scheduler(optimizer, opt_cfg, train_iters: int, warmup_iters: int):
    """Linear warm-up to ``lr`` then cosine decay to ``min_lr`` at ``train_iters``."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if warmup_iters >= train_iters:
        raise UserError(f"trainer.warmup_iters={warmup_iters} must be < the number of training "
                        f"iterations ({train_iters})")
    wd = float(opt_cfg.weight_decay)
    return OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=float(opt_cfg.lr), min_lr=float(opt_cfg.min_lr),
                                   lr_warmup_steps=warmup_iters, lr_decay_steps=train_iters,
                                   lr_decay_style=str(opt_cfg.decay_style), start_wd=wd, end_wd=wd,
                                   wd_incr_steps=train_iters, wd_incr_style="constant")


def batch_layout(micro_batch_size: int, global_batch_size: int) -> int:
    """Gradient-accumulation steps: global batch = micro batch x accumulation x data parallel."""
    dp = parallel_state.get_data_parallel_world_size()
    if micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp):
        raise UserError(f"trainer.global_batch_size={global_batch_size} is not a multiple of "
                        f"micro_batch_size x data_parallel = {micro_batch_size} x {dp}")
    return global_batch_size // (micro_batch_size * dp)


def train_iterations(tcfg, seq_length: int) -> int:
    """``trainer.train_iters``, or the iterations a ``trainer.train_tokens`` budget buys."""
    if tcfg.train_tokens:
        return max(1, math.ceil(int(tcfg.train_tokens) / (int(tcfg.global_batch_size) * seq_length)))
    if not tcfg.train_iters or int(tcfg.train_iters) < 1:
        raise UserError("set trainer.train_iters=N or trainer.train_tokens=N")
    return int(tcfg.train_iters)
