"""Zero-shot pruning study on the corrected teacher: importance aggregations and depth criteria.

    python recipes/experiments/prune_study.py [--config-name experiment] [key=value ...]

Teacher: WORKDIR/teacher_corrected (written by the experiment's correction stage). For each
[batch, seq] aggregation in ``aggregations``: importance on the calibration windows (train plays),
prune to the ``width`` target, held-out loss on the test plays. For each of ``depth_criteria``: drop the
same number of layers (to ``depth.num_layers``), held-out loss. Writes WORKDIR/prune_study/results.json
and saves the students the training arms start from: ``width`` (first aggregation) and
``depth_<criterion>``, plus the importance profile PNG of the first aggregation.
"""

import json
import math
import time
from pathlib import Path

from minitron_nemo import runtime
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose, dtype
from minitron_nemo.data import assets
from minitron_nemo.data.windows import load_tokenizer, tiled_windows, to_batches
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError
from minitron_nemo.eval import perplexity as ppl
from minitron_nemo.models.builder import count_parameters
from minitron_nemo.prune import api
from minitron_nemo.prune import data as pdata
from minitron_nemo.prune import importance as imp
from minitron_nemo.prune.plot import plot_importance
from minitron_nemo.prune.targets import Targets

from common import scaled


def given(targets) -> dict:
    return {k: v for k, v in vars(targets).items() if v is not None}


def held_out(model, windows, mbs) -> dict:
    r = ppl.megatron_perplexity(model, windows, mbs)
    return {"loss": r["loss"], "perplexity": r["perplexity"], "tokens": r["tokens"]}


@user_errors_exit
def main():
    cfg = compose("experiment")
    work = Path(cfg.workdir)
    t_path = work / "teacher_corrected"
    if not store.is_checkpoint(t_path):
        raise UserError(f"{t_path} is not a checkpoint; allowed: run the experiment's correction stage first")
    out = work / "prune_study"
    b, seq, mbs = cfg.budget, int(cfg.budget.seq_length), int(cfg.budget.micro_batch_size)
    mc = store.load_model_config(t_path)
    runtime.init_distributed(1, 1, cfg.seed)
    t0 = time.time()
    teacher = store.load_model(t_path, mc, dtype(cfg.dtype))
    splits = assets.shakespeare_splits()
    tok_dir = store.tokenizer_dir(t_path)
    n_calib = scaled(cfg, b.calibration_samples)
    calib = to_batches(pdata.calibration_windows(str(splits["train"]), tok_dir, n_calib, seq, cfg.seed,
                                                 mc.vocab_size), mbs)
    loss_batches = calib[: max(1, math.ceil(scaled(cfg, b.calibration_loss_samples) / mbs))]
    windows = tiled_windows(load_tokenizer(t_path), splits["test"], seq, scaled(cfg, b.test_tokens))
    results = {"teacher": {"params": count_parameters(mc), **held_out(teacher, windows, mbs)},
               "calibration": {"samples": n_calib, "seq_length": seq,
                               "loss_samples": len(loss_batches) * mbs, "data": "train plays"},
               "aggregation": [], "depth": []}
    width = Targets.from_cfg({"target_hidden_size": int(cfg.width.hidden_size),
                              "target_ffn_hidden_size": int(cfg.width.ffn_hidden_size), "grid": int(cfg.width.grid)})
    depth = Targets.from_cfg({"target_num_layers": int(cfg.depth.num_layers)})

    def save(result, name, what):
        store.save_checkpoint(result.model, out / name, result.config, tokenizer_src=t_path,
                              meta={"pruned_from": str(t_path), "study": what,
                                    "kept_layers_1indexed": [i + 1 for i in result.kept_layers]})

    scores0 = None
    for i, (batch_agg, seq_agg) in enumerate(cfg.aggregations):
        agg = imp.Aggregation(batch=str(batch_agg), seq=str(seq_agg))
        runtime.print0(f"[prune-study] aggregation batch={agg.batch} seq={agg.seq}")
        scores = imp.estimate(teacher, calib, agg)
        r = api.prune_model(teacher, mc, width, scores=scores)
        results["aggregation"].append({"batch": agg.batch, "seq": agg.seq, "params": count_parameters(r.config),
                                       **held_out(r.model, windows, mbs)})
        if i == 0:
            scores0 = scores
            save(r, "width", {"aggregation": [agg.batch, agg.seq], **given(width)})
            plot_importance(scores, out / "importance.png", f"importance of the corrected teacher "
                                                                f"(batch {agg.batch}, seq {agg.seq})")
        del r
    for crit in cfg.depth_criteria:
        runtime.print0(f"[prune-study] depth criterion {crit}")
        r = api.prune_model(teacher, mc, depth, scores=scores0, layer_criterion=str(crit), loss_batches=loss_batches)
        results["depth"].append({"criterion": str(crit), "params": count_parameters(r.config),
                                 "dropped_layers_1indexed": [i + 1 for i in range(mc.num_layers)
                                                             if i not in r.kept_layers],
                                 **held_out(r.model, windows, mbs)})
        save(r, f"depth_{crit}", {"layer_criterion": str(crit), **given(depth)})
        del r
    results["seconds"] = round(time.time() - t0, 1)
    if runtime.is_rank0():
        (out / "results.json").write_text(json.dumps(results, indent=2))
        for row in results["aggregation"]:
            print(f"  width  batch={row['batch']:<4} seq={row['seq']:<4} loss {row['loss']:.4f}", flush=True)
        for row in results["depth"]:
            print(f"  depth  {row['criterion']:<6} loss {row['loss']:.4f} dropped {row['dropped_layers_1indexed']}",
                  flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
