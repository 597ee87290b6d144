"""Helpers shared by the experiment scripts (minitron_smollm2.py, compression_study.py, prune_study.py):
token budgets, running a recipe, the training arms, and report lines.

The scripts run as ``python recipes/experiments/NAME.py``, so this folder is on ``sys.path`` and they
``import common``.
"""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from minitron_nemo import children
from minitron_nemo.errors import UserError
from minitron_nemo.readers import read_json, read_own_record

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
ARMS = ("width_kd", "width_kd_uncorrected", "width_lm", "random_lm")
CACHES = ("full", "topk")   # WORKDIR/cache_full (whole vocabulary, fp32), WORKDIR/cache_topk (cache.topk, cache.dtype)


# ----------------------------------------------------------------------------- budgets
def scaled(cfg, value) -> int:
    """``value`` (a count of iterations, samples or tokens) times ``cfg.scale``, at least 1."""
    return max(1, round(float(value) * float(cfg.scale)))


def warmup(iters: int) -> int:
    """About 10% of the iterations, at least 1, fewer than ``iters``."""
    return min(iters - 1, max(1, iters // 10))


# ----------------------------------------------------------------------------- running recipes
def run(script: Path, args: list, log: Path) -> None:
    """Run one recipe, its output appended to ``log``; a failure stops the experiment, and so does Ctrl-C /
    SIGTERM once the recipe has checkpointed and stopped (``minitron_nemo.children``). Wall times are
    added up per log name in ``LOG_DIR/seconds.json`` (for the report)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[experiment] {script.relative_to(ROOT)} {' '.join(args)}", flush=True)
    with open(log, "a") as f:
        code = children.run([sys.executable, str(script), *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise UserError(f"{script.name} failed (exit {code}): {tail[0][:300]}; full log {log}")
    secs = time.time() - t0
    times = log.parent / "seconds.json"
    # refused when unreadable: the seconds of earlier runs cannot be measured again
    spent = (read_own_record(times, "experiment run times", f"remove {times} to count the time afresh")
             if times.is_file() else {})
    spent[log.stem] = spent.get(log.stem, 0.0) + secs
    times.write_text(json.dumps(spent, indent=1))
    print(f"[experiment]   done in {secs:.0f}s (log {log})", flush=True)


def train_args(cfg, work: Path) -> list:
    """The overrides every training run of the experiment shares (``--config-name smollm2_demo`` first)."""
    seq, mbs = int(cfg.budget.seq_length), int(cfg.budget.micro_batch_size)
    iters = scaled(cfg, cfg.budget.train_iters)
    return ["--config-name", "smollm2_demo", f"data={cfg.data}", f"dtype={cfg.dtype}", f"seed={cfg.seed}",
            f"teacher.checkpoint={cfg.teacher}", f"data.seq_length={seq}", f"data.cache_dir={work / 'data'}",
            f"data.valid_samples={scaled(cfg, cfg.budget.valid_samples)}",
            f"data.test_tokens={scaled(cfg, cfg.budget.test_tokens)}",
            f"trainer.micro_batch_size={mbs}", f"trainer.global_batch_size={mbs}", f"trainer.train_iters={iters}",
            "trainer.train_tokens=null", f"trainer.warmup_iters={warmup(iters)}",
            f"trainer.eval_interval={max(1, math.ceil(iters / int(cfg.budget.evals_per_run)))}",
            "checkpointing.save_interval=null", "checkpointing.keep_last=1",
            *([] if cfg.teacher == "smollm2" else ["~model"]),  # the demo config names SmolLM2's shape
            *cfg.extra_overrides]


# ----------------------------------------------------------------------------- the training arms
def cached_arms(cfg) -> list:
    return ["width_kd_cached", *(f"width_kd_top{k}" for k in cfg.teacher_cache.ks)] if cfg.teacher_cache.enabled else []


def arm_names(cfg) -> list:
    """Training arms in run order; width_kd_cached right after width_kd, so that their times compare."""
    cached = cached_arms(cfg)
    return [*ARMS[:1], *cached[:1], *ARMS[1:], *(f"depth_{c}_kd" for c in cfg.depth_criteria), *cached[1:]]


# ----------------------------------------------------------------------------- reports
def load(path: Path):
    """A JSON record's content (a UserError naming the file when unreadable)."""
    return read_json(path, "experiment record", object)


def claim(ok: bool, text: str) -> str:
    return f"- {'agrees' if ok else '**differs**'}: {text}"


def study_alone(run_stage, section, name: str, tag: str) -> None:
    """One study run on its own (``python recipes/experiments/STUDY.py [key=value ...]``, keys of
    conf/experiment.yaml): its stage, then its section of the report written to ``RESULTS/name``."""
    from minitron_nemo.config import compose

    cfg = compose("experiment")
    work = Path(cfg.workdir).resolve()
    run_stage(cfg, work)
    out = Path(cfg.results) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(section(cfg, work)) + "\n")
    print(f"[{tag}] wrote {out}", flush=True)
