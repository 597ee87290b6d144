"""make experiment: the Minitron claims, measured on SmolLM2-135M and the Shakespeare plays.

    python recipes/experiments/minitron_smollm2.py [scale=4] [workdir=DIR] [results=DIR] [key=value ...]

Config: conf/experiment.yaml (``scale`` multiplies every token budget). Each stage runs a recipe users
run themselves and leaves its outputs under WORKDIR; a rerun skips the stages already done.

  1. correct    recipes/correct_teacher.py               teacher -> WORKDIR/teacher_corrected
  2. prune      recipes/experiments/prune_study.py       aggregations and depth criteria, zero shot;
                                                          the width and depth students
  3. train      recipes/distill.py, one run per arm, all with the same token budget:
                width_kd (corrected teacher), width_kd_uncorrected (pruned from and distilled by the
                original teacher), width_lm (LM loss only), random_lm (random init, LM loss),
                depth_<criterion>_kd for each depth criterion; with ``teacher_cache.enabled`` the arms that
                share the corrected teacher and the tokens read it from a full-vocabulary fp32 cache
                (recipes/cache_teacher.py; the same loss as online to float precision), width_kd stays online
                and width_kd_cached repeats it from the cache (the check and the time saved), and
                width_kd_top<K> distil from a top-K cache (``teacher_cache.topk``) for K in ``teacher_cache.ks``
  4. evaluate   recipes/evaluate.py: lm-eval tasks, greedy samples and generation throughput of the
                corrected teacher and the width and depth students
  then         recipes/experiments/compression_study.py: the budget search ranked by short distillation
                (recipes/prune.py) and iterative vs one-shot compression (recipes/compress.py), section 7;
               recipes/experiments/chat_study.py: KD on raw text vs conversations vs answer tokens only;
               recipes/experiments/align_study.py: that student after SFT (code, instructions) and DPO
  5. report     RESULTS/results.md, RESULTS/img/*.png and the results block of the README
"""

import json
import math
import sys
import time
from pathlib import Path

from minitron_nemo.config import compose
from minitron_nemo.data import assets
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError
from minitron_nemo.eval import report
from minitron_nemo.models.config import DTYPES

import align_study  # noqa: E402  (recipes/experiments/: the alignment stage and section)
import chat_study  # noqa: E402  (recipes/experiments/: the chat stage and section)
import compression_study  # noqa: E402  (recipes/experiments/: stage 6 and section 7)
from common import CACHES, RECIPES, arm_names, cached_arms, claim, load, run, scaled, train_args, warmup


def cache_args(cfg, work: Path, which: str) -> list:
    """recipes/cache_teacher.py overrides: the corrected teacher over the arms' exact token stream."""
    c = cfg.teacher_cache
    kind = ["cache.topk=null", "cache.dtype=float32"] if which == "full" else [f"cache.topk={c.topk}",
                                                                               f"cache.dtype={c.dtype}"]
    return [f"teacher.corrected_checkpoint={work / 'teacher_corrected'}", f"cache.dir={work / f'cache_{which}'}",
            *kind]


def arm_args(cfg, work: Path, arm: str) -> list:
    """Overrides of one training arm (see the module docstring)."""
    study = work / "prune_study"
    corrected = f"teacher.corrected_checkpoint={work / 'teacher_corrected'}"
    if arm == "width_kd_uncorrected":  # pruned in-job from the original teacher, same calibration
        c = cfg.budget
        return ["teacher.corrected_checkpoint=null", "student.checkpoint=null",
                f"prune.target_hidden_size={cfg.width.hidden_size}",
                f"prune.target_ffn_hidden_size={cfg.width.ffn_hidden_size}", f"prune.grid={cfg.width.grid}",
                f"prune.importance.batch_agg={cfg.aggregations[0][0]}",
                f"prune.importance.seq_agg={cfg.aggregations[0][1]}",
                f"prune.calibration.num_samples={scaled(cfg, cfg.budget.calibration_samples)}",
                f"prune.calibration.seq_length={c.seq_length}", f"prune.calibration.micro_batch_size={c.micro_batch_size}",
                f"prune.calibration.seed={cfg.seed}"]
    full = [f"distill.teacher_cache={work / 'cache_full'}"] if cfg.teacher_cache.enabled else []
    if arm.startswith("depth_"):
        crit = arm[len("depth_"):-len("_kd")]
        return [corrected, "teacher.held_out=false", f"student.checkpoint={study / f'depth_{crit}'}", *full]
    if arm == "width_kd_cached":
        return [corrected, "teacher.held_out=false", f"student.checkpoint={study / 'width'}", *full]
    if arm.startswith("width_kd_top"):
        return [corrected, "teacher.held_out=false", f"student.checkpoint={study / 'width'}",
                f"distill.teacher_cache={work / 'cache_topk'}", f"distill.teacher_cache_topk={arm[len('width_kd_top'):]}"]
    init = "random" if arm == "random_lm" else "pruned"
    loss = "kd" if arm == "width_kd" else "lm"
    return [corrected, "teacher.held_out=false", f"student.checkpoint={study / 'width'}",
            f"student.init={init}", f"student.loss={loss}"]


# ----------------------------------------------------------------------------- report
def loss_of(ppl: float) -> float:
    return math.log(ppl)


def write_report(cfg, work: Path, evaluated: list) -> Path:
    out = Path(cfg.results)
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    seq, mbs = int(cfg.budget.seq_length), int(cfg.budget.micro_batch_size)
    iters, per_iter = scaled(cfg, cfg.budget.train_iters), seq * mbs
    arms = {a: load(work / "arms" / a / "results.json") for a in arm_names(cfg)}
    curves = {a: report.valid_curve(work / "arms" / a / "metrics.jsonl", "student_lm", per_iter) for a in arms}
    study = load(work / "prune_study" / "results.json")
    meta = load(work / "teacher_corrected" / "meta.json")
    ev = {name: load(work / "eval" / f"{name.split()[0]}.json") for name in evaluated}
    spent = load(work / "logs" / "seconds.json")
    params = {"width": study["aggregation"][0]["params"],
              **{f"depth_{r['criterion']}": r["params"] for r in study["depth"]}}
    t_params = study["teacher"]["params"]

    def final(a):  # held-out test loss after training
        return loss_of(arms[a]["student_distilled"])

    def zs(a):
        return loss_of(arms[a]["student_zero_shot"])

    def acc(name, task, key="acc"):
        return ev[name].get("lm_eval", {}).get(task, {}).get(key, float("nan"))

    def tps(name):
        return ev[name]["throughput"]["generation_tokens_per_s"]

    plots = {
        "headline.png": ({"width, KD": curves["width_kd"], "depth (block), KD": curves["depth_block_kd"],
                          "width, LM loss": curves["width_lm"], "random init, LM loss": curves["random_lm"]},
                         "student held-out loss vs training tokens"),
        "correction.png": ({"corrected teacher": curves["width_kd"],
                            "original teacher": curves["width_kd_uncorrected"]},
                           "width student distilled from the corrected vs the original teacher"),
        "width_vs_depth.png": ({"width": curves["width_kd"], "depth (block)": curves["depth_block_kd"]},
                               "width vs depth pruning at the same size, KD"),
        "kd_vs_lm.png": ({"pruned + KD": curves["width_kd"], "pruned + LM loss": curves["width_lm"],
                          "random init + LM loss": curves["random_lm"]}, "same architecture, same tokens"),
        "depth_criteria.png": ({c: curves[f"depth_{c}_kd"] for c in cfg.depth_criteria},
                               "depth criteria, each dropping the same layers count, KD"),
    }
    for name, (cv, title) in plots.items():
        report.plot_curves(cv, img / name, title, "validation loss (nats, validation plays)")
    report.plot_bars({f"{r['batch']}/{r['seq']}": r["loss"] for r in study["aggregation"]}, img / "aggregation.png",
                     "zero-shot test loss of the width student by importance aggregation (batch/seq)",
                     "test loss (nats)")
    if (work / "prune_study" / "importance.png").is_file():
        (img / "importance.png").write_bytes((work / "prune_study" / "importance.png").read_bytes())

    # the corrected teacher's test loss comes from the prune study (same windows); the arms distilled from it
    # skip that pass (teacher.held_out=false), the arm distilled from the original teacher measures it
    t_orig, t_corr = loss_of(arms["width_kd_uncorrected"]["teacher"]), study["teacher"]["loss"]
    v_before, v_after = meta["valid_loss_before"], meta["valid_loss_after"]
    n_eval = ev[evaluated[0]].get("lm_eval", {}).get(cfg.lm_eval_tasks[0], {}).get("sample_len", "?")
    head = [
        "| model | params | test loss | test ppl | " + " | ".join(f"{t} acc" for t in cfg.lm_eval_tasks)
        + " | generation tokens/s |",
        "|---|---|---|---|" + "---|" * len(cfg.lm_eval_tasks) + "---|"]
    rows = [(evaluated[0], t_params, t_corr, t_corr),  # (model, params, zero-shot loss, final loss)
            (evaluated[1], params["width"], zs("width_kd"), final("width_kd")),
            (evaluated[2], params["depth_block"], zs("depth_block_kd"), final("depth_block_kd"))]
    for name, n, _, loss in rows:
        head.append(f"| {name} | {n / 1e6:.1f}M | {loss:.3f} | {math.exp(loss):.1f} | "
                    + " | ".join(f"{acc(name, t):.3f}" for t in cfg.lm_eval_tasks) + f" | {tps(name):.1f} |")
    for a, label in (("width_lm", "width student, LM loss only"), ("random_lm", "random init, LM loss only")):
        head.append(f"| {label} | {params['width'] / 1e6:.1f}M | {final(a):.3f} | {math.exp(final(a)):.1f} | "
                    + " | ".join("" for _ in cfg.lm_eval_tasks) + " | |")
    headline = "\n".join(head)
    teacher = "SmolLM2-135M-Instruct" if cfg.teacher == "smollm2" else str(cfg.teacher)
    setup = (f"{teacher} teacher ({t_params / 1e6:.1f}M params), Shakespeare split by play; scale "
             f"{cfg.scale}, seed {cfg.seed}, {cfg.dtype}; each student trained {iters} iterations x {mbs} x {seq} "
             f"= {iters * per_iter:,} tokens; teacher correction {scaled(cfg, cfg.budget.correction_iters) * per_iter:,} "
             f"tokens; test loss on the first {arms['width_kd']['tokens']:,} tokens of the test plays; lm-eval "
             f"{n_eval} documents per task. Hardware: {report.hardware()}. Total recipe time "
             f"{sum(spent.values()) / 60:.1f} min.")

    L = [f"# Results: Minitron compression of {teacher}", "",
         "Generated by `make experiment` (`recipes/experiments/minitron_smollm2.py`, `conf/experiment.yaml`); "
         "every number below is read from the run's outputs. Rerun with `make experiment` "
         "(`EXPERIMENT_ARGS=scale=4` for larger budgets).", "", f"Setup: {setup}", "",
         "## Headline", "", headline, "", "![loss curves](img/headline.png)", "",
         "## 1. Teacher correction", "",
         report.md_table(["teacher", "validation loss (validation plays)", "test loss", "test ppl"],
                         [["original", v_before, t_orig, math.exp(t_orig)],
                          ["corrected", v_after, t_corr, math.exp(t_corr)]]), "",
         f"Correction: {meta.get('iterations')} iterations; validation loss {100 * (v_before - v_after) / v_before:.1f}% "
         f"lower, test loss {100 * (t_orig - t_corr) / t_orig:.1f}% lower.", "",
         report.md_table(["width student distilled from", "zero-shot test loss", "test loss after KD"],
                         [["original teacher (pruned from it too)", zs("width_kd_uncorrected"),
                           final("width_kd_uncorrected")],
                          ["corrected teacher", zs("width_kd"), final("width_kd")]]), "",
         "![correction](img/correction.png)", "",
         claim(v_after < v_before * 0.94, "correction lowers the teacher's held-out loss by over 6% (P2)"),
         claim(final("width_kd") < final("width_kd_uncorrected"),
               "a student distilled from the corrected teacher ends with a lower loss (P2)"), "",
         "## 2. Width vs depth at the same size", "",
         report.md_table(["student", "params", "zero-shot test loss", "test loss after KD",
                          *(f"{t} acc" for t in cfg.lm_eval_tasks), "generation tokens/s", "prefill tokens/s"],
                         [[name, f"{n / 1e6:.1f}M", zero, loss, *(acc(name, t) for t in cfg.lm_eval_tasks),
                           tps(name), ev[name]["throughput"]["prefill_tokens_per_s"]] for name, n, zero, loss in rows]),
         "",
         f"Throughput: transformers `generate` with KV cache, batch {cfg.throughput.batch_size}, prompt "
         f"{cfg.throughput.prompt_length}, {cfg.throughput.generation_length} new tokens, median of "
         f"{cfg.throughput.repeats}, on {ev[evaluated[0]]['throughput']['device']}.", "",
         "![width vs depth](img/width_vs_depth.png)", "",
         claim(final("width_kd") < final("depth_block_kd"), "width pruning is more accurate than depth after "
                                                            "distillation (P1, P2)"),
         claim(tps(evaluated[2]) > tps(evaluated[1]), "the depth-pruned student generates faster (P2)"), "",
         "## 3. Distillation vs LM-loss training vs random init (same architecture, same tokens)", "",
         report.md_table(["arm", "start", "loss", "test loss at start", "test loss after training"],
                         [["pruned + KD", "pruned", "KD (forward KL)", zs("width_kd"), final("width_kd")],
                          ["pruned + LM loss", "pruned", "LM", zs("width_lm"), final("width_lm")],
                          ["random init + LM loss", "random", "LM", zs("random_lm"), final("random_lm")]]), "",
         "![kd vs lm](img/kd_vs_lm.png)", "",
         claim(final("width_kd") < final("width_lm"), "KD beats LM-loss training from the same pruned start (P1)"),
         claim(final("width_lm") < final("random_lm"), "pruning is a far better start than random init (P1)"), "",
         "## 4. Importance aggregation (zero shot, width student)", ""]
    seqs = list(dict.fromkeys(r["seq"] for r in study["aggregation"]))
    batches = list(dict.fromkeys(r["batch"] for r in study["aggregation"]))
    cell = {(r["batch"], r["seq"]): r["loss"] for r in study["aggregation"]}
    L += [report.md_table(["batch \\ seq", *seqs], [[b, *(cell.get((b, s), "") for s in seqs)] for b in batches]),
          "", f"Test loss (nats) of the width student ({params['width'] / 1e6:.1f}M) pruned with each aggregation, "
              f"before any training; calibration {study['calibration']['samples']} x "
              f"{study['calibration']['seq_length']} tokens of the train plays. Teacher: "
              f"{study['teacher']['loss']:.3f}.", "", "![aggregation](img/aggregation.png)",
          "![importance](img/importance.png)", "",
          "## 5. Depth criteria (same number of layers dropped)", "",
          report.md_table(["criterion", "dropped layers (1-indexed)", "zero-shot test loss", "test loss after KD"],
                          [[r["criterion"], r["dropped_layers_1indexed"], r["loss"], final(f"depth_{r['criterion']}_kd")]
                           for r in study["depth"]]), "",
          "block = contiguous block chosen by calibration loss; loss = single-layer removal loss; "
          "bi = Block Importance (1 - cos).", "", "![depth criteria](img/depth_criteria.png)", "",
          "## Greedy samples", ""]
    for name in evaluated:
        for s in ev[name].get("samples", []):
            L += [f"**{name}**, prompt `{s['prompt']}`:", "", "```", s["completion"].strip(), "```", ""]
    if cfg.teacher_cache.enabled:
        L += offline_section(cfg, work, arms, final, zs, spent, params["width"])
    L += compression_study.section(cfg, work, img)
    L += chat_study.section(cfg, work)
    L += align_study.section(cfg, work)
    L += ["## Time per stage", "", report.md_table(["stage", "minutes"], [[k, v / 60] for k, v in spent.items()])]
    md = out / "results.md"
    md.write_text("\n".join(L) + "\n")
    if cfg.readme:
        block = (f"{headline}\n\n![loss curves]({Path(cfg.results) / 'img' / 'headline.png'})\n\n{setup} "
                 f"Details: [{md}]({md}).")
        done = Path(cfg.readme).is_file() and report.replace_block(cfg.readme, "<!-- experiment:begin -->",
                                                                   "<!-- experiment:end -->", block)
        if not done:
            print(f"[experiment] {cfg.readme} has no experiment block; left unchanged", flush=True)
    return md


def offline_section(cfg, work: Path, arms: dict, final, zs, spent: dict, width_params) -> list:
    """Section 6: the width student distilled online vs from teacher caches (same tokens, seed, init)."""
    man = {w: load(work / f"cache_{w}" / "manifest.json") for w in CACHES}
    ev = {a: load(work / "eval" / f"{a}.json") for a in cached_arms(cfg)[1:]}
    width_ev = load(work / "eval" / "width.json")
    tasks = list(cfg.lm_eval_tasks)

    def acc(e, t):
        return e.get("lm_eval", {}).get(t, {}).get("acc", float("nan"))

    online = final("width_kd")
    bpt = {k: k * (2 + DTYPES[cfg.teacher_cache.dtype].itemsize) + 8
           for k in cfg.teacher_cache.ks}  # uint16 ids (vocabulary < 65536) + log-probs + 8 bytes of fp32
    rows = [["online teacher (full vocabulary)", "-", "-", online, 0.0, *(acc(width_ev, t) for t in tasks)],
            ["cache, whole vocabulary, fp32", man["full"]["topk"], man["full"]["bytes_per_token"],
             final("width_kd_cached"), final("width_kd_cached") - online, *("" for _ in tasks)]]
    for k in cfg.teacher_cache.ks:
        a = f"width_kd_top{k}"
        rows.append([f"cache, top {k}, {cfg.teacher_cache.dtype}", k, bpt[k], final(a), final(a) - online,
                     *(acc(ev[a], t) for t in tasks)])
    curve = {a: {r["iteration"]: r["logits"] for r in map(json.loads, (work / "arms" / a / "metrics.jsonl").open())
                 if r.get("kind") == "train"} for a in ("width_kd", "width_kd_cached")}
    rel = [abs(curve["width_kd"][i] - curve["width_kd_cached"][i]) / abs(curve["width_kd"][i])
           for i in sorted(curve["width_kd"])]
    agree = next((i for i, r in enumerate(rel) if r > 1e-4), len(rel))  # iterations that agree to 1e-4
    t_on, t_off = spent.get("width_kd", float("nan")), spent.get("width_kd_cached", float("nan"))
    t_full, t_topk = spent.get("cache_full", float("nan")), spent.get("cache_topk", float("nan"))
    shared = [a for a in arms if a.startswith("depth_")]
    saved = len(shared) * (t_on - t_off) - t_full
    small = [k for k in cfg.teacher_cache.ks if k <= 100]
    worse = all(final(f"width_kd_top{k}") > online for k in small)
    return [
        "## 6. Offline distillation from a teacher cache", "",
        f"The width student ({width_params / 1e6:.1f}M, zero-shot test loss {zs('width_kd'):.3f}) distilled on the "
        f"same tokens, seed and initialisation, with the corrected teacher online or read from a cache "
        f"(`recipes/cache_teacher.py`; loss: KL over the cached tokens plus one rest-of-vocabulary bucket, a lower "
        f"bound of the full KL that equals it for the whole vocabulary). Bytes per token of the cache as written "
        f"(token ids in uint16, log-probabilities, fp32 normaliser and target log-probability).", "",
        report.md_table(["teacher", "K", "bytes/token", "test loss after KD", "vs online",
                         *(f"{t} acc" for t in tasks)], rows), "",
        claim(worse, f"top-K distillation with K <= 100 ({', '.join(map(str, small))}) ends worse than full-vocabulary "
                     f"KD (the papers' finding for top-K logits)") if small else "",
        claim(agree >= min(4, len(rel)), "a whole-vocabulary cache gives online KD's training losses (the first "
                                          "4 iterations' KD losses within 1e-4, relative)"), "",
        f"Online and whole-vocabulary-cache runs: the KD losses of the first {agree} of {len(rel)} iterations agree to "
        f"1e-4 (relative); later the runs drift apart (largest relative difference {max(rel):.1e}), float rounding of "
        f"two summation orders amplified by training, to {final('width_kd_cached') - online:+.4f} nats of final "
        f"test loss: differences between the rows above smaller than that are within run-to-run drift.", "",
        f"Time: writing the whole-vocabulary cache took {t_full / 60:.1f} min ({man['full']['bytes'] / 2**30:.2f} GiB), "
        f"the top-{man['topk']['topk']} cache {t_topk / 60:.1f} min ({man['topk']['bytes'] / 2**20:.1f} MiB). "
        f"The width arm took {t_on / 60:.1f} min online and {t_off / 60:.1f} min from the cache; the "
        f"{len(shared)} depth arms, which share the teacher and the tokens, read the whole-vocabulary cache: "
        f"{len(shared)} x {(t_on - t_off) / 60:.1f} - {t_full / 60:.1f} = {saved / 60:.1f} min saved in this run "
        f"(the per-arm saving taken from the width pair).", ""]


@user_errors_exit
def main():
    cfg = compose("experiment")
    if float(cfg.scale) <= 0:
        raise UserError(f"scale={cfg.scale}; allowed: a number > 0")
    if not cfg.depth_criteria or "block" != cfg.depth_criteria[0]:
        raise UserError(f"depth_criteria={list(cfg.depth_criteria)}; allowed: a list starting with block "
                        f"(the depth student of the width-vs-depth comparison)")
    work = Path(cfg.workdir).resolve()
    logs = work / "logs"
    t0 = time.time()
    test_text = assets.shakespeare_splits()["test"]

    # 1. teacher correction
    corrected = work / "teacher_corrected"
    if not (corrected / "meta.json").is_file():
        iters = scaled(cfg, cfg.budget.correction_iters)
        run(RECIPES / "correct_teacher.py",
            [*train_args(cfg, work), f"workdir={work / 'correction'}", f"teacher.corrected_checkpoint={corrected}",
             f"correction.train_iters={iters}", f"correction.warmup_iters={warmup(iters)}",
             f"correction.workdir={work / 'correction'}"], logs / "correct.log")

    # 2. zero-shot pruning study (and the students)
    if not (work / "prune_study" / "results.json").is_file():
        run(RECIPES / "experiments" / "prune_study.py", sys.argv[1:], logs / "prune_study.log")

    # 3. training arms, same token budget each (the teacher caches first: they hold the arms' token stream)
    for which in (CACHES if cfg.teacher_cache.enabled else ()):
        if not (work / f"cache_{which}" / "manifest.json").is_file():
            run(RECIPES / "cache_teacher.py", [*train_args(cfg, work), *cache_args(cfg, work, which)],
                logs / f"cache_{which}.log")
    for arm in arm_names(cfg):
        if not (work / "arms" / arm / "results.json").is_file():
            run(RECIPES / "distill.py", [*train_args(cfg, work), f"workdir={work / 'arms' / arm}",
                                         *arm_args(cfg, work, arm)], logs / f"{arm}.log")

    # 4. lm-eval, samples, throughput: corrected teacher vs width and depth students
    evaluated = {"teacher (corrected)": corrected,
                 "width student (KD)": Path(load(work / "arms" / "width_kd" / "results.json")["final_checkpoint"]),
                 "depth student (KD)": Path(load(work / "arms" / "depth_block_kd" / "results.json")["final_checkpoint"])}
    th = cfg.throughput
    for name, ckpt in evaluated.items():
        out = work / "eval" / f"{name.split()[0]}.json"
        if not out.is_file():
            run(RECIPES / "evaluate.py",
                [f"checkpoint={ckpt}", f"eval.text_file={test_text}", "eval.perplexity=false", f"dtype={cfg.dtype}",
                 f"seed={cfg.seed}", f"eval.lm_eval_tasks=[{','.join(cfg.lm_eval_tasks)}]",
                 f"eval.lm_eval_limit={scaled(cfg, cfg.budget.lm_eval_limit)}", "eval.throughput.enabled=true",
                 f"eval.throughput.batch_size={th.batch_size}", f"eval.throughput.prompt_length={th.prompt_length}",
                 f"eval.throughput.generation_length={th.generation_length}", f"eval.throughput.repeats={th.repeats}",
                 f"eval.generate.prompts={json.dumps(list(cfg.prompts))}",
                 f"eval.generate.max_new_tokens={cfg.generate_tokens}", f"eval.output={out}"],
                logs / "evaluate.log")

    # lm-eval of the students distilled from top-K caches (no throughput: same architecture as the width student)
    for arm in cached_arms(cfg)[1:]:
        out = work / "eval" / f"{arm}.json"
        if not out.is_file():
            run(RECIPES / "evaluate.py",
                [f"checkpoint={load(work / 'arms' / arm / 'results.json')['final_checkpoint']}",
                 f"eval.text_file={test_text}", "eval.perplexity=false", f"dtype={cfg.dtype}", f"seed={cfg.seed}",
                 f"eval.lm_eval_tasks=[{','.join(cfg.lm_eval_tasks)}]",
                 f"eval.lm_eval_limit={scaled(cfg, cfg.budget.lm_eval_limit)}", f"eval.output={out}"], logs / "evaluate.log")

    compression_study.run_stage(cfg, work)  # search ranked by short distillation; iterative vs one-shot
    chat_study.run_stage(cfg, work)  # raw text vs conversations vs answer tokens only
    align_study.run_stage(cfg, work)  # the answer-only KD student + SFT (code, instructions) + DPO

    # 5. report
    md = write_report(cfg, work, list(evaluated))
    print(f"[experiment] wrote {md} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
