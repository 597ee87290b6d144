"""Slurm submitter: renders one sbatch script per stage from the Hydra job config and submits it.

    python launchers/submit.py STAGE [--config-name JOB] [--dry-run] [launcher.KEY=VALUE ...] [KEY=VALUE ...]

STAGE is correct | prune | cache_teacher | distill | export | evaluate, or ``pipeline`` (correct -> prune
-> cache_teacher (when ``distill.teacher_cache`` is set) -> distill -> export -> evaluate as dependent jobs, ``--dependency=afterok:<previous id>``;
with ``stages`` in the job config, iterative compression (``minitron_nemo/workflows/stages.py``): [correct] -> NAME.prune ->
NAME.distill per stage -> LAST.export [-> LAST.evaluate], each prune reading the previous stage's student); with ``align``
in the job config, its SFT / DPO stages (``NAME.sft``, ``NAME.dpo``; ``minitron_nemo/workflows/align_stages.py``) run
after the distillation and the export takes the last one's model. ``launcher.*`` overrides
pick the launcher (``conf/launcher/*.yaml``, e.g. ``launcher=slurm_bare``) and set its keys; every other
override is passed through to the recipe. ``--dry-run`` prints the scripts and the sbatch commands.
Bad input (unknown stage, container on without an image, a node x GPU count that does not fit the
config's TP x PP x DP, a missing data file, ``launcher.logs`` naming a file, no ``sbatch`` on PATH) is one
line on stderr, exit code 2, before anything is written or submitted.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from minitron_nemo import outputs, schemas
from minitron_nemo.config import compose, parse_argv, require, split_flags
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError
from minitron_nemo.training import data as tdata
from minitron_nemo.workflows import align_stages, stages

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("correct", "prune", "cache_teacher", "distill", "export", "evaluate")
DEFAULT_CONFIG = "smollm2_demo"
REQUEUE_EXIT = 85  # minitron_nemo.stop_signals.REQUEUE_EXIT: "checkpoint saved on a signal, requeue me"


def kind(stage: str) -> str:
    """The recipe a stage runs: ``prune`` for a chain's ``NAME.prune``; a plain stage is its own kind."""
    return stage.rsplit(".", 1)[-1]


def is_launcher_override(o: str) -> bool:
    return o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "launcher"


def load(argv):
    """``(stage, config name, job config with a launcher node, recipe overrides, dry_run)``."""
    dry_run = "--dry-run" in argv
    flags, argv = split_flags([a for a in argv if a != "--dry-run"])
    flag_args = (["--help"] if flags["help"] else []) + (["--cfg", flags["cfg"]] if flags["cfg"] else []) + \
        (["--package", flags["package"]] if flags["package"] else [])
    if flags["help"] and (not argv or argv[0].startswith("-")):
        argv = ["distill", *argv]  # the launcher's help with the default job config
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        raise UserError(f"a stage is required first; allowed: {', '.join(STAGES)}, pipeline")
    stage, argv = argv[0], argv[1:]
    if stage not in STAGES + ("pipeline",):
        raise UserError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}, pipeline")
    name, overrides = parse_argv(argv, DEFAULT_CONFIG)
    launch = [o for o in overrides if is_launcher_override(o)]
    choice = [o for o in launch if o.split("=", 1)[0] == "launcher"]
    launch = [o for o in launch if o not in choice]
    pick = "+launcher=" + (choice[-1].split("=", 1)[1] if choice else "slurm")
    cfg = compose(name, [*flag_args, "--config-name", name, pick, *launch,  # typed and validated as the job will be
                         *[o for o in overrides if not is_launcher_override(o)]], schema=schemas.TrainingJob)
    return stage, name, cfg, [o for o in overrides if not is_launcher_override(o)], dry_run


def check(cfg, stage: str) -> None:
    """Bad input before anything is submitted (types and ranges: ``schemas``, at compose time)."""
    L, par = cfg.launcher, cfg.get("parallel")
    gpn = int(L.gpus_per_node)
    if kind(stage) in ("correct", "cache_teacher", "distill") and sel(cfg, "data.source") == "text":
        tdata.text_files(cfg.data)  # the text files exist (a blend's files are checked when the config is composed)
    if par is None or kind(stage) == "export":
        return
    world = nodes_of(cfg, stage) * gpn
    tp, pp = int(par.tensor_model_parallel_size), int(par.pipeline_model_parallel_size)
    if world % (tp * pp):
        raise UserError(f"{nodes_of(cfg, stage)} nodes x {gpn} GPUs = {world} ranks is not divisible by "
                        f"TP x PP = {tp}x{pp}; change launcher.nodes/gpus_per_node or parallel.*")
    ep = int(par.get("expert_model_parallel_size") or 1)
    if world % (tp * pp * ep):
        raise UserError(f"{nodes_of(cfg, stage)} nodes x {gpn} GPUs = {world} ranks is not divisible by "
                        f"TP x PP x EP = {tp}x{pp}x{ep}; change launcher.nodes/gpus_per_node or parallel.*")
    dp = par.get("data_parallel_size")
    if dp is not None and world != tp * pp * int(dp):
        raise UserError(f"{nodes_of(cfg, stage)} nodes x {gpn} GPUs = {world} ranks but TP x PP x DP = "
                        f"{tp}x{pp}x{dp} = {tp * pp * int(dp)}")


def logs_dir(cfg) -> Path:
    """``launcher.logs`` (relative: to the repository); a path that exists, or lies under something that
    exists, as a file is refused."""
    logs = Path(cfg.launcher.logs) if Path(cfg.launcher.logs).is_absolute() else ROOT / cfg.launcher.logs
    there = next(p for p in (logs, *logs.parents) if p.exists() or p.is_symlink())
    if not there.is_dir():
        raise UserError(f"launcher.logs={cfg.launcher.logs}: {there} is an existing file; allowed: a directory "
                        f"(created when missing)")
    return logs


def require_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH (submit from a Slurm login node); --dry-run prints the scripts and "
                        "the sbatch commands without submitting")


def nodes_of(cfg, stage: str) -> int:
    return 1 if kind(stage) in cfg.launcher.single_node else int(cfg.launcher.nodes)


def sel(cfg, key):
    return OmegaConf.select(cfg, key, default=None)


def recipe_args(cfg, name: str, stage: str, overrides: list) -> list:
    """The recipe's command-line arguments for ``stage`` of job config ``name``."""
    job = ["--config-name", name, *overrides]
    work = sel(cfg, "workdir")
    if stage != kind(stage):  # a stage of an iterative chain
        require(cfg, "workdir", "teacher.checkpoint")
        return slurm_args(cfg, name, stage, overrides)
    if stage in ("correct", "prune", "distill"):
        require(cfg, "workdir", "teacher.checkpoint")
    if stage in ("correct", "distill"):
        return job
    if stage == "cache_teacher":  # the cache the distill stage reads
        cache_dir, wanted = sel(cfg, "cache.dir"), sel(cfg, "distill.teacher_cache")
        if cache_dir and wanted and str(cache_dir) != str(wanted):
            raise UserError(f"cache.dir={cache_dir} and distill.teacher_cache={wanted} differ; allowed: one "
                            f"directory (set distill.teacher_cache alone)")
        if not (cache_dir or wanted):
            raise UserError("the cache_teacher stage needs distill.teacher_cache=DIR (or cache.dir=DIR)")
        require(cfg, "workdir", "teacher.checkpoint")
        return [*job, f"cache.dir={cache_dir or wanted}"]
    if stage == "prune":
        teacher = sel(cfg, "teacher.corrected_checkpoint") or sel(cfg, "teacher.checkpoint")
        if not sel(cfg, "prune.calibration.data"):
            raise UserError("the prune stage needs prune.calibration.data=TEXT_OR_PREFIX "
                            "(without it the distill stage prunes in-job)")
        flat = [f"prune.{k}={v}" for k, v in flat_items(OmegaConf.to_container(cfg.prune, resolve=True))]
        par = [f"parallel.{k}={v}" for k, v in OmegaConf.to_container(cfg.parallel, resolve=True).items()
               if v is not None]  # (data_parallel_size is not a key of recipes/prune.py's YAML)
        return [f"checkpoint={teacher}", f"output={cfg.student.init_checkpoint}", f"dtype={cfg.dtype}",
                *par, *flat, *stages.search_args(cfg, f"{work}/prune_search")]
    if stage == "export":  # the distilled student named in the distill job's results.json (or the aligned one)
        return [f"checkpoint=$(final_checkpoint {shlex.quote(final_results(cfg, name, overrides))})", f"output={work}/hf"]
    text = sel(cfg, "data.test_text")
    if not text:
        raise UserError("the evaluate stage needs data.test_text=FILE (held-out text)")
    return [f"checkpoint={work}/hf", f"eval.text_file={text}", f"eval.seq_length={cfg.data.seq_length}",
            f"eval.output={work}/eval.json"]


# ----------------------------------------------------------------------------- iterative chains (``stages``)
_CHAINS: dict = {}


def _align(cfg, name: str, cli: list) -> list:
    """The job's ``align`` stages (SFT / DPO after distillation; ``workflows/align_stages.py``), once per job."""
    key = ("align", name, tuple(cli))
    if key not in _CHAINS:
        taken = [st.name for st in _chain(cfg, name, cli)] if sel(cfg, "stages") else []
        _CHAINS[key] = align_stages.resolve(cfg, sel(cfg, "workdir"), stages.PREVIOUS, taken=taken)
    return _CHAINS[key]


def align_jobs(cfg, name: str, cli: list) -> list:
    """``NAME.sft`` / ``NAME.dpo`` per unfinished align stage (they run after the distillation)."""
    jobs = []
    for st in _align(cfg, name, cli):
        if st.finished:
            print(f"# pipeline: skipping align stage {st.name} (finished: {st.results})", flush=True)
        else:
            jobs.append(f"{st.name}.{st.recipe}")
    return jobs


def distilled_results(cfg, name: str, cli: list) -> str:
    """The results.json naming the distilled student: the last chain stage's, or the distill job's."""
    return str(_chain(cfg, name, cli)[-1].results) if sel(cfg, "stages") else f"{sel(cfg, 'workdir')}/results.json"


def final_results(cfg, name: str, cli: list) -> str:
    """The results.json naming the model the pipeline exports: the last align stage's, else the distilled one."""
    chain = _align(cfg, name, cli)
    return str(chain[-1].results) if chain else distilled_results(cfg, name, cli)


def align_args(cfg, name: str, cli: list, stage: str) -> list:
    chain = _align(cfg, name, cli)
    st = next(s for s in chain if s.name == stage)
    prev = distilled_results(cfg, name, cli) if st.index == 0 else str(chain[st.index - 1].results)
    return align_stages.stage_args(cfg, st, f"$(final_checkpoint {shlex.quote(prev)})")


def _chain(cfg, name: str, cli: list) -> list:
    """The chain's stages (``stages.resolve``, without the checks that need local files), once per job."""
    key = (name, tuple(cli))
    if key not in _CHAINS:
        _CHAINS[key] = stages.resolve(cfg, name, cli, local=False)
    return _CHAINS[key]


def slurm_jobs(cfg, name: str, cli: list) -> list:
    """The chain as Slurm jobs, in dependency order: [correct], NAME.prune, NAME.distill per unfinished
    stage, then LAST.export [and LAST.evaluate]. Prints why a job is left out."""
    chain = _chain(cfg, name, cli)
    jobs = []
    if sel(cfg, "teacher.corrected_checkpoint"):
        jobs.append("correct")
    else:
        print("# pipeline: skipping correct (teacher.corrected_checkpoint is null)", flush=True)
    for st in chain:
        if st.finished:
            print(f"# pipeline: skipping stage {st.name} (finished: {st.results})", flush=True)
        else:
            jobs += [f"{st.name}.prune", f"{st.name}.distill"]
    jobs += align_jobs(cfg, name, cli)
    jobs.append(f"{chain[-1].name}.export")
    if sel(cfg, "data.test_text"):
        jobs.append(f"{chain[-1].name}.evaluate")
    else:
        print("# pipeline: skipping evaluate (data.test_text is null: the last stage's results.json has the "
              "held-out perplexities)", flush=True)
    return jobs


def slurm_args(cfg, name: str, job: str, cli: list) -> list:
    """The recipe arguments of chain job ``NAME.KIND``; sources that exist only at run time are read from
    the previous stage's results.json by the script's ``final_checkpoint`` function."""
    stage, part = job.rsplit(".", 1)
    if part in align_stages.RECIPES:
        return align_args(cfg, name, cli, stage)
    chain = _chain(cfg, name, cli)
    st = next(s for s in chain if s.name == stage)
    prev = chain[st.index - 1] if st.index else None
    src = stages.first_source(cfg, False) if prev is None else f"$(final_checkpoint {shlex.quote(str(prev.results))})"
    if part == "prune":
        return stages.prune_args(cfg, st, src)
    if part == "distill":
        return stages.distill_args(cfg, name, cli, st, src)
    if part == "export":
        return [f"checkpoint=$(final_checkpoint {shlex.quote(final_results(cfg, name, cli))})", f"output={st.root / 'hf'}"]
    return [f"checkpoint={st.root / 'hf'}", f"eval.text_file={cfg.data.test_text}",
            f"eval.seq_length={cfg.data.seq_length}", f"eval.output={st.root / 'eval.json'}"]


def flat_items(d: dict, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat_items(v, f"{prefix}{k}.")
        elif v is not None:
            yield f"{prefix}{k}", ("[" + ",".join(map(str, v)) + "]") if isinstance(v, list) else v


def quote(a: str) -> str:
    return a if "=$(final_checkpoint" in a else shlex.quote(a)


def render(cfg, name: str, stage: str, overrides: list) -> str:
    """The sbatch script of one stage."""
    L = cfg.launcher
    nodes = nodes_of(cfg, stage)
    tasks = 1 if kind(stage) == "export" else int(L.gpus_per_node)
    job = L.job_name or f"minitron-{name}-{stage}"
    logs = logs_dir(cfg)
    python = L.python or ("python" if L.container is not None else sys.executable)
    torchrun = L.mode == "torchrun" and kind(stage) != "export"
    sb = [f"--job-name={job}", f"--nodes={nodes}", f"--ntasks-per-node={1 if torchrun else tasks}",
          f"--output={logs}/%x-%j.out", "--open-mode=append"]
    if L.request_gpus:
        sb.append(f"--gpus-per-node={tasks}")
    if L.cpus_per_task:
        sb.append(f"--cpus-per-task={L.cpus_per_task}")
    sb += [f"--{k}={v}" for k, v in (("time", L.time), ("partition", L.partition), ("account", L.account)) if v]
    if L.requeue:
        sb += [f"--signal=B:{L.signal}", "--requeue"]
    srun = ["srun", "--kill-on-bad-exit=1", f"--ntasks-per-node={1 if torchrun else tasks}"]
    if L.container is not None:
        mounts = [f"{ROOT}:{ROOT}", *L.container.mounts]
        srun += [f"--container-image={L.container.image}", f"--container-mounts={','.join(mounts)}",
                 f"--container-workdir={ROOT}"]
    if torchrun:
        srun += [python, "-m", "torch.distributed.run", "--nnodes=$SLURM_NNODES", f"--nproc_per_node={tasks}",
                 "--rdzv_id=$SLURM_JOB_ID", "--rdzv_backend=c10d", "--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT"]
    else:
        srun.append(python)
    cmd = " ".join(a if "$" in a and not a.startswith("--container") else shlex.quote(a) for a in srun)
    cmd += " " + " ".join(quote(str(a)) for a in [L.recipes[kind(stage)], *recipe_args(cfg, name, stage, overrides)])
    env = "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in L.env.items())
    port = L.master_port or "$((20000 + SLURM_JOB_ID % 20000))"
    final = ('final_checkpoint() { python3 -c \'import json,sys; print(json.load(open(sys.argv[-1]))'  # $1 or default
             f'["final_checkpoint"])\' {shlex.quote(str(sel(cfg, "workdir")))}/results.json "$@"; }}\n'
             if "$(final_checkpoint" in cmd else "")
    requeue = f"""if [ "$RC" = {REQUEUE_EXIT} ] || {{ [ "$PREEMPTED" = 1 ] && [ "$RC" != 0 ]; }}; then
  if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {int(L.max_requeues)} ]; then
    echo "[launcher] requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "[launcher] not requeueing: {int(L.max_requeues)} restarts already"
fi
""" if L.requeue else ""
    return f"""#!/bin/bash
{chr(10).join('#SBATCH ' + s for s in sb)}
# {stage} stage of --config-name {name}, rendered by launchers/submit.py
set -uo pipefail
cd {shlex.quote(str(ROOT))}
LOG_DIR={shlex.quote(str(logs))}/$SLURM_JOB_NAME-$SLURM_JOB_ID
mkdir -p "$LOG_DIR" && cp "$0" "$LOG_DIR/job.sbatch" 2>/dev/null
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_PORT={port}
{env}
{chr(10).join(L.setup)}
{final}echo "[launcher] job $SLURM_JOB_ID ({stage}) restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"

# preemption: forward the signal to the ranks; they checkpoint and exit {REQUEUE_EXIT}, then the job requeues itself
PREEMPTED=0
forward() {{ PREEMPTED=1; echo "[launcher] SIG$1 received: checkpoint and stop"; kill -s "$1" "$SRUN_PID" 2>/dev/null; }}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
{cmd} &
SRUN_PID=$!
while :; do wait "$SRUN_PID"; RC=$?; [ "$RC" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null && continue; break; done
echo "[launcher] ranks exited with $RC"
{requeue}exit "$RC"
"""


def plan(cfg, stage: str, name: str = DEFAULT_CONFIG, overrides=()) -> list:
    """The stages to submit, with a note for each pipeline stage that is left out."""
    if stage != "pipeline":
        return [stage]
    if sel(cfg, "stages"):  # an iterative chain
        return slurm_jobs(cfg, name, list(overrides))
    todo = []
    for s in STAGES:
        why = None
        if s == "correct" and not sel(cfg, "teacher.corrected_checkpoint"):
            why = "teacher.corrected_checkpoint is null"
        elif s == "prune" and sel(cfg, "student.checkpoint"):
            why = "student.checkpoint is given"
        elif s == "cache_teacher" and not sel(cfg, "distill.teacher_cache"):
            why = "distill.teacher_cache is null: the distill stage runs the teacher"
        elif s == "prune" and not sel(cfg, "prune.calibration.data"):
            why = "prune.calibration.data is null: the distill stage prunes in-job"
        elif s == "evaluate" and not sel(cfg, "data.test_text"):
            why = "data.test_text is null: the distill stage's results.json has the held-out perplexities"
        if why:
            print(f"# pipeline: skipping {s} ({why})", flush=True)
        else:
            todo.append(s)
        if s == "distill":  # SFT / DPO of the distilled student
            todo += align_jobs(cfg, name, list(overrides))
    return todo


@user_errors_exit
def main(argv=None):
    stage, name, cfg, overrides, dry_run = load(sys.argv[1:] if argv is None else argv)
    stages = plan(cfg, stage, name, overrides)
    scripts = []
    for s in stages:
        check(cfg, s)
        scripts.append(render(cfg, name, s, overrides))
    logs = logs_dir(cfg)
    if not dry_run:
        require_sbatch()
        if sel(cfg, "workdir"):  # checked and marked as the job's before anything (its logs too) is written
            outputs.claim_workdir(cfg.workdir, sources={"teacher.checkpoint": sel(cfg, "teacher.checkpoint")},
                                  lock=False)  # the job locks it while it runs
        logs.mkdir(parents=True, exist_ok=True)
    prev = None
    for s, text in zip(stages, scripts):
        path = logs / f"{cfg.launcher.job_name or f'minitron-{name}-{s}'}.sbatch"
        cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterok:{prev}"] if prev else []) + [str(path)]
        if dry_run:
            print(f"# ---- {path}\n{text}\n$ {' '.join(cmd)}\n", flush=True)
            prev = f"<{s} job id>"
            continue
        path.write_text(text)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise UserError(f"sbatch failed for the {s} stage: {' '.join(p.stderr.split())}")
        prev = p.stdout.strip().split(";")[0]
        print(f"submitted {s}: job {prev} (logs {logs}/{path.stem}-{prev}.out)", flush=True)


if __name__ == "__main__":
    main()
