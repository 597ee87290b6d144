"""``prune_model``: importance -> targets (explicit or by parameter budget) -> trimmed model, in-job.

Usable from any recipe that already holds a Megatron model (e.g. prune then distill in one job):

    result = prune_model(model, mc, {"target_ffn_hidden_size": 1024}, batches=calib_batches)
    student, student_mc = result.model, result.config

Depth ranking (``layer_criterion``): see ``prune/depth.py``. The adapters that drive this from the typed
``prune`` config group (``prune_from_config``, ``check_config``) are in ``prune/from_config.py``.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import List, Optional

from megatron.core import parallel_state

from minitron_nemo import runtime
from minitron_nemo.errors import UserError
from minitron_nemo.models.builder import count_parameters
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.prune import importance as imp
from minitron_nemo.prune.depth import ensure_depth_scores, mean_loss, select_layers
from minitron_nemo.prune.targets import SearchSpace, Targets, candidates, validate
from minitron_nemo.prune.trim import make_plan, trim_model


@dataclass
class PruneResult:
    model: object
    config: ModelConfig
    scores: dict
    kept_layers: List[int]  # old 0-indexed layer of each new layer
    candidates: List[dict] = field(default_factory=list)  # budget search table (best first)
    meta: dict = field(default_factory=dict)  # how the scores were made (importance.json)
    calib_loss: Optional[float] = None  # zero-shot LM loss of the pruned model on calibration samples


# ----------------------------------------------------------------------------- ranks
def check_same_on_every_rank(scores: dict) -> None:
    """Every rank must rank units from the same scores (else each shard would keep other units)."""
    import hashlib

    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    h = hashlib.sha256()
    for k in sorted(scores):
        h.update(k.encode() + scores[k].float().contiguous().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"importance scores differ between ranks ({len(set(digests))} versions); the "
                           f"pruned shards would not match")


# ----------------------------------------------------------------------------- budget-search candidates
def kept_pattern(model, mc: ModelConfig, scores: dict, layer_criterion: str, loss_batches, progress=True):
    """``num_layers -> the hybrid pattern of the layers depth pruning keeps`` (``targets.candidates``), its depth
    scores computed into ``scores`` on first use."""
    def pattern(num_layers: int) -> str:
        ensure_depth_scores(model, mc, scores, layer_criterion, mc.num_layers - num_layers, loss_batches, progress)
        return mc.pattern_of_layers(select_layers(mc, num_layers, scores, layer_criterion))["hybrid_pattern"]
    return pattern


def candidate_row(c: ModelConfig) -> dict:
    """A candidate's columns in the search table: its shape (MoE: experts and their width; hybrid: Mamba heads,
    their channels and the kept layers' pattern) and parameter count."""
    row = {"num_layers": c.num_layers, "hidden_size": c.hidden_size, "ffn_hidden_size": c.ffn_hidden_size,
           "num_attention_heads": c.num_attention_heads, "num_query_groups": c.num_query_groups}
    if c.is_moe:
        row.update(num_moe_experts=c.num_moe_experts, moe_ffn_hidden_size=c.moe_ffn_hidden_size,
                   active_params=count_parameters(c, active=True))
    if c.is_hybrid:
        row.update(mamba_num_heads=c.mamba_num_heads, mamba_head_dim=c.mamba_head_dim, hybrid_pattern=c.hybrid_pattern)
    return {**row, "params": count_parameters(c)}


def describe(row: dict) -> str:
    """A candidate row in one line of the search's log."""
    moe = f"E={row['num_moe_experts']} Fe={row['moe_ffn_hidden_size']} active={row['active_params']} " \
        if "num_moe_experts" in row else ""
    mamba = f"mamba={row['mamba_num_heads']}x{row['mamba_head_dim']} pattern={row['hybrid_pattern']} " \
        if "mamba_num_heads" in row else ""
    return (f"L={row['num_layers']} H={row['hidden_size']} F={row['ffn_hidden_size']} "
            f"heads={row['num_attention_heads']} {moe}{mamba}params={row['params']}")


# ----------------------------------------------------------------------------- one target
def prune_to(model, mc: ModelConfig, new_mc: ModelConfig, scores: dict, *, layer_criterion="block",
             drop_layers=None, loss_batches=None, progress=True, expert_score="routed_l2"):
    """Trim ``model`` to ``new_mc``; returns (new model, its config, kept old layers). The config is
    ``new_mc`` with the window pattern (and a hybrid model's layer pattern) of the kept layers."""
    if not drop_layers:
        ensure_depth_scores(model, mc, scores, layer_criterion, mc.num_layers - new_mc.num_layers,
                            loss_batches, progress)
    kept = select_layers(mc, new_mc.num_layers, scores, layer_criterion, drop_layers)
    new_mc = new_mc.replace(**mc.window_of_layers(kept), **mc.pattern_of_layers(kept))
    plan = make_plan(mc, new_mc, scores, kept, expert_score)
    return trim_model(model, mc, new_mc, plan), new_mc, kept


def prune_model(model, mc: ModelConfig, targets, *, batches=None, scores: Optional[dict] = None,
                agg: Optional[imp.Aggregation] = None, layer_criterion: str = "block", loss_batches=None,
                eval_batches=None, search: Optional[SearchSpace] = None, progress: bool = True,
                expert_score: str = "routed_l2") -> PruneResult:
    """Prune ``model`` (this rank's shard, any TP x PP x DP) to ``targets``.

    targets: a ``Targets`` or a dict of its fields (``target_*``, ``drop_layers`` 1-indexed,
      ``target_params`` / ``target_params_ratio``, ``grid``).
    batches: calibration micro-batches for the importance pass (skipped when ``scores`` is given).
    loss_batches: batches for the loss-based depth criteria (default: ``batches``).
    eval_batches: held-out batches ranking the budget-search candidates (default: ``loss_batches``).
    expert_score: MoE models: the expert score that ranks experts (``experts.EXPERT_SCORES``).
    Returns the pruned model (freshly built, same layout), its config, the scores, kept layers and
    (budget search) the candidate table.
    """
    t = targets if isinstance(targets, Targets) else Targets.from_cfg(targets)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    search = search or SearchSpace()
    cands = candidates(mc, t, search, tp, pp, ep) if t.is_budget() else [validate(mc, t, tp, pp, ep)]
    if scores is None:
        if not batches:
            raise UserError("importance needs calibration data; allowed: prune.calibration.data=PATH "
                            "or prune.importance.load=PATH")
        scores = imp.estimate(model, batches, agg, progress=progress)
    check_same_on_every_rank(scores)  # computed or loaded: every shard must keep the same units
    loss_batches = loss_batches or batches
    if not t.is_budget():
        new_model, new_mc, kept = prune_to(model, mc, cands[0], scores, layer_criterion=layer_criterion,
                                           drop_layers=t.drop_layers, loss_batches=loss_batches,
                                           progress=progress, expert_score=expert_score)
        return PruneResult(new_model, new_mc, scores, kept)
    eval_batches = eval_batches or loss_batches
    if not eval_batches:
        raise UserError("the parameter-budget search ranks candidates by calibration loss; allowed: "
                        "pass prune.calibration.data")
    if mc.is_hybrid:  # a candidate with fewer layers counts the layers depth pruning keeps
        cands = candidates(mc, t, search, tp, pp, ep, pattern_of=kept_pattern(
            model, mc, scores, layer_criterion, loss_batches, progress))
    rows, best = [], None
    for n, c in enumerate(cands):
        new_model, c, kept = prune_to(model, mc, c, scores, layer_criterion=layer_criterion,
                                      loss_batches=loss_batches, progress=progress, expert_score=expert_score)
        loss = mean_loss(new_model, eval_batches)
        row = {**candidate_row(c), "loss": loss, "ppl": math.exp(min(loss, 50.0))}
        rows.append(row)
        runtime.print0(f"[search] candidate {n + 1}/{len(cands)}: {describe(row)} loss={loss:.4f}")
        if best is None or loss < best[0]:
            best = (loss, new_model, c, kept)
        else:
            del new_model
        gc.collect()
    order = sorted(range(len(rows)), key=lambda i: rows[i]["loss"])
    table = [dict(rank=r + 1, **rows[i]) for r, i in enumerate(order)]
    return PruneResult(best[1], best[2], scores, best[3], table)
