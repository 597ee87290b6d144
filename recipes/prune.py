"""Minitron pruning of a checkpoint: importance on calibration data, then width and/or depth trimming.

    torchrun --nproc_per_node=N recipes/prune.py checkpoint=SRC output=DST \
        prune.calibration.data=TEXT_OR_PREFIX prune.calibration.num_samples=1024 prune.calibration.seq_length=512 \
        prune.target_ffn_hidden_size=1024 [prune.target_hidden_size=...] [prune.target_num_layers=...] \
        [parallel.tensor_model_parallel_size=2 parallel.pipeline_model_parallel_size=2]

Other targets: prune.drop_layers=[16,17] (1-INDEXED, as in NeMo), prune.target_params=N or
prune.target_params_ratio=0.5 (grid search, candidates.md/csv). prune.importance.load=DIR reuses saved
scores without a calibration pass; prune.importance_only=true writes only the scores.

DST is a self-describing checkpoint; DST/prune/ holds importance.safetensors, importance.json,
importance.png (and candidates.md/csv for a budget search). Every input error is reported before any
compute as one line (exit code 2).
"""

import math
from pathlib import Path

from omegaconf import OmegaConf

from minitron_nemo import runtime
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose, dtype, require
from minitron_nemo.errors import UserError, user_errors_exit
from minitron_nemo.models.builder import build_model, count_parameters
from minitron_nemo.prune import api
from minitron_nemo.prune import data as pdata
from minitron_nemo.prune import importance as imp
from minitron_nemo.prune.plot import plot_importance
from minitron_nemo.prune.targets import SearchSpace, Targets, budget, candidates, validate


def check_inputs(cfg, mc):
    """Every check that needs no compute. Returns (targets, candidate configs, aggregation, loaded scores)."""
    p = cfg.prune
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    mc.check_parallel(tp, pp)
    t = Targets.from_cfg(OmegaConf.to_container(p, resolve=True))
    agg = imp.Aggregation(p.importance.batch_agg, p.importance.seq_agg)
    if p.layer_criterion not in api.LAYER_CRITERIA:
        raise UserError(f"prune.layer_criterion={p.layer_criterion!r}; allowed: {', '.join(api.LAYER_CRITERIA)}")
    cands = []
    if not p.importance_only:
        if t.is_empty():
            raise UserError("nothing to prune; allowed: set a prune.target_*, prune.drop_layers, "
                            "prune.target_params(_ratio) or prune.importance_only=true")
        cands = candidates(mc, t, search_space(p), tp, pp) if t.is_budget() else [validate(mc, t, tp, pp)]
    if p.calibration.data is not None:
        pdata.check_data(p.calibration.data)
    for key in ("num_samples", "seq_length", "micro_batch_size", "loss_samples"):
        if p.calibration[key] < 1:
            raise UserError(f"prune.calibration.{key}={p.calibration[key]}; allowed: an integer >= 1")
    loaded = None
    if p.importance.load is not None:
        loaded = api.load_scores(p.importance.load, mc)
    elif p.calibration.data is None:
        raise UserError("prune.calibration.data is required (or prune.importance.load=DIR of saved scores)")
    if p.calibration.data is None:
        for c in cands:
            key = None if t.drop_layers else api.need_depth_scores(loaded[0], p.layer_criterion,
                                                                   mc.num_layers - c.num_layers)
            if key:
                raise UserError(f"prune.layer_criterion={p.layer_criterion} needs {key!r}, which "
                                f"{p.importance.load} lacks; allowed: pass prune.calibration.data or "
                                f"prune.layer_criterion=bi")
    return t, cands, agg, loaded


def search_space(p) -> SearchSpace:
    s = p.search
    return SearchSpace(ratios=list(s.ratios), axes=list(s.axes), tolerance=float(s.tolerance),
                       max_candidates=int(s.max_candidates))


@user_errors_exit
def main():
    cfg = compose("prune")
    require(cfg, "checkpoint", "output")
    p, c = cfg.prune, cfg.prune.calibration
    src = cfg.checkpoint
    mc = store.load_model_config(src)
    t, cands, agg, loaded = check_inputs(cfg, mc)
    params_dtype = dtype(cfg.dtype)
    par = cfg.parallel
    runtime.init_distributed(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, cfg.seed)
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    model = build_model(mc, params_dtype=params_dtype)
    store.load_weights(model, src)

    batches = loss_batches = eval_batches = None
    if c.data is not None:
        tok_dir = store.tokenizer_dir(src)
        windows = pdata.calibration_windows(c.data, tok_dir, c.num_samples, c.seq_length, c.seed, mc.vocab_size)
        batches = pdata.to_batches(windows, c.micro_batch_size, dp_rank, dp)
        loss_batches = pdata.to_batches(windows[: c.loss_samples], c.micro_batch_size, dp_rank, dp)
        if t.is_budget():
            ev = pdata.calibration_windows(c.data, tok_dir, p.search.eval_samples, c.seq_length, c.seed + 1,
                                           mc.vocab_size)
            eval_batches = pdata.to_batches(ev, c.micro_batch_size, dp_rank, dp)

    meta = {"checkpoint": str(Path(src).resolve()), "aggregation": {"batch": agg.batch, "seq": agg.seq},
            "calibration": OmegaConf.to_container(c, resolve=True), "model": mc.to_dict(),
            "parallel": {"tp": par.tensor_model_parallel_size, "pp": par.pipeline_model_parallel_size, "dp": dp}}
    if loaded is not None:
        scores, meta = loaded[0], {**loaded[1], "loaded_from": str(p.importance.load)}
        runtime.print0(f"importance loaded from {p.importance.load} (aggregation {meta.get('aggregation')})")
    else:
        scores = imp.estimate(model, batches, agg)
        meta["num_samples"] = c.num_samples

    if p.importance_only:
        out = Path(cfg.output)
        api.save_scores(out, scores, meta)
        if runtime.is_rank0():
            plot_importance(scores, out / "importance.png", f"importance of {src}")
        runtime.print0(f"importance of {src} -> {out}")
        runtime.shutdown()
        return

    result = api.prune_model(model, mc, t, scores=scores, layer_criterion=p.layer_criterion,
                             loss_batches=loss_batches, eval_batches=eval_batches, search=search_space(p))
    new_mc = result.config
    src_meta = store.load_meta(src)
    ck_meta = {"pruned_from": str(Path(src).resolve()), "hf_token_ids": src_meta.get("hf_token_ids"),
               "prune": {"targets": {k: v for k, v in vars(t).items() if v is not None},
                         "kept_layers_1indexed": [i + 1 for i in result.kept_layers],
                         "layer_criterion": p.layer_criterion, "aggregation": meta.get("aggregation")},
               "dtype": cfg.dtype}
    out = store.save_checkpoint(result.model, cfg.output, new_mc, tokenizer_src=src, meta=ck_meta)
    art = out / "prune"
    api.save_scores(art, result.scores, meta)
    if result.candidates:
        api.write_candidates(art, result.candidates, budget(mc, t))
    if runtime.is_rank0():
        plot_importance(result.scores, art / "importance.png", f"importance of {src}")
    msg = (f"pruned {src} -> {out}: layers {mc.num_layers}->{new_mc.num_layers}, hidden {mc.hidden_size}->"
           f"{new_mc.hidden_size}, ffn {mc.ffn_hidden_size}->{new_mc.ffn_hidden_size}, heads/groups "
           f"{mc.num_attention_heads}/{mc.num_query_groups}->{new_mc.num_attention_heads}/"
           f"{new_mc.num_query_groups}, params {count_parameters(mc)}->{count_parameters(new_mc)}")
    if loss_batches:
        loss = imp.mean_loss(result.model, loss_batches)
        msg += f"; zero-shot calibration loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f})"
    runtime.print0(msg)
    runtime.shutdown()


if __name__ == "__main__":
    main()
