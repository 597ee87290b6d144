"""Forward passes through Megatron-Core's pipeline schedules (any TP x PP x DP).

Every forward in the project (evaluation, calibration, checks) goes through
``megatron.core.pipeline_parallel.get_forward_backward_func`` so that pipeline parallelism is the
real Megatron one.
"""

from __future__ import annotations

from typing import Callable, Iterable, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from minitron_nemo import runtime
from minitron_nemo.models.packing import model_inputs


def position_ids_like(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def run_forward(model, batches: List[dict], on_output: Callable[[torch.Tensor, dict], None],
                *, labels: bool = False) -> None:
    """Forward-only pass of ``batches`` (dicts with ``tokens`` [b, s], optional ``labels``).

    On the last pipeline stage ``on_output(output, batch)`` is called per micro-batch with the
    vocab-parallel logits ``[b, s, V/TP]`` or, with ``labels=True``, the per-token loss ``[b, s]``.
    """
    if not batches:
        return
    dev = runtime.device()
    it = iter(batches)

    def step(data_iterator, m):
        batch = next(data_iterator)
        args, kwargs = model_inputs({k: v for k, v in batch.items() if k != "position_ids"}, dev)
        out = m(*args, labels=batch["labels"].to(dev) if labels else None, **kwargs)

        def loss_func(output):
            on_output(output, batch)
            return output.sum() * 0.0, {}

        return out, loss_func

    b, s = batches[0]["tokens"].shape
    was_training = model.training
    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=step, data_iterator=it, model=[model],
                                    num_microbatches=len(batches), seq_length=s, micro_batch_size=b,
                                    forward_only=True)
    model.train(was_training)


def full_logits(model, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None):
    """Full-vocabulary fp32 logits ``[b, s, V_padded]`` on every rank (for checks and small evals);
    ``segment_ids``: a packed row's documents (``models/packing.py``)."""
    results = []

    def keep(output, batch):
        results.append(tensor_parallel.gather_from_tensor_model_parallel_region(output).float())

    run_forward(model, [{"tokens": tokens, "segment_ids": segment_ids}], keep)
    out = results[0] if results else None
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        holder = [out]
        dist.broadcast_object_list(holder, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
        out = holder[0]
    return out


def lm_loss_sums(model, batches: Iterable[dict]) -> tuple[float, int]:
    """Sum of next-token NLL (nats) over ``loss_mask`` tokens and the token count, reduced over
    pipeline stages and data-parallel ranks so every rank gets the totals."""
    acc = torch.zeros(2, dtype=torch.float64)

    def add(loss, batch):
        mask = batch["loss_mask"].to(loss.device).float()
        acc[0] += (loss.float() * mask).sum().double().cpu()
        acc[1] += mask.sum().double().cpu()

    run_forward(model, list(batches), add, labels=True)
    if dist.is_initialized():
        dev = runtime.device()
        t = acc.to(dev)
        dist.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
        acc = t.cpu()
    return float(acc[0]), int(acc[1])
