"""make experiment, section 7: the budget search ranked by short distillation, and iterative vs one-shot
compression, on the corrected SmolLM2 teacher of the main experiment (WORKDIR/teacher_corrected).

    python recipes/experiments/compression_study.py [key=value ...]   # this stage alone (same keys as
                                                                      # conf/experiment.yaml); writes
                                                                      # RESULTS/compression.md
Called by minitron_smollm2.py (its stage 6 and section 7 of results.md). Config: ``search`` and
``iterative`` in conf/experiment.yaml.

(a) search: recipes/prune.py with ``prune.target_params_ratio`` (about half the teacher) on the width grid
    (``search.axes``); every candidate's zero-shot calibration loss, then the ``search.top_k`` best each
    distilled ``search.distill_iters`` iterations from the teacher on the same tokens (workflows/search.py);
    ranked zero shot, by validation loss at iteration 0 and after K.
(b) iterative vs one-shot: recipes/compress.py with two stages (teacher -> ``iterative.stages[0]`` ->
    ``iterative.stages[1]``, each distilled half of ``iterative.train_iters`` from the corrected teacher,
    the second stage on another sample order, so the two stages see different tokens) against one stage
    straight to the last shape with all ``iterative.train_iters``: the same total distillation tokens.
    Held-out test loss on the main experiment's test windows.
"""

import csv
import math
from pathlib import Path

from minitron_nemo.config import compose
from minitron_nemo.data import assets
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.eval import report
from minitron_nemo.workflows import stages

from common import RECIPES, claim, load, run, scaled, train_args, warmup

STUDY_ARMS = ("iterative", "oneshot")


def study_dir(work: Path) -> Path:
    return work / "compression"


# ----------------------------------------------------------------------------- (a) search
def search_iters(cfg) -> int:
    return scaled(cfg, cfg.search.distill_iters)


def search_args(cfg, work: Path) -> list:
    """recipes/prune.py: the budget search on the corrected teacher, the short runs on the arms' data and
    hyper-parameters (the trainer group of conf/prune.yaml is the demo's, as in the arms)."""
    s, b = cfg.search, cfg.budget
    k = search_iters(cfg)
    return [f"checkpoint={work / 'teacher_corrected'}", f"output={study_dir(work) / 'search' / 'pruned'}",
            f"dtype={cfg.dtype}", f"seed={cfg.seed}", f"prune.target_params_ratio={s.target_params_ratio}",
            f"prune.grid={cfg.width.grid}", f"prune.search.axes=[{','.join(s.axes)}]",
            f"prune.search.max_candidates={s.max_candidates}", f"prune.search.top_k={s.top_k}",
            f"prune.search.distill_iters={k}", f"prune.search.eval_interval={max(1, math.ceil(k / 4))}",
            f"prune.search.eval_samples={scaled(cfg, b.valid_samples)}",
            f"prune.search.workdir={study_dir(work) / 'search' / 'runs'}",
            f"prune.calibration.data={assets.shakespeare_splits()['train']}",
            f"prune.calibration.num_samples={scaled(cfg, b.calibration_samples)}",
            f"prune.calibration.seq_length={b.seq_length}", f"prune.calibration.micro_batch_size={b.micro_batch_size}",
            f"prune.calibration.seed={cfg.seed}", f"data={cfg.data}", f"data.seq_length={b.seq_length}",
            f"data.cache_dir={work / 'data'}", f"data.valid_samples={scaled(cfg, b.valid_samples)}",
            f"trainer.micro_batch_size={b.micro_batch_size}", f"trainer.global_batch_size={b.micro_batch_size}",
            f"trainer.warmup_iters={warmup(k) if k > 1 else 0}", "trainer.tensorboard=false",
            "checkpointing.save_interval=null", "checkpointing.keep_last=1"]


# ----------------------------------------------------------------------------- (b) iterative vs one-shot
def stage_iters(cfg, arm: str) -> list:
    """Distillation iterations of each stage: the total split evenly over the iterative stages."""
    total, n = scaled(cfg, cfg.iterative.train_iters), len(cfg.iterative.stages)
    return [total] if arm == "oneshot" else [total // n + (i < total % n) for i in range(n)]


def stage_list(cfg, arm: str) -> list:
    shapes = list(cfg.iterative.stages) if arm == "iterative" else [cfg.iterative.stages[-1]]
    evals = int(cfg.budget.evals_per_run)
    out = []
    for i, ((hidden, ffn), iters) in enumerate(zip(shapes, stage_iters(cfg, arm))):
        out.append({"name": f"s{i + 1}_{hidden}x{ffn}", "teacher": "original",
                    "prune": {"target_hidden_size": int(hidden), "target_ffn_hidden_size": int(ffn)},
                    "overrides": [f"trainer.train_iters={iters}",
                                  f"trainer.warmup_iters={warmup(iters) if iters > 1 else 0}",
                                  f"trainer.eval_interval={max(1, math.ceil(iters / evals))}",
                                  f"seed={int(cfg.seed) + i}"]})   # stage i's own sample order
    return out


def chain_args(cfg, work: Path, arm: str) -> list:
    """recipes/compress.py: the arms' distillation overrides, the corrected teacher, the stages."""
    b = cfg.budget
    shared = train_args(cfg, work)[2:]   # without --config-name smollm2_demo
    return ["--config-name", "smollm2_iterative", *shared, f"workdir={study_dir(work) / arm}",
            f"teacher.corrected_checkpoint={work / 'teacher_corrected'}", "teacher.held_out=false",
            "prune.target_hidden_size=null", "prune.target_ffn_hidden_size=null", f"prune.grid={cfg.width.grid}",
            f"prune.calibration.num_samples={scaled(cfg, b.calibration_samples)}",
            f"prune.calibration.seq_length={b.seq_length}", f"prune.calibration.micro_batch_size={b.micro_batch_size}",
            f"prune.calibration.seed={cfg.seed}", f"stages={stages.value(stage_list(cfg, arm))}"]


# ----------------------------------------------------------------------------- the stage
def run_stage(cfg, work: Path) -> None:
    """Run what is missing (each recipe resumes itself)."""
    logs, out = work / "logs", study_dir(work)
    if cfg.search.enabled and not (out / "search" / "pruned" / "prune" / "candidates.csv").is_file():
        run(RECIPES / "prune.py", search_args(cfg, work), logs / "compression_search.log")
    for arm in STUDY_ARMS if cfg.iterative.enabled else ():
        if not (out / arm / "stages" / "summary.json").is_file():
            run(RECIPES / "compress.py", chain_args(cfg, work, arm), logs / f"compression_{arm}.log")


# ----------------------------------------------------------------------------- report
def spearman(a: list, b: list) -> float:
    """Rank correlation of two rankings of the same items (no ties)."""
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(a, b)) / (n * (n * n - 1)) if n > 1 else float("nan")


def ranks(values: list) -> list:
    order = sorted(range(len(values)), key=lambda i: values[i])
    r = [0] * len(values)
    for pos, i in enumerate(order):
        r[i] = pos + 1
    return r


def search_section(cfg, work: Path, img: Path) -> list:
    out = study_dir(work) / "search"
    rows = list(csv.DictReader(open(out / "pruned" / "prune" / "candidates.csv")))
    done = [r for r in rows if r["rank"]]
    k, b = search_iters(cfg), cfg.budget
    tokens = k * int(b.micro_batch_size) * int(b.seq_length)
    def name(r):
        return f"{r['num_layers']}/{r['hidden_size']}/{r['ffn_hidden_size']}/{r['num_attention_heads']}"

    start = [float(r["valid_loss_start"]) for r in done]
    end = [float(r["valid_loss_end"]) for r in done]
    zs_rank = ranks([float(r["zero_shot_loss"]) for r in done])   # among the distilled ones
    r0, rk = ranks(start), ranks(end)
    f4 = lambda x: f"{float(x):.4f}"  # noqa: E731  (the candidates differ in the third decimal)
    table = [[name(r), f"{int(r['params']) / 1e6:.2f}M", f4(r["zero_shot_loss"]), zs_rank[i], f4(start[i]), r0[i],
              f4(end[i]), rk[i]] for i, r in enumerate(done)]
    table.sort(key=lambda x: x[-1])
    curves = {}
    for r in done:
        res = load(out / "runs" / f"L{r['num_layers']}_H{r['hidden_size']}_F{r['ffn_hidden_size']}_A"
                                  f"{r['num_attention_heads']}_G{r['num_query_groups']}" / "result.json")
        curves[f"{name(r)} (zero-shot #{zs_rank[done.index(r)]})"] = (
            [it * int(b.micro_batch_size) * int(b.seq_length) for it, _ in res["valid_curve"]],
            [v for _, v in res["valid_curve"]])
    report.plot_curves(curves, img / "search.png", f"budget search: the {len(done)} zero-shot best, distilled "
                                                   f"{k} iterations each", "validation loss (nats, validation plays)")
    zs_winner = next(i for i in range(len(done)) if zs_rank[i] == 1)
    v0_winner = next(i for i in range(len(done)) if r0[i] == 1)
    k_winner = next(i for i in range(len(done)) if rk[i] == 1)
    meta = load(out / "pruned" / "meta.json")
    t_params = load(work / "prune_study" / "results.json")["teacher"]["params"]
    rho_zs, rho_0 = spearman(zs_rank, rk), spearman(r0, rk)
    return [
        "### 7a. Budget search ranked by a short distillation (`prune.search.distill_iters`)", "",
        f"Budget {float(cfg.search.target_params_ratio):.0%} of the teacher's {t_params / 1e6:.1f}M parameters "
        f"(±5%), width grid ({', '.join(cfg.search.axes)}; multiples of {cfg.width.grid}): {len(rows)} candidates, "
        f"ranked by zero-shot loss on {scaled(cfg, b.valid_samples)} calibration windows (train plays). The "
        f"{len(done)} best were each pruned and distilled from the corrected teacher for {iters_text(k)} x "
        f"{b.micro_batch_size} x {b.seq_length} = {tokens:,} tokens, every candidate on the same tokens in the same "
        f"order, and validated on {scaled(cfg, b.valid_samples)} windows of the validation plays. Architecture: "
        f"layers/hidden/FFN/heads.", "",
        report.md_table(["candidate", "params", "zero-shot calibration loss", "rank", "validation loss, 0 iter",
                         "rank", f"validation loss, {k} iter", "rank"], table), "",
        "![search](img/search.png)", "",
        f"- Zero-shot winner: {name(done[zs_winner])} (by validation loss at iteration 0: {name(done[v0_winner])}); "
        f"winner after {iters_text(k)}: {name(done[k_winner])} (the search's output: "
        f"{meta['prune']['search']['winner']}). Spearman rank correlation with the ranking after {iters_text(k)}: "
        f"{rho_text(rho_zs)} for the zero-shot calibration loss, {rho_text(rho_0)} for the validation loss at "
        f"iteration 0.",
        claim(zs_winner != k_winner or rho_zs < 1,
                       "the zero-shot ranking is not the ranking after light retraining (P1: rank after ~300 "
                       f"steps, not zero shot); here after {iters_text(k)}"), ""]


def iters_text(k: int) -> str:
    return f"{k} iteration{'s' * (k != 1)}"


def rho_text(rho: float) -> str:
    return f"{rho:.2f}" if math.isfinite(rho) else "n/a (one candidate)"


def chain_rows(work: Path, arm: str) -> list:
    return load(study_dir(work) / arm / "stages" / "summary.json")


def iterative_section(cfg, work: Path, img: Path) -> list:
    rows = {a: chain_rows(work, a) for a in STUDY_ARMS}
    t_params = load(work / "prune_study" / "results.json")["teacher"]
    loss = lambda ppl: math.log(ppl)  # noqa: E731
    table, curves = [], {}
    for arm, label in (("iterative", "iterative (2 stages)"), ("oneshot", "one-shot")):
        rs = rows[arm]
        path = " -> ".join([f"{t_params['params'] / 1e6:.1f}M", *(f"{r['params'] / 1e6:.1f}M" for r in rs)])
        table.append([label, path, " + ".join(f"{r['train_tokens']:,}" for r in rs),
                      f"{sum(r['train_tokens'] for r in rs):,}",
                      " / ".join(f"{loss(r['student_zero_shot']):.3f} -> {loss(r['student_distilled']):.3f}"
                                 for r in rs),
                      loss(rs[-1]["student_distilled"]), math.exp(loss(rs[-1]["student_distilled"]))])
        x, y, seen = [0], [t_params["loss"]], 0
        for r in rs:
            x += [seen, seen + r["train_tokens"]]
            y += [loss(r["student_zero_shot"]), loss(r["student_distilled"])]
            seen += r["train_tokens"]
        curves[label] = (x, y)
    report.plot_curves(curves, img / "iterative.png", "iterative vs one-shot: test loss before and after each "
                       "stage's pruning and distillation", "test loss (nats, test plays)")
    it, one = loss(rows["iterative"][-1]["student_distilled"]), loss(rows["oneshot"][-1]["student_distilled"])
    last = rows["iterative"][-1]
    return [
        "### 7b. Iterative vs one-shot compression at the same distillation tokens (`recipes/compress.py`)", "",
        f"Both arms end at the same architecture ({last['num_layers']} layers, hidden {last['hidden_size']}, FFN "
        f"{last['ffn_hidden_size']}, {last['num_attention_heads']} heads; {last['params'] / 1e6:.1f}M params) and are "
        f"distilled from the corrected teacher ({t_params['params'] / 1e6:.1f}M, test loss {t_params['loss']:.3f}) "
        f"with the same total tokens; the iterative arm's second stage prunes the first stage's distilled student "
        f"and trains on another sample order (seed + 1). Test loss on the same {rows['oneshot'][-1]['test_tokens']:,} "
        f"test-play tokens as above.", "",
        report.md_table(["arm", "parameters", "distillation tokens per stage", "total tokens",
                         "test loss per stage (zero-shot -> distilled)", "final test loss", "final test ppl"], table),
        "", "![iterative](img/iterative.png)", "",
        claim(it < one, f"iterative compression ends with a lower test loss than one-shot "
                                 f"({it:.3f} vs {one:.3f} nats; P2: 15B -> 8B -> 4B beat 15B -> 4B)"), ""]


def section(cfg, work: Path, img: Path) -> list:
    """Section 7 of results.md (empty when both parts are off)."""
    parts = ([*search_section(cfg, work, img)] if cfg.search.enabled else []) + \
            ([*iterative_section(cfg, work, img)] if cfg.iterative.enabled else [])
    return ["## 7. Budget search by short distillation; iterative compression", "", *parts] if parts else []


@user_errors_exit
def main():
    cfg = compose("experiment")
    work = Path(cfg.workdir).resolve()
    run_stage(cfg, work)
    out = Path(cfg.results)
    (out / "img").mkdir(parents=True, exist_ok=True)
    md = out / "compression.md"
    md.write_text("\n".join(section(cfg, work, out / "img")) + "\n")
    print(f"[compression] wrote {md}", flush=True)


if __name__ == "__main__":
    main()
