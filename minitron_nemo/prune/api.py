"""``prune_model``: importance -> targets (explicit or by parameter budget) -> trimmed model, in-job.

Usable from any recipe that already holds a Megatron model (e.g. prune then distill in one job):

    result = prune_model(model, mc, {"target_ffn_hidden_size": 1024}, batches=calib_batches)
    student, student_mc = result.model, result.config

Depth ranking (``layer_criterion``): ``bi`` drops the k layers with the lowest Block Importance,
``loss`` the k layers whose single removal raises the LM loss least, ``block`` (default, P2) the
contiguous block of k layers whose removal gives the lowest LM loss.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from megatron.core import parallel_state

from minitron_nemo import runtime
from minitron_nemo.data.windows import to_batches
from minitron_nemo.errors import UserError
from minitron_nemo.models.builder import count_parameters
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.prune import data as pdata
from minitron_nemo.prune import importance as imp
from minitron_nemo.prune.artifacts import load_scores
from minitron_nemo.prune.config import PruneGroup
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


# ----------------------------------------------------------------------------- depth
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
        scores.update(imp.layer_loss_scores(model, mc.num_layers, loss_batches, progress=progress))
    else:
        scores.update(imp.block_loss_scores(model, mc.num_layers, loss_batches, k, progress=progress))


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


# ----------------------------------------------------------------------------- one target
def prune_to(model, mc: ModelConfig, new_mc: ModelConfig, scores: dict, *, layer_criterion="block",
             drop_layers=None, loss_batches=None, progress=True, expert_score="routed_l2"):
    """Trim ``model`` to ``new_mc``; returns (new model, kept old layers)."""
    if not drop_layers:
        ensure_depth_scores(model, mc, scores, layer_criterion, mc.num_layers - new_mc.num_layers,
                            loss_batches, progress)
    kept = select_layers(mc, new_mc.num_layers, scores, layer_criterion, drop_layers)
    plan = make_plan(mc, new_mc, scores, kept, expert_score)
    return trim_model(model, mc, new_mc, plan), kept


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
        new_model, kept = prune_to(model, mc, cands[0], scores, layer_criterion=layer_criterion,
                                   drop_layers=t.drop_layers, loss_batches=loss_batches, progress=progress,
                                   expert_score=expert_score)
        return PruneResult(new_model, cands[0], scores, kept)
    eval_batches = eval_batches or loss_batches
    if not eval_batches:
        raise UserError("the parameter-budget search ranks candidates by calibration loss; allowed: "
                        "pass prune.calibration.data")
    rows, best = [], None
    for n, c in enumerate(cands):
        new_model, kept = prune_to(model, mc, c, scores, layer_criterion=layer_criterion,
                                   loss_batches=loss_batches, progress=progress, expert_score=expert_score)
        loss = imp.mean_loss(new_model, eval_batches)
        row = {"num_layers": c.num_layers, "hidden_size": c.hidden_size, "ffn_hidden_size": c.ffn_hidden_size,
               "num_attention_heads": c.num_attention_heads, "num_query_groups": c.num_query_groups,
               **({"num_moe_experts": c.num_moe_experts, "moe_ffn_hidden_size": c.moe_ffn_hidden_size,
                   "active_params": count_parameters(c, active=True)} if c.is_moe else {}),
               "params": count_parameters(c), "loss": loss, "ppl": math.exp(min(loss, 50.0))}
        rows.append(row)
        moe_txt = f"E={c.num_moe_experts} Fe={c.moe_ffn_hidden_size} active={row['active_params']} " \
            if c.is_moe else ""
        runtime.print0(f"[search] candidate {n + 1}/{len(cands)}: L={c.num_layers} H={c.hidden_size} "
                       f"F={c.ffn_hidden_size} heads={c.num_attention_heads} {moe_txt}params={row['params']} "
                       f"loss={loss:.4f}")
        if best is None or loss < best[0]:
            best = (loss, new_model, c, kept)
        else:
            del new_model
        gc.collect()
    order = sorted(range(len(rows)), key=lambda i: rows[i]["loss"])
    table = [dict(rank=r + 1, **rows[i]) for r, i in enumerate(order)]
    return PruneResult(best[1], best[2], scores, best[3], table)


# ----------------------------------------------------------------------------- from the typed `prune` group
def check_config(mc: ModelConfig, p: PruneGroup, tp: int, pp: int, ranked_search: bool = False, ep: int = 1):
    """The checks of the job's ``prune`` group (``prune/config.py``, range-checked when composed) against the
    source ``mc`` and the parallel layout, before any compute. ``ranked_search``: the caller runs
    ``prune.search.distill_iters`` (recipes/prune.py, ``workflows/search.py``).

    Returns (targets, candidate configs, aggregation, loaded (scores, meta) or None)."""
    p = PruneGroup.of(p)
    mc.check_parallel(tp, pp, ep)
    if p.search.distill_iters > 0 and not ranked_search:
        raise UserError(f"prune.search.distill_iters={p.search.distill_iters}: the search ranked by short "
                        f"distillation runs in recipes/prune.py; allowed: 0 here (prune with recipes/prune.py, "
                        f"then student.checkpoint=ITS_OUTPUT)")
    t = p.targets()
    agg = imp.Aggregation(p.importance.batch_agg, p.importance.seq_agg)
    p.require_targets()
    cands = []
    if not p.importance_only:
        cands = (candidates(mc, t, p.search, tp, pp, ep) if t.is_budget()
                 else [validate(mc, t, tp, pp, ep)])
    c = p.calibration
    if c.data is not None:
        pdata.check_data(c.data)
    loaded = None
    if p.importance.load is not None:
        loaded = load_scores(p.importance.load, mc)
    elif c.data is None:
        raise UserError("prune.calibration.data is required (or prune.importance.load=DIR of saved scores)")
    if c.data is None and not t.drop_layers:
        for cand in cands:
            key = need_depth_scores(loaded[0], p.layer_criterion, mc.num_layers - cand.num_layers)
            if key:
                raise UserError(f"prune.layer_criterion={p.layer_criterion} needs {key!r}, which "
                                f"{p.importance.load} lacks; allowed: pass prune.calibration.data or "
                                f"prune.layer_criterion=bi")
    return t, cands, agg, loaded


def calibration_batches(mc: ModelConfig, p: PruneGroup, tokenizer_dir, budget_search: bool = False):
    """This DP rank's (importance, loss-criteria, search-eval) micro-batches from ``prune.calibration``."""
    c = p.calibration
    if c.data is None:
        return None, None, None
    dp, r = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    w = pdata.calibration_windows(c.data, tokenizer_dir, c.num_samples, c.seq_length, c.seed, mc.vocab_size)
    ev = None
    if budget_search:
        ev = to_batches(pdata.calibration_windows(c.data, tokenizer_dir, p.search.eval_samples,
                                                  c.seq_length, c.seed + 1, mc.vocab_size),
                        c.micro_batch_size, r, dp)
    return (to_batches(w, c.micro_batch_size, r, dp),
            to_batches(w[: c.loss_samples], c.micro_batch_size, r, dp), ev)


def config_scores(model, mc: ModelConfig, p: PruneGroup, batches, agg, loaded=None, progress=True):
    """(scores, meta): loaded from ``prune.importance.load`` or computed on ``batches``."""
    if loaded is not None:
        runtime.print0(f"importance loaded from {p.importance.load} (aggregation {loaded[1].get('aggregation')})")
        return loaded[0], {**loaded[1], "loaded_from": str(p.importance.load)}
    meta = {"aggregation": {"batch": agg.batch, "seq": agg.seq}, "num_samples": p.calibration.num_samples,
            "calibration": dataclasses.asdict(p.calibration), "model": mc.to_dict(),
            "parallel": {"tp": parallel_state.get_tensor_model_parallel_world_size(),
                         "pp": parallel_state.get_pipeline_model_parallel_world_size(),
                         "dp": parallel_state.get_data_parallel_world_size()}}
    return imp.estimate(model, batches, agg, progress=progress), meta


def prune_from_config(model, mc: ModelConfig, p: PruneGroup, tokenizer_dir, progress: bool = True) -> PruneResult:
    """In-job pruning driven by the typed ``prune`` group (what ``recipes/prune.py`` does between loading
    and saving; ``recipes/distill.py`` can call it on a loaded teacher). Collective: call on every rank."""
    t, _, agg, loaded = check_config(mc, p, parallel_state.get_tensor_model_parallel_world_size(),
                                     parallel_state.get_pipeline_model_parallel_world_size(),
                                     ep=parallel_state.get_expert_model_parallel_world_size())
    batches, loss_batches, eval_batches = calibration_batches(mc, p, tokenizer_dir, t.is_budget())
    scores, meta = config_scores(model, mc, p, batches, agg, loaded, progress)
    result = prune_model(model, mc, t, scores=scores, layer_criterion=p.layer_criterion,
                         loss_batches=loss_batches, eval_batches=eval_batches, search=p.search,
                         progress=progress, expert_score=p.importance.expert_score)
    result.meta = meta
    if loss_batches:
        result.calib_loss = imp.mean_loss(result.model, loss_batches)
    return result
