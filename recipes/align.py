"""Alignment of a distilled student in one command: the job config's ``align`` stages (SFT with
recipes/sft.py, DPO with recipes/dpo.py) one after the other, each starting from the previous stage's
final checkpoint.

    python recipes/align.py --config-name p2_align checkpoint=STUDENT workdir=DIR \
        data.math_code=PREFIX data.instruct=PREFIX data.pairs=PAIRS.jsonl [parallel.tensor_model_parallel_size=T]
    python recipes/align.py checkpoint=STUDENT workdir=DIR 'align=[{name: sft, recipe: sft, overrides: [...]}]'

The stages format and folders: ``minitron_nemo/workflows/align_stages.py`` (WORKDIR/align/NAME). A re-run
skips the finished stages and resumes the unfinished one. The recipes run as subprocesses, under
``torchrun --nproc_per_node=N`` when the parallel layout needs N = TP x PP x DP > 1 processes. The same
stages can end recipes/compress.py and ``launchers/submit.py pipeline`` (``align`` in their job config).
Bad input in any stage's settings is one line, exit code 2, before anything runs.
"""

from pathlib import Path

from minitron_nemo import children, outputs, schemas
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.workflows import align_stages
from minitron_nemo.workflows.stages import nproc

RECIPES = Path(__file__).resolve().parent


def run(script: str, args: list, n: int) -> None:
    """One recipe of recipes/ in a subprocess (torchrun for n > 1); its failure ends the chain with its exit code.
    Ctrl-C and SIGTERM go to the recipe, which checkpoints and stops; the chain stops after it (``children``)."""
    children.run_recipe(RECIPES / script, args, n, "align")


@user_errors_exit
def main():
    cfg = compose("align", schema=schemas.AlignJob)
    store.require_checkpoint(cfg.checkpoint)
    work = Path(cfg.workdir).resolve()
    chain = align_stages.resolve(cfg, work, str(cfg.checkpoint))   # every check, before anything runs
    outputs.claim_workdir(work, sources={"checkpoint": cfg.checkpoint}, lock=False)
    outputs.claim_workdir(work / "align", key="the align folder")   # locked: one chain at a time
    n = nproc(cfg)
    last = align_stages.run(cfg, chain, str(cfg.checkpoint), lambda script, args: run(script, args, n),
                            log=lambda m: print(f"[align] {m}", flush=True))
    print(f"[align] done; the aligned model: {last}", flush=True)


if __name__ == "__main__":
    main()
