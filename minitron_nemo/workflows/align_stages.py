"""Alignment after distillation as a chain of stages (P2: math and code SFT, instruction SFT, then
preference optimization), in a job config's ``align`` list:

    align:
      - name: sft_math_code        # letters, digits, _ and -; the recipe's workdir: WORKDIR/align/NAME
        recipe: sft                # recipes/sft.py (dpo: recipes/dpo.py)
        overrides: [data.blend=/data/math_code, trainer.train_iters=2000]
      - name: sft_instruct
        recipe: sft
        overrides: [data.blend=/data/instruct]
      - name: dpo
        recipe: dpo
        overrides: [data.preference_file=/data/pairs.jsonl]

Each stage starts from the previous stage's final checkpoint (its ``results.json``), the first from the
chain's start: ``checkpoint=`` of recipes/align.py, or the distilled student in recipes/compress.py and
``launchers/submit.py pipeline``. Every stage gets the job's ``dtype``, ``seed`` and ``parallel.*``; its
own overrides win. A stage whose ``results.json`` exists is finished and skipped on a re-run; an
unfinished one resumes from its checkpoints. Every stage's config is composed and checked before anything
runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minitron_nemo import schemas
from minitron_nemo.errors import UserError
from minitron_nemo.readers import read_own_record
from minitron_nemo.workflows.stages import PREVIOUS, group_overrides

RECIPES = {"sft": "sft.py", "dpo": "dpo.py"}


@dataclass
class AlignStage:
    index: int
    name: str
    recipe: str            # sft | dpo
    overrides: list
    root: Path             # WORKDIR/align/NAME

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def finished(self) -> bool:
        return self.results.is_file()

    @property
    def script(self) -> str:
        return RECIPES[self.recipe]


def stage_args(cfg, st: AlignStage, source: str) -> list:
    """The stage recipe's arguments, starting from ``source``."""
    return [f"checkpoint={source}", f"workdir={st.root}", f"dtype={cfg.dtype}", f"seed={cfg.seed}",
            *group_overrides("parallel", cfg.parallel), *st.overrides]


def resolve(cfg, workdir, start: str, taken=()) -> list:
    """The ``align`` stages of ``cfg`` under ``WORKDIR/align``, each stage's recipe config composed with its
    arguments and checked (``start``: the first stage's checkpoint, or a placeholder when it exists only at
    run time); ``taken``: names used by other stages of the same job."""
    from minitron_nemo.config import compose

    names = [str(s.name) for s in cfg.get("align") or []]
    dup = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(taken)))
    if dup:
        raise UserError(f"align: the names {dup} are used more than once in the job; allowed: distinct stage names")
    chain = []
    for i, s in enumerate(cfg.get("align") or []):
        st = AlignStage(i, str(s.name), str(s.recipe), [str(o) for o in s.overrides], Path(workdir) / "align" / str(s.name))
        schema = schemas.SFTJob if st.recipe == "sft" else schemas.DPOJob
        try:
            compose(st.recipe, stage_args(cfg, st, start if i == 0 else PREVIOUS), schema=schema)
        except UserError as e:
            raise UserError(f"align stage {st.name} ({st.recipe}): {e}") from None
        chain.append(st)
    return chain


def final_checkpoint(st: AlignStage) -> str:
    """A finished stage's checkpoint. Its results.json is refused when unreadable: it marks the stage done."""
    res = read_own_record(st.results, "alignment stage results", f"remove {st.root} to run the stage again")
    return str(res["final_checkpoint"])


def source(chain: list, st: AlignStage, start: str) -> str:
    """What stage ``st`` starts from, now."""
    return start if st.index == 0 else final_checkpoint(chain[st.index - 1])


def run(cfg, chain: list, start: str, runner, log=print) -> str:
    """Run the unfinished stages of ``chain`` from ``start`` with ``runner(script, args)`` (a recipe of
    recipes/, in a subprocess); returns the last stage's final checkpoint."""
    for st in chain:
        if st.finished:
            log(f"align stage {st.name}: finished ({st.results}); skipped")
            continue
        log(f"align stage {st.index + 1}/{len(chain)} {st.name} ({st.recipe})")
        runner(st.script, stage_args(cfg, st, source(chain, st, start)))
    return final_checkpoint(chain[-1])
