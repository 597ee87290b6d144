"""Shared recipe setup for training jobs (teacher correction, distillation, the ranked search's short
runs): the teacher source, the configured model shape, and ``build_trainer`` (DDP, optimizer, LR
schedule and the ``Trainer`` running one ``Step``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from minitron_nemo import runtime
from minitron_nemo.checkpoint import store
from minitron_nemo.config import model_config
from minitron_nemo.errors import UserError
from minitron_nemo.models.config import ModelConfig

SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "vocab_size")


def resolve_source(path) -> str:
    """``smollm2`` names the cached SmolLM2-135M HF dir; anything else is a path."""
    if str(path) == "smollm2":
        from minitron_nemo.data import assets

        return str(assets.smollm2_hf_dir())
    if not Path(path).is_dir():
        raise UserError(f"teacher.checkpoint={path} does not exist; allowed: an HF model dir, a minitron_nemo "
                        f"checkpoint or smollm2")
    return str(path)


def teacher_source(cfg, *, planned: bool = False, local: bool = True) -> tuple[str, bool]:
    """``(path, corrected)``: where the job's teacher comes from: ``teacher.corrected_checkpoint`` when it
    exists (``planned``: when it is configured, as in a chain whose correction runs first), else
    ``teacher.checkpoint`` (``smollm2`` resolved and the directory checked when ``local``; left as written
    for a job that runs elsewhere)."""
    c = OmegaConf.select(cfg, "teacher.corrected_checkpoint", default=None)
    if c and (planned or store.is_checkpoint(c)):
        return str(c), True
    src = cfg.teacher.checkpoint
    return (resolve_source(src) if local else str(src)), False


def check_model_shape(cfg, mc: ModelConfig, what: str) -> None:
    """When the job names a ``model`` shape, the loaded checkpoint must have it."""
    node = cfg.get("model")
    if node is None:
        return
    want = model_config(node)
    diff = [f"{k} {getattr(mc, k)} != {getattr(want, k)}" for k in SHAPE_KEYS if getattr(mc, k) != getattr(want, k)]
    if diff:
        raise UserError(f"{what} does not have the shape of the configured model: {', '.join(diff)}")


def to_dict(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


# ----------------------------------------------------------------------------- trainer
def _itself(ddp):
    return ddp


@dataclass
class Step:
    """What one training step runs: ``forward`` / ``loss`` / ``valid_loss`` for the ``Trainer``; ``wrap``
    turns the student's DDP into the module the schedule runs (DDP itself, or a KD wrapper around it);
    ``teacher_mc``: the model whose forward runs beside the student's every step (counted in the FLOPs),
    None when there is none. Distillation steps: ``distill/step.py``."""
    forward: Callable
    loss: Callable
    valid_loss: Callable
    wrap: Callable = _itself
    teacher_mc: ModelConfig | None = None


def build_trainer(model, mc: ModelConfig, step: Step, *, tcfg, ccfg, params_dtype, workdir, train_batches,
                  valid_batches: list, train_iters: int, seq_length: int, tokenizer_src, meta: dict):
    """DDP around ``model``, its optimizer and LR schedule (``tcfg.optim``; ``train_iters`` with
    ``tcfg.warmup_iters`` of warm-up) and the ``Trainer`` that runs ``step`` on them, checkpointing
    (``ccfg``) in ``workdir``. The caller calls ``resume()`` and ``fit()``."""
    from minitron_nemo.training import optim
    from minitron_nemo.training.loop import Trainer
    from minitron_nemo.training.metrics import flops_per_token

    from megatron.core import parallel_state as ps

    o = tcfg.optim
    dist_opt = optim.use_distributed_optimizer(bool(o.use_distributed_optimizer))
    gather = bool(o.get("overlap_param_gather", False)) and dist_opt
    runtime.print0(f"[train] TP {ps.get_tensor_model_parallel_world_size()} x PP "
                   f"{ps.get_pipeline_model_parallel_world_size()} x DP {ps.get_data_parallel_world_size()}"
                   + (", sequence parallel" if getattr(model.config, "sequence_parallel", False) else "")
                   + (", distributed optimizer (its state sharded over the DP ranks)" if dist_opt else "")
                   + (", gradient reduce overlapped" if o.get("overlap_grad_reduce") else "")
                   + (", parameter gather overlapped" if gather else ""))
    ddp = optim.wrap_ddp(model, distributed_optimizer=dist_opt, overlap=bool(o.get("overlap_grad_reduce", False)),
                         overlap_param_gather=gather)
    optimizer = optim.build_optimizer(ddp, o, params_dtype, dist_opt, overlap_param_gather=gather)
    scheduler = optim.build_scheduler(optimizer, tcfg.optim, train_iters, int(tcfg.warmup_iters))
    gbs = int(tcfg.global_batch_size)
    per_token = flops_per_token(mc, seq_length, True)
    if step.teacher_mc is not None:
        per_token += flops_per_token(step.teacher_mc, seq_length, False)
    return Trainer(chunk=step.wrap(ddp), ddp=ddp, optimizer=optimizer, scheduler=scheduler, mc=mc,
                   train_batches=train_batches, valid_batches=valid_batches, forward=step.forward, loss=step.loss,
                   valid_loss=step.valid_loss, tcfg=tcfg, ccfg=ccfg, workdir=workdir, train_iters=train_iters,
                   num_microbatches=optim.batch_layout(int(tcfg.micro_batch_size), gbs), global_batch_size=gbs,
                   seq_length=seq_length, flops_per_step=per_token * gbs * seq_length, tokenizer_src=tokenizer_src,
                   meta=meta)
