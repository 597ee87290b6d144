"""Iterative (multi-stage) compression as one job config (P2: 15B -> 8B -> 4B beat one-shot 15B -> 4B).

A job config's ``stages`` list chains prune + distill stages; each stage's distilled student is the next
stage's pruning source:

    stages:
      - name: 8b                     # letters, digits, _ and -; its folder: WORKDIR/stages/8b/
        prune: {target_hidden_size: 4096, target_ffn_hidden_size: 16384}  # merged onto the job's prune group
        teacher: original            # who distils this stage: original | source | a checkpoint path
        overrides: [trainer.train_tokens=94000000000]   # recipes/distill.py overrides of this stage only
      - name: 4b
        prune: {target_hidden_size: 3072, target_ffn_hidden_size: 9216, target_num_attention_heads: 24}
        teacher: original

Teacher: ``original`` is the job's teacher (the corrected one when ``teacher.corrected_checkpoint``
exists; P2 found the original, larger teacher better for the last stage), ``source`` the stage's pruning
source (the previous stage's student; for the first stage the same as original), or a checkpoint path.
The first stage prunes the corrected teacher (or ``teacher.checkpoint`` when no correction is configured;
recipes/prune.py needs a minitron_nemo checkpoint). A stage's ``prune`` may itself be a budget search
ranked by short distillation (``search: {distill_iters: K}``, ``workflows/search.py``).

Per stage, in WORKDIR/stages/NAME/: ``pruned/`` (recipes/prune.py output), ``distill/`` (recipes/distill.py
workdir; its ``results.json`` marks the stage finished), ``search/`` (a ranked search's runs) and
``stage.json`` (the stage's settings: a re-run with other settings stops instead of mixing them).
Runners: ``recipes/compress.py`` (here, subprocesses) and ``launchers/submit.py pipeline`` (Slurm jobs,
``--dependency=afterok``; the job graph is in launchers/submit.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from minitron_nemo import schemas
from minitron_nemo.errors import UserError
from minitron_nemo.readers import read_own_record

TEACHERS = ("original", "source")
PREVIOUS = "PREVIOUS_STAGE_STUDENT"   # stands for a source that exists only once the previous stage ran


@dataclass
class Stage:
    index: int
    name: str
    prune: dict            # the job's prune group with this stage's keys merged on
    teacher: str           # original | source | a path
    overrides: list        # recipes/distill.py key=value of this stage
    root: Path             # WORKDIR/stages/NAME
    job: object = field(default=None, repr=False)   # this stage's distillation config (composed)

    @property
    def pruned(self) -> Path:
        return self.root / "pruned"

    @property
    def distill_dir(self) -> Path:
        return self.root / "distill"

    @property
    def results(self) -> Path:
        return self.distill_dir / "results.json"

    @property
    def search_dir(self) -> Path:
        return self.root / "search"

    @property
    def finished(self) -> bool:
        return self.results.is_file()

    def spec(self) -> dict:
        return {"name": self.name, "prune": self.prune, "teacher": self.teacher, "overrides": list(self.overrides)}


# ----------------------------------------------------------------------------- Hydra overrides
def value(v) -> str:
    """A Hydra override value (strings quoted, so paths, blends and splits stay strings)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{value(x)}" for k, x in v.items()) + "}"
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


_PRUNE_DEFAULTS: list = []


def prune_defaults() -> tuple[dict, dict]:
    """(typed values, raw YAML) of recipes/prune.py's own config, to pass it only what differs."""
    if not _PRUNE_DEFAULTS:
        from minitron_nemo.config import compose

        args = ["checkpoint=SRC", "output=DST"]
        _PRUNE_DEFAULTS.extend([OmegaConf.to_container(compose("prune", args, schema=schemas.PruneJob), resolve=True),
                                OmegaConf.to_container(compose("prune", args), resolve=False)])
    return _PRUNE_DEFAULTS[0], _PRUNE_DEFAULTS[1]


def _leaf(d: dict, key: str):
    for k in key.split("."):
        if not isinstance(d, dict) or k not in d:
            return KeyError
        d = d[k]
    return d


def group_overrides(prefix: str, node) -> list:
    """recipes/prune.py overrides setting config group ``prefix`` to ``node``: each leaf that differs from
    the recipe's default (``++key=value`` where its YAML lacks the key)."""
    typed, raw = prune_defaults()
    d = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    out = []
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            out += group_overrides(key, v)
        elif _leaf(typed, key) != v:
            out.append(f"{'++' if _leaf(raw, key) is KeyError else ''}{key}={value(v)}")
    return out


# ----------------------------------------------------------------------------- resolve (no compute)
def calibration_data(cfg) -> str:
    """The stages' calibration data when ``prune.calibration.data`` is null: the training text, or the
    single-prefix ``data.blend``."""
    from minitron_nemo.training import data as tdata

    d = cfg.data
    if d.source != "indexed" and tdata.text_files(d).get("train"):
        return str(tdata.text_files(d)["train"])
    if d.source == "indexed" and isinstance(d.blend, str) and len(d.blend.split()) == 1:
        return str(d.blend)
    raise UserError("the stages prune with recipes/prune.py, which needs prune.calibration.data=TEXT_OR_PREFIX "
                    "(a weighted data.blend is not one); allowed: set prune.calibration.data")


def merged_prune(cfg, i: int) -> dict:
    """The job's prune group with stage ``i``'s ``prune`` keys merged on, typed and checked."""
    from omegaconf.errors import OmegaConfBaseException

    from minitron_nemo.config import config_error, validate

    at = f"stages[{i}].prune"
    try:
        node = OmegaConf.merge(OmegaConf.structured(schemas.PruneGroup), cfg.prune, cfg.stages[i].prune)
        validate(OmegaConf.to_object(node), at)
    except OmegaConfBaseException as e:
        raise UserError(f"{at}: {config_error(e)}") from None
    d = OmegaConf.to_container(node, resolve=True)
    d["calibration"]["data"] = d["calibration"]["data"] or calibration_data(cfg)
    return d


def first_source(cfg, local: bool) -> str:
    """What the first stage prunes: the job's teacher (``training.setup.teacher_source``; the corrected one
    when configured: the chain corrects first), which must be a minitron_nemo checkpoint."""
    from minitron_nemo.checkpoint import store
    from minitron_nemo.training.setup import teacher_source

    src, corrected = teacher_source(cfg, planned=True, local=local)
    if corrected:
        return src
    if (local or Path(src).is_dir()) and not store.is_checkpoint(src):
        raise UserError(f"the first stage prunes teacher.checkpoint={cfg.teacher.checkpoint}, which is not a "
                        f"minitron_nemo checkpoint (recipes/prune.py needs one); allowed: teacher.corrected_checkpoint="
                        f"DIR (corrected first), or a checkpoint from recipes/import_hf.py")
    return src


def teacher_args(cfg, st: Stage, source: str) -> list:
    """recipes/distill.py overrides choosing the stage's teacher (none for ``original``)."""
    if st.teacher == "original":
        return []
    path = source if st.teacher == "source" else st.teacher
    return [f"teacher.checkpoint={path}", "teacher.corrected_checkpoint=null",
            *(["~model"] if cfg.get("model") is not None else [])]  # the job's model shape is the original's


def distill_args(cfg, name: str, cli: list, st: Stage, source: str) -> list:
    return ["--config-name", name, *cli, f"workdir={st.distill_dir}", f"student.checkpoint={st.pruned}",
            *teacher_args(cfg, st, source), *st.overrides]


def search_args(job, workdir, prune: dict | None = None) -> list:
    """For a budget search ranked by distillation (``prune.search.distill_iters`` > 0): recipes/prune.py
    overrides giving it the job's training groups and a search workdir (none otherwise). The short runs
    distil from the source in memory (``distill.teacher_cache=null``: a pipeline's cache is written later)."""
    p = prune or OmegaConf.to_container(job.prune, resolve=True)
    if not p["search"]["distill_iters"]:
        return []
    groups = {g: OmegaConf.to_container(job[g], resolve=True) for g in ("trainer", "data", "distill", "checkpointing")}
    groups["distill"]["teacher_cache"] = None
    args = [a for g, node in groups.items() for a in group_overrides(g, node)]
    return args + ([] if p["search"]["workdir"] else [f"prune.search.workdir={workdir}"])


def prune_args(cfg, st: Stage, source: str) -> list:
    """recipes/prune.py arguments of a stage: the source, the merged prune group, the parallel layout and,
    for a search ranked by distillation, the stage's training groups."""
    return [f"checkpoint={source}", f"output={st.pruned}", f"dtype={cfg.dtype}", f"seed={cfg.seed}",
            *group_overrides("parallel", cfg.parallel), *group_overrides("prune", st.prune),
            *search_args(st.job, st.search_dir, st.prune)]


def _check_teacher(st: Stage) -> None:
    if st.teacher not in TEACHERS and not Path(st.teacher).is_dir():
        raise UserError(f"stages[{st.index}].teacher={st.teacher} does not exist; allowed: original, source or "
                        f"a checkpoint directory")


def _check_record(st: Stage) -> None:
    from minitron_nemo import outputs

    diff = outputs.settings_difference(st.root / "stage.json", st.spec())
    if diff:
        raise UserError(f"stage {st.name} in {st.root} was run with other settings ({diff}); allowed: the same "
                        f"stage settings, a new stage name, or another workdir")


def record(st: Stage) -> None:
    """Write the stage's settings on its first run (``_check_record`` compares later runs with them)."""
    from minitron_nemo import outputs

    st.root.mkdir(parents=True, exist_ok=True)
    outputs.record_settings(st.root / "stage.json", st.spec())


def _check_targets(cfg, stages: list, local: bool) -> None:
    """Each stage's targets against its source's shape, as far as it is known before anything runs (the
    shape after a budget search is known only once it ran)."""
    from minitron_nemo.checkpoint import store
    from minitron_nemo.prune import from_config

    src = str(cfg.teacher.checkpoint)
    if not local and not Path(src).is_dir():
        return
    from minitron_nemo.training.setup import resolve_source

    mc = store.model_config_of(resolve_source(src))
    tp, pp = int(cfg.parallel.tensor_model_parallel_size), int(cfg.parallel.pipeline_model_parallel_size)
    for st in stages:
        t, cands, _, _ = from_config.check_config(mc, OmegaConf.create(st.prune), tp, pp, ranked_search=True)
        if t.is_budget():
            return
        mc = cands[0]


def resolve(cfg, name: str, cli: list, local: bool = True) -> list:
    """The chain's stages, every check done (stage settings, teacher, each stage's distillation config
    composed with its overrides, targets); nothing runs."""
    from minitron_nemo.config import compose

    if not cfg.get("stages"):
        raise UserError("stages is empty; allowed: a job config with a stages list (e.g. --config-name "
                        "smollm2_iterative or minitron_8b_4b_iterative)")
    names = [s.name for s in cfg.stages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"stages: the names {dup} are used more than once; allowed: distinct stage names")
    root = Path(cfg.workdir) / "stages"
    if local:
        root = root.resolve()
    first = first_source(cfg, local)
    stages = []
    for i, s in enumerate(cfg.stages):
        st = Stage(i, str(s.name), merged_prune(cfg, i), str(s.teacher), list(s.overrides), root / str(s.name))
        _check_teacher(st)
        st.job = compose(name, distill_args(cfg, name, cli, st, first if i == 0 else PREVIOUS),
                         schema=schemas.TrainingJob)
        _check_record(st)
        stages.append(st)
    _check_targets(cfg, stages, local)
    return stages


def nproc(cfg) -> int:
    """Processes a stage's recipes run on: TP x PP x DP (DP: ``parallel.data_parallel_size``, default 1)."""
    par = cfg.parallel
    return (int(par.tensor_model_parallel_size) * int(par.pipeline_model_parallel_size)
            * int(par.get("data_parallel_size") or 1))


def final_checkpoint(st: Stage) -> str:
    """The stage's distilled student (from its results.json)."""
    return str(stage_results(st)["final_checkpoint"])


def stage_results(st: Stage) -> dict:
    """A finished stage's results.json. Refused when unreadable, not recomputed: it marks the stage finished,
    and redoing it means distilling the stage again, which the user decides."""
    return read_own_record(st.results, "stage results", f"remove {st.distill_dir} to distill the stage again")


def source(cfg, stages: list, st: Stage) -> str:
    """What stage ``st`` prunes, now: the first source or the previous stage's distilled student."""
    return first_source(cfg, True) if st.index == 0 else final_checkpoint(stages[st.index - 1])


def summary(stages: list) -> list:
    """Per finished stage: architecture, parameters, training tokens, teacher, held-out perplexities."""
    from minitron_nemo.checkpoint import store
    from minitron_nemo.models.builder import count_parameters
    from minitron_nemo.training import optim

    rows = []
    for st in stages:
        if not st.finished:
            continue
        # stage.json: refused when unreadable (it holds the settings the stage ran with; a re-run cannot tell them)
        res, meta = stage_results(st), read_own_record(st.root / "stage.json", "stage settings",
                                                       f"remove {st.root} to run the stage again")
        mc, job = store.load_model_config(st.pruned), st.job
        seq, gbs = int(job.data.seq_length), int(job.trainer.global_batch_size)
        iters = optim.train_iterations(job.trainer, seq)
        rows.append({"stage": st.name, "params": count_parameters(mc), "num_layers": mc.num_layers,
                     "hidden_size": mc.hidden_size, "ffn_hidden_size": mc.ffn_hidden_size,
                     "num_attention_heads": mc.num_attention_heads, "teacher": meta["teacher"],
                     "teacher_path": store.load_meta(res["final_checkpoint"]).get("distilled_from"),
                     "pruned_from": store.load_meta(st.pruned).get("pruned_from"), "train_iters": iters,
                     "train_tokens": iters * gbs * seq, "student_zero_shot": res["student_zero_shot"],
                     "student_distilled": res["student_distilled"], "teacher_ppl": res["teacher"],
                     "test_tokens": res["tokens"], "final_checkpoint": res["final_checkpoint"],
                     "seconds": res["seconds"]})
    return rows
