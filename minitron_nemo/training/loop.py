"""The training loop: Megatron's pipeline schedule per step, validation, checkpoints, auto-resume.

A *step function* pair drives the model:
  * ``forward(model, batch)`` runs this rank's chunk on a micro-batch (any pipeline stage),
  * ``loss(batch, output) -> (loss, {name: 0-d tensor})`` on the last stage.
Teacher correction (LM loss) and distillation (``distill/online.py``) plug different pairs into the
same loop. The global batch is ``micro_batch x accumulation x data_parallel``; losses are means over
each micro-batch's tokens, averaged over micro-batches and data-parallel ranks. Before each optimizer step
(and after each validation) a non-finite loss or gradient, or bad data, stops every rank (``faults.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from minitron_nemo import stop_signals, runtime
from minitron_nemo.models.packing import model_inputs
from minitron_nemo.training import faults, moe_aux
from minitron_nemo.training import state as ckpt
from minitron_nemo.training.metrics import MetricsLog, plot_losses
from minitron_nemo.training.optim import cuda_type_names


def lm_forward(model, batch):
    """Per-token LM loss ``[b, s]`` (last stage) or the hidden states (other stages)."""
    dev = runtime.device()
    args, kwargs = model_inputs(batch, dev)
    return model(*args, labels=batch["labels"].to(dev), **kwargs)


def lm_loss(batch, output):
    mask = batch["loss_mask"].to(output.device).float()
    loss = (output.float() * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"lm": loss.detach().clone()}


def setup_schedule(chunk, ddp, optimizer) -> None:
    """Hook the DDP grad sync and the optimizer's loss scale into the chunk's config."""
    from megatron.core.distributed import finalize_model_grads

    config = get_model_config(chunk)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = lambda _models, num_tokens=None, **kw: finalize_model_grads(
        [ddp], num_tokens)
    config.grad_scale_func = optimizer.scale_loss


def reduce_metrics(results: list, names=None) -> dict:
    """Mean over micro-batches (last stage), then over DP ranks; every rank gets the values."""
    names = names or (sorted(results[0]) if results else [])
    if not names:
        holder = [None]
        if dist.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast_object_list(holder, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                       group=parallel_state.get_pipeline_model_parallel_group())
        names = holder[0] or []
    elif dist.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list([list(names)], src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
    vec = torch.zeros(len(names), dtype=torch.float64)
    for r in results:
        vec += torch.stack([r[k].detach().double().cpu() for k in names])
    vec /= max(len(results), 1)
    if dist.is_initialized():
        t = vec.to(runtime.device())
        dist.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
        vec = t.cpu() / parallel_state.get_data_parallel_world_size()
    return {k: float(v) for k, v in zip(names, vec)}


def run_schedule(chunk, batches: list, forward, loss, *, forward_only: bool) -> list:
    """One pass of Megatron's schedule over ``batches`` (this DP rank's micro-batches)."""
    def step(data_iterator, model):
        batch = next(data_iterator)
        return forward(model, batch), partial(_wrap_loss, loss, batch)

    tokens = batches[0]["tokens"]  # [b, s], or [b, 2, s] of preference pairs (rows of the model: b x 2)
    s = tokens.shape[-1]
    b = tokens.numel() // s
    return get_forward_backward_func()(forward_step_func=step, data_iterator=iter(batches), model=[chunk],
                                       num_microbatches=len(batches), seq_length=s, micro_batch_size=b,
                                       forward_only=forward_only)


def _wrap_loss(loss, batch, output):
    value, metrics = loss(batch, output)  # the schedule divides ``value`` in place: log copies
    return value, {k: v.detach().clone() for k, v in metrics.items()}


def train_step(chunk, ddp, optimizer, scheduler, batches: list, forward, loss,
               before_step: Callable[[dict], None] | None = None) -> tuple[dict, float | None]:
    """One optimizer step; MoE students also log the router's load-balancing loss (``moe_aux``).
    ``before_step(losses)`` runs after the backward pass and before the optimizer steps (it may stop the job)."""
    chunk.train()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    results = run_schedule(chunk, batches, forward, loss, forward_only=False)
    losses = reduce_metrics(results)
    if before_step is not None:
        before_step(losses)
    with cuda_type_names():
        _ok, grad_norm, _zeros = optimizer.step()
    scheduler.step(increment=1)
    return {**losses, **moe_aux.take(get_model_config(chunk), len(batches))}, grad_norm


def evaluate(chunk, batches: list, forward, loss) -> dict:
    was = chunk.training
    chunk.eval()
    with torch.no_grad():
        results = run_schedule(chunk, batches, forward, loss, forward_only=True)
    chunk.train(was)
    return reduce_metrics(results)


@dataclass
class Trainer:
    """Owns the step loop; the recipe builds the pieces and calls ``fit()``."""
    chunk: object                    # module given to the schedule (DDP(student) or a KD wrapper)
    ddp: object                      # the student's DDP (grads, no_sync)
    optimizer: object
    scheduler: object
    mc: object                       # the student's ModelConfig (saved in checkpoints)
    train_batches: Callable[[int], Iterator[dict]]   # consumed_samples -> micro-batch iterator
    valid_batches: list
    forward: Callable
    loss: Callable
    valid_loss: Callable
    tcfg: object                     # trainer config node
    ccfg: object                     # checkpoint config node (save_interval, keep_last)
    workdir: Path
    train_iters: int
    num_microbatches: int
    global_batch_size: int
    seq_length: int
    flops_per_step: float = 0.0
    tokenizer_src: object = None
    meta: dict = field(default_factory=dict)
    iteration: int = 0
    consumed_samples: int = 0
    history: list = field(default_factory=list)

    @property
    def ckpt_root(self) -> Path:
        return Path(self.workdir) / "checkpoints"

    def resume(self) -> bool:
        """Load the latest complete checkpoint under ``workdir/checkpoints`` if there is one."""
        found = ckpt.load_latest_readable(self.ckpt_root, self.ddp.module, self.optimizer, self.scheduler)
        if found is None:
            return False
        last, s = found
        self.iteration, self.consumed_samples = s["iteration"], s["consumed_samples"]
        runtime.print0(f"[train] resumed from {last} (iteration {self.iteration}, "
                       f"{self.consumed_samples} samples consumed)")
        return True

    def save(self) -> Path:
        self.sync_params()
        return ckpt.save(self.ckpt_root, self.iteration, self.ddp.module, self.mc, self.optimizer, self.scheduler,
                         {"consumed_samples": self.consumed_samples}, tokenizer_src=self.tokenizer_src,
                         meta=self.meta, keep_last=int(self.ccfg.keep_last))

    def sync_params(self) -> None:
        """With ``overlap_param_gather`` the updated parameters are gathered by the next forward pass; gather
        them now (before a checkpoint, or when training ends and the model is used as it is)."""
        if getattr(self.ddp, "use_forward_hook", False):
            self.ddp.disable_forward_pre_hook()   # gathers the parameters
            self.ddp.enable_forward_pre_hook()

    def check_step(self, where: str, metrics: dict, training: bool) -> None:
        """Stop all ranks on a non-finite loss, gradient (``training``, before the optimizer steps) or
        noted data fault (``faults.check``); the checkpoints on disk are left as they are. Gradients are
        not checked under fp16 loss scaling, whose optimizer skips overflowing steps itself."""
        latest = ckpt.latest(self.ckpt_root)
        keep = ("; the optimizer did not step on it" if training else "") + (
            f"; the latest checkpoint {latest} is kept" if latest else "; no checkpoint was saved")
        grads = training and not get_model_config(self.chunk).fp16
        faults.check(f"{where} of {self.train_iters}", metrics, self.ddp.module, grads=grads, keep=keep)

    def validate(self, log: MetricsLog) -> dict:
        if not self.valid_batches:
            return {}
        v = evaluate(self.chunk, self.valid_batches, self.forward, self.valid_loss)
        self.check_step(f"validation after iteration {self.iteration}", v, training=False)
        log.valid(self.iteration, v)
        self.history.append({"kind": "valid", "iteration": self.iteration, **v})
        return v

    def fit(self, stop_at: int | None = None) -> dict:
        """Train to ``train_iters`` (or ``stop_at``, for tests of interrupted runs); returns the last
        validation metrics."""
        t = self.tcfg
        setup_schedule(self.chunk, self.ddp, self.optimizer)
        log = MetricsLog(self.workdir, self.train_iters, float(t.peak_tflops) * 1e12 if t.peak_tflops else None,
                         bool(t.tensorboard))
        end = min(self.train_iters, stop_at or self.train_iters)
        faults.take()  # faults noted before this run are not its own
        data = self.train_batches(self.consumed_samples)
        world = dist.get_world_size() if dist.is_initialized() else 1
        last_valid = {}
        if self.iteration == 0 and t.eval_interval and self.valid_batches:
            last_valid = self.validate(log)
        with stop_signals.graceful():
            last_valid = self._steps(end, data, log, world, last_valid)
        if self.iteration >= self.train_iters:
            if t.eval_interval and self.iteration % int(t.eval_interval) != 0:
                last_valid = self.validate(log)
            if not (ckpt.latest(self.ckpt_root) and ckpt.latest(self.ckpt_root).name == f"iter_{self.iteration:07d}"):
                self.save()
            if runtime.is_rank0() and log.path.is_file():
                plot_losses(log.path, Path(self.workdir) / "loss.png", str(self.workdir))
        self.sync_params()  # the caller evaluates or exports the model as it is
        return last_valid

    def _steps(self, end: int, data, log, world: int, last_valid: dict) -> dict:
        """Train steps up to ``end``; a stop signal ends the job after the current step (``stop_signals``)."""
        t, c = self.tcfg, self.ccfg
        while self.iteration < end:
            batches = [next(data) for _ in range(self.num_microbatches)]
            t0 = time.time()
            where = f"iteration {self.iteration + 1}"
            losses, grad_norm = train_step(self.chunk, self.ddp, self.optimizer, self.scheduler, batches,
                                           self.forward, self.loss,
                                           before_step=lambda m: self.check_step(where, m, training=True))
            dt = time.time() - t0
            self.iteration += 1
            self.consumed_samples += self.global_batch_size
            lr = self.optimizer.param_groups[0]["lr"]
            rec = log.train(self.iteration, losses, lr, grad_norm, self.global_batch_size * self.seq_length, dt,
                            self.flops_per_step, world)
            self.history.append(rec)
            if t.eval_interval and self.iteration % int(t.eval_interval) == 0:
                last_valid = self.validate(log)
            if c.save_interval and self.iteration % int(c.save_interval) == 0 and self.iteration < self.train_iters:
                self.save()
            sig = stop_signals.stop_requested()
            if sig:  # Ctrl-C / SIGTERM / Slurm preemption: checkpoint, then stop (or requeue)
                saved = None
                if getattr(c, "save_on_interrupt", True) or stop_signals.under_slurm():
                    latest = ckpt.latest(self.ckpt_root)
                    saved = latest if latest and latest.name == f"iter_{self.iteration:07d}" else self.save()
                stop_signals.stop(sig, f"at iteration {self.iteration} of {self.train_iters}; " + (
                    f"checkpoint {saved}; re-run the same command to resume" if saved else
                    "no new checkpoint (checkpointing.save_on_interrupt=false); a re-run resumes from the latest one"))
        return last_valid
