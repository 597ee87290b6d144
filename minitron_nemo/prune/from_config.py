"""The typed ``prune`` config group (``prune/config.py``) -> the library API of ``prune/api.py``.

``check_config`` validates the group against the source model and parallel layout before any compute;
``calibration_batches`` and ``config_scores`` build the calibration data and the importance scores it
names; ``prune_from_config`` runs the whole in-job prune (what ``recipes/prune.py`` does between loading
and saving).
"""

from __future__ import annotations

import dataclasses

from megatron.core import parallel_state

from minitron_nemo import runtime
from minitron_nemo.data.windows import to_batches
from minitron_nemo.errors import UserError
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.prune import data as pdata
from minitron_nemo.prune import importance as imp
from minitron_nemo.prune.api import PruneResult, prune_model
from minitron_nemo.prune.artifacts import load_scores
from minitron_nemo.prune.config import PruneGroup
from minitron_nemo.prune.depth import mean_loss, need_depth_scores
from minitron_nemo.prune.targets import candidates, validate


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
        result.calib_loss = mean_loss(result.model, loss_batches)
    return result
