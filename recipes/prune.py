"""Minitron pruning of a checkpoint: importance on calibration data, then width and/or depth trimming.

    torchrun --nproc_per_node=N recipes/prune.py checkpoint=SRC output=DST \
        prune.calibration.data=TEXT_OR_PREFIX prune.calibration.num_samples=1024 prune.calibration.seq_length=512 \
        prune.target_ffn_hidden_size=1024 [prune.target_hidden_size=...] [prune.target_num_layers=...] \
        [parallel.tensor_model_parallel_size=2 parallel.pipeline_model_parallel_size=2]

Other targets: prune.drop_layers=[16,17] (1-INDEXED, as in NeMo), prune.target_params=N or
prune.target_params_ratio=0.5 (grid search, candidates.md/csv). prune.importance.load=DIR reuses saved
scores without a calibration pass; prune.importance_only=true writes only the scores.

Budget search ranked by short distillation (P1): prune.search.distill_iters=K prune.search.top_k=M distils
the M zero-shot best K iterations each from the source, with the trainer / data / distill groups, and
keeps the best after K (minitron_nemo/workflows/search.py; resumable in prune.search.workdir).

DST is a self-describing checkpoint; DST/prune/ holds importance.safetensors, importance.json,
importance.png (and candidates.md/csv for a budget search). Every input error is reported before any
compute as one line (exit code 2).
"""

from pathlib import Path

from minitron_nemo import outputs, runtime, schemas
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose_job, dtype
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.models.builder import build_model, count_parameters
from minitron_nemo.prune import api, artifacts, from_config
from minitron_nemo.workflows import search


@user_errors_exit
def main():
    cfg, job = compose_job("prune", schemas.PruneJob)
    p, par, src = job.prune, cfg.parallel, cfg.checkpoint
    mc = store.load_model_config(src)
    targets, _, agg, loaded = from_config.check_config(mc, p, par.tensor_model_parallel_size,  # before any compute
                                               par.pipeline_model_parallel_size, ranked_search=search.enabled(p),
                                               ep=par.expert_model_parallel_size)
    setup = search.check(cfg, job, targets, src, mc) if search.enabled(p) else None
    out = outputs.claim_dir(cfg.output, overwrite=cfg.overwrite, sources={  # every writer below writes `out`
        "checkpoint": src, "prune.importance.load": p.importance.load, "prune.calibration.data": p.calibration.data,
        "prune.search.workdir": setup and setup.dir})
    if setup:
        search.claim(cfg, src, setup)
    params_dtype = dtype(cfg.dtype)
    runtime.init_parallel(par, cfg.seed)
    model = build_model(mc, params_dtype=params_dtype)
    store.load_weights(model, src)
    tok = store.tokenizer_dir(src)

    if p.importance_only:
        batches, _, _ = from_config.calibration_batches(mc, p, tok)
        scores, meta = from_config.config_scores(model, mc, p, batches, agg, loaded)
        result = api.PruneResult(None, mc, scores, list(range(mc.num_layers)),
                                 meta={**meta, "checkpoint": str(Path(src).resolve())})
        if runtime.is_rank0():
            with outputs.atomic_dir(out) as tmp:
                artifacts.save_artifacts(tmp, mc, result, targets, f"importance of {src}")
        runtime.print0(f"importance of {src} -> {cfg.output}")
        runtime.shutdown()
        return

    outcome = None
    if setup:
        result, outcome = search.search(cfg, model, mc, src, setup)
    else:
        result = from_config.prune_from_config(model, mc, p, tok)
    new_mc = result.config
    result.meta["checkpoint"] = str(Path(src).resolve())
    ck_meta = {"pruned_from": str(Path(src).resolve()), "dtype": cfg.dtype,
               "hf_token_ids": store.load_meta(src).get("hf_token_ids"),
               "prune": {"targets": {k: v for k, v in vars(targets).items() if v is not None},
                         "kept_layers_1indexed": [i + 1 for i in result.kept_layers],
                         "layer_criterion": p.layer_criterion, "aggregation": result.meta.get("aggregation")}}
    if outcome:
        ck_meta["prune"]["search"] = result.meta["search"]

    with outputs.atomic_dir(out, collective=True) as tmp:  # the checkpoint and DST/prune/, renamed into place at once
        store.write_checkpoint(tmp, result.model, new_mc, tokenizer_src=src, meta=ck_meta)
        if runtime.is_rank0():
            artifacts.save_artifacts(tmp / "prune", mc, result, targets, f"importance of {src}")
            if outcome:
                outcome.save(tmp / "prune")
    msg = (f"pruned {src} -> {out}: layers {mc.num_layers}->{new_mc.num_layers}, hidden {mc.hidden_size}->"
           f"{new_mc.hidden_size}, ffn {mc.ffn_hidden_size}->{new_mc.ffn_hidden_size}, heads/groups "
           f"{mc.num_attention_heads}/{mc.num_query_groups}->{new_mc.num_attention_heads}/"
           f"{new_mc.num_query_groups}, params {count_parameters(mc)}->{count_parameters(new_mc)}")
    if mc.is_moe:
        msg += (f", experts {mc.num_moe_experts}->{new_mc.num_moe_experts} (expert FFN {mc.moe_ffn_hidden_size}->"
                f"{new_mc.moe_ffn_hidden_size}{_shared(mc, new_mc)}), active params {count_parameters(mc, active=True)}->"
                f"{count_parameters(new_mc, active=True)}")
    if mc.is_hybrid:
        msg += (f", mamba heads x head_dim {mc.mamba_num_heads}x{mc.mamba_head_dim}->{new_mc.mamba_num_heads}x"
                f"{new_mc.mamba_head_dim}, pattern {mc.hybrid_pattern}->{new_mc.hybrid_pattern}")
    if result.calib_loss is not None:
        msg += f"; zero-shot calibration loss {result.calib_loss:.4f}"
    runtime.print0(msg)
    runtime.shutdown()


def _shared(mc, new_mc) -> str:
    if not mc.moe_shared_expert_intermediate_size:
        return ""
    return f", shared expert {mc.moe_shared_expert_intermediate_size}->{new_mc.moe_shared_expert_intermediate_size}"


if __name__ == "__main__":
    main()
