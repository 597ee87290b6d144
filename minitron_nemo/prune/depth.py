"""Depth pruning: which layers to drop, and the LM-loss passes that score them.

Criteria (``prune.layer_criterion``), each ranking the L layers of the source model to drop ``k``:

  bi     Block Importance ``layer_bi [L]`` (1 - mean cos between a layer's input and output hidden
         states; computed by ``importance.estimate`` in the width pass): drops the k layers with the
         lowest BI.
  loss   ``layer_loss [L]`` from ``layer_loss_scores``: the increase of the LM loss when that single
         layer is skipped (higher = more important); drops the k layers whose removal raises it least.
  block  (default, P2) ``block_loss_k{k} [L - k + 1]`` from ``block_loss_scores``: the LM loss with the
         contiguous block of k layers starting there skipped; drops the block with the lowest loss.

Score passes return ``{name: fp32 CPU tensor}`` (plus ``full_loss [1]``, the unpruned model's loss),
identical on every rank; they need one extra forward pass per candidate layer/block and run only on
request. ``select_layers`` returns the kept old layers, 0-indexed and in order (``drop_layers`` given
explicitly is 1-indexed, the NeMo convention). A skipped layer is replaced by identity (``skip_layers``),
at any TP x PP x DP.
"""

from __future__ import annotations

import contextlib
import time
from typing import List, Optional

import torch
from megatron.core import parallel_state

from minitron_nemo import runtime
from minitron_nemo.errors import UserError
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.models.forward import lm_loss_sums
from minitron_nemo.models.hybrid import is_mamba_layer


# ----------------------------------------------------------------------------- LM loss with layers skipped
def _identity_layer(hidden_states=None, *args, context=None, **kwargs):
    return hidden_states, context


def _identity_mamba_layer(hidden_states=None, *args, **kwargs):
    return hidden_states  # a hybrid model's Mamba layer returns the hidden states alone


@contextlib.contextmanager
def skip_layers(model, num_layers_total: int, drop: set):
    """Temporarily replace the forward of the (0-indexed, global) layers in ``drop`` by identity."""
    off = layer_offset_of(model, num_layers_total)
    changed = []
    for j, layer in enumerate(model.decoder.layers):
        if off + j in drop:
            layer.forward = _identity_mamba_layer if is_mamba_layer(layer) else _identity_layer
            changed.append(layer)
    try:
        yield
    finally:
        for layer in changed:
            del layer.forward


def layer_offset_of(model, num_layers_total: int) -> int:
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    return parallel_state.get_pipeline_model_parallel_rank() * (num_layers_total // pp)


def mean_loss(model, batches) -> float:
    s, n = lm_loss_sums(model, batches)
    return s / max(n, 1)


def removal_losses(model, num_layers: int, batches, blocks, label="layer-loss", progress=True):
    """LM loss of the model with each block (list of 0-indexed layers) skipped; plus the full-model loss."""
    base = mean_loss(model, batches)
    out, t0 = [], time.perf_counter()
    for i, block in enumerate(blocks):
        with skip_layers(model, num_layers, set(block)):
            out.append(mean_loss(model, batches))
        if progress:
            dt = time.perf_counter() - t0
            runtime.print0(f"[{label}] {i + 1}/{len(blocks)} skip layers {block[0] + 1}..{block[-1] + 1} "
                           f"(1-indexed): loss {out[-1]:.4f} (full {base:.4f})  "
                           f"ETA {dt / (i + 1) * (len(blocks) - i - 1):.0f}s")
    return base, torch.tensor(out, dtype=torch.float32)


def layer_loss_scores(model, num_layers: int, batches, progress=True) -> dict:
    """Criterion (b): increase of the LM loss when each single layer is removed (higher = more important)."""
    base, losses = removal_losses(model, num_layers, batches, [[i] for i in range(num_layers)],
                                  progress=progress)
    return {"layer_loss": losses - base, "full_loss": torch.tensor([base])}


def block_loss_scores(model, num_layers: int, batches, k: int, progress=True) -> dict:
    """Criterion (c): LM loss with each contiguous block of ``k`` layers removed (lower = drop it)."""
    blocks = [list(range(s, s + k)) for s in range(num_layers - k + 1)]
    base, losses = removal_losses(model, num_layers, batches, blocks, label=f"block-loss k={k}",
                                  progress=progress)
    return {f"block_loss_k{k}": losses, "full_loss": torch.tensor([base])}


# ----------------------------------------------------------------------------- layer selection
def need_depth_scores(scores: dict, criterion: str, k: int) -> Optional[str]:
    """Name of the score that depth pruning by ``k`` layers needs and ``scores`` lacks (else None)."""
    if k == 0:
        return None
    key = {"bi": "layer_bi", "loss": "layer_loss", "block": f"block_loss_k{k}"}[criterion]
    return None if key in scores else key


def ensure_depth_scores(model, mc: ModelConfig, scores: dict, criterion: str, k: int, loss_batches,
                        progress=True) -> None:
    """Compute the (b)/(c) layer scores that ``criterion`` needs for dropping ``k`` layers, if missing."""
    key = need_depth_scores(scores, criterion, k)
    if key is None:
        return
    if not loss_batches:
        raise UserError(f"prune.layer_criterion={criterion} needs the score {key!r}, which the loaded "
                        f"importance lacks; allowed: pass prune.calibration.data, or prune.layer_criterion=bi")
    if criterion == "loss":
        scores.update(layer_loss_scores(model, mc.num_layers, loss_batches, progress=progress))
    else:
        scores.update(block_loss_scores(model, mc.num_layers, loss_batches, k, progress=progress))


def select_layers(mc: ModelConfig, num_layers: int, scores: dict, criterion: str,
                  drop_layers: Optional[List[int]] = None) -> List[int]:
    """Kept old layers (0-indexed, in order). ``drop_layers`` is 1-indexed (NeMo convention)."""
    L = mc.num_layers
    if drop_layers:
        drop = {x - 1 for x in drop_layers}
    else:
        k = L - num_layers
        if k == 0:
            return list(range(L))
        if criterion == "block":
            start = int(torch.argmin(scores[f"block_loss_k{k}"]))
            drop = set(range(start, start + k))
        else:
            s = scores["layer_bi" if criterion == "bi" else "layer_loss"]
            drop = set(torch.argsort(s.float(), stable=True)[:k].tolist())
    return [i for i in range(L) if i not in drop]


__all__ = ["skip_layers", "layer_offset_of", "mean_loss", "removal_losses", "layer_loss_scores",
           "block_loss_scores", "need_depth_scores", "ensure_depth_scores", "select_layers"]
