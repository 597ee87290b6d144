"""Iterative compression in one command: teacher correction (when configured), then every stage of the
job config's ``stages`` list: prune the stage's source (recipes/prune.py), distil the student
(recipes/distill.py); each stage's distilled student is the next stage's pruning source.

    python recipes/compress.py --config-name smollm2_iterative            # SmolLM2-135M -> ~90M -> ~45M, CPU
    python recipes/compress.py --config-name minitron_8b_4b_iterative teacher.checkpoint=... data.blend=...

The stages format and folders: ``minitron_nemo/workflows/stages.py`` (WORKDIR/stages/NAME/{pruned,distill,search}).
A re-run skips the finished stages (their distill/results.json exists) and resumes the unfinished one.
With ``align`` in the job config, SFT and DPO stages follow, from the last stage's distilled student
(``minitron_nemo/workflows/align_stages.py``; WORKDIR/align/NAME).
The recipes run as subprocesses, under ``torchrun --nproc_per_node=N`` when the parallel layout needs
N = TP x PP x DP > 1 processes (DP: ``parallel.data_parallel_size``, default 1). Command-line overrides
apply to every stage; a stage's own ``overrides`` win. Per-stage parameters, tokens and held-out
perplexities: WORKDIR/stages/summary.json. Bad input is one line, exit code 2, before anything runs.
"""

import json
import sys
from pathlib import Path

from minitron_nemo import children, outputs, schemas
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose, parse_argv, split_flags
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.workflows import align_stages, stages

RECIPES = Path(__file__).resolve().parent
DEFAULT_CONFIG = "smollm2_iterative"


def run(script: str, args: list, n: int) -> None:
    """One recipe of recipes/ in a subprocess (torchrun for n > 1); its failure ends the chain with its exit code.
    Ctrl-C and SIGTERM go to the recipe, which checkpoints and stops; the chain stops after it (``children``)."""
    children.run_recipe(RECIPES / script, args, n, "compress")


def print_summary(rows: list) -> None:
    print(f"\n{'stage':<12} {'params':>12} {'tokens':>12} {'ppl zero-shot':>14} {'ppl distilled':>14}", flush=True)
    for r in rows:
        print(f"{r['stage']:<12} {r['params']:>12,} {r['train_tokens']:>12,} {r['student_zero_shot']:>14.3f} "
              f"{r['student_distilled']:>14.3f}", flush=True)


@user_errors_exit
def main():
    cfg = compose(DEFAULT_CONFIG, schema=schemas.TrainingJob)
    name, cli = parse_argv(split_flags(sys.argv[1:])[1], DEFAULT_CONFIG)
    chain = stages.resolve(cfg, name, cli)                   # every check, before anything runs
    work = Path(cfg.workdir).resolve()
    align = align_stages.resolve(cfg, work, stages.PREVIOUS, taken=[st.name for st in chain])
    outputs.claim_workdir(work, sources={"teacher.checkpoint": cfg.teacher.checkpoint}, lock=False)
    outputs.claim_workdir(work / "stages", key="the stages folder")  # locked: one chain at a time
    n = stages.nproc(cfg)
    corrected = cfg.teacher.corrected_checkpoint
    if corrected and not store.is_checkpoint(corrected):
        run("correct_teacher.py", ["--config-name", name, *cli], n)
    for st in chain:
        if st.finished:
            print(f"[compress] stage {st.name}: finished ({st.results}); skipped", flush=True)
            continue
        stages.record(st)
        src = stages.source(cfg, chain, st)
        print(f"[compress] stage {st.index + 1}/{len(chain)} {st.name}: prune {src}, teacher {st.teacher}", flush=True)
        if not store.is_checkpoint(st.pruned):
            run("prune.py", stages.prune_args(cfg, st, src), n)
        run("distill.py", stages.distill_args(cfg, name, cli, st, src), n)
    rows = stages.summary(chain)
    outputs.write_text_atomic(work / "stages" / "summary.json", json.dumps(rows, indent=1))
    print_summary(rows)
    print(f"[compress] done; the last stage's student: {rows[-1]['final_checkpoint']}", flush=True)
    if align:  # SFT / DPO of the last stage's student
        last = align_stages.run(cfg, align, rows[-1]["final_checkpoint"], lambda script, args: run(script, args, n),
                                log=lambda m: print(f"[compress] {m}", flush=True))
        print(f"[compress] aligned: {last}", flush=True)


if __name__ == "__main__":
    main()
