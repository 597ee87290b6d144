"""The GPU suite's driver (bench/gpu_suite.sh runs it after installing the kit): the GPU tests and six
benchmarks, each in its own process under its own time limit, into one JSON.

    python bench/gpu_suite.py [--dry-run] [--out DIR] [--budget-s SECONDS] [--only KEY[,KEY...]]

Writes ``OUT/gpu_suite.json`` (rewritten after every part, so a suite stopped from outside leaves what it
measured): one entry per part, ``device``, ``dry_run`` and ``elapsed_s``. A benchmark's entry is
``{"status": "ok", "median", "min", "max", "n", "what", "good", "seconds", "result"}`` (its headline ratio
over the rounds it alternated, then the benchmark's whole JSON); a part that fails or runs out of time is
``{"status": "failed", "error": "<its last line>"}`` and the suite goes on. ``tests`` holds pytest's counts.

``--dry-run``: the same parts with tiny shapes on the CPU (seconds each); what only a GPU measures (the
allocator's peak memory) is ``{"status": "skipped", "why": ...}``, and the tests part runs
tests/test_gpu.py alone, whose GPU tests skip without CUDA. ``--budget-s`` bounds the whole: a part gets its
own limit or what is left, whichever is less. The benchmarks run first and the tests last, with what is left
(at least their own limit's worth when the benchmarks keep to theirs). ``--only`` runs the parts named (the
others are recorded as ``{"status": "not run", "why": "--only"}``), e.g. ``--only tests`` gives the tests the
whole budget.

The tests part runs pytest verbosely (a line per test as it ends, Python's stack dumped for a test still
running after ``TRACE_AFTER_S``) and with ``MINITRON_TEST_TRACE=OUT/test_logs``: tests/conftest.py then
streams every recipe or worker a test starts into its own log there and prints a line when each ends, so a
part stopped at its limit still shows where its time went.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRY_LIMIT_S = 180     # each part of a dry run
KILL_AFTER_S = 10     # a part still running this long after its limit's SIGTERM gets SIGKILL
MIN_PART_S = 20       # a part is not started with less time than this left in the budget
TRACE_AFTER_S = 120   # a GPU test still running this long has Python's stacks dumped into the log


@dataclass(frozen=True)
class Part:
    key: str
    limit_s: int           # its time limit on the GPU
    script: str            # under bench/ (the tests part: pytest)
    gpu: tuple             # its arguments on the GPU
    dry: tuple             # its arguments in a dry run (tiny shapes)
    headline: str = ""     # the benchmark JSON's summary reported (dotted path)
    what: str = ""
    good: str = ""
    gpu_only: str = ""     # why a dry run skips it


TESTS = Part("tests", 270, "pytest", gpu=("tests",), dry=("tests/test_gpu.py",))
BENCHMARKS = (
    Part("mfu", 60, "bench_mfu.py",
         gpu=("--shape", "1b", "--dtype", "bfloat16", "--rounds", "5", "--steps", "2"),
         dry=("--shape", "tiny", "--dtype", "bfloat16", "--rounds", "2", "--steps", "1"),
         headline="mfu",
         what="model FLOP utilisation of bf16 LM training steps through our loop (GPU: the 1b shape, 1.24B "
              "parameters, sequence 4096): training.metrics.flops_per_token over the step time and 989 TFLOP/s",
         good="higher is better; the target: at least 0.3 (no fused kernels here); below 0.2 something is slow"),
    Part("kd_step_vs_ideal", 60, "bench_kd_step.py",
         gpu=("--shape", "1b", "--dtype", "bfloat16", "--rounds", "3", "--steps", "2"),
         dry=("--shape", "tiny", "--dtype", "bfloat16", "--rounds", "2", "--steps", "1"),
         headline="measured_over_ideal",
         what="(KD step / student-only step) over the FLOP-ideal (2 N_t + 6 N_s) / (6 N_s), bf16 (GPU: teacher "
              "1.24B, student 0.62B, sequence 4096)",
         good="1.0 is the FLOP-ideal; up to about 1.1 the KD step adds only its teacher forward and the KL"),
    Part("kd_vs_hf_loop", 75, "bench_kd_vs_hf.py",
         gpu=("--shape", "1b", "--dtype", "bfloat16", "--rounds", "3", "--steps", "2"),
         dry=("--shape", "tiny", "--dtype", "bfloat16", "--rounds", "2", "--steps", "1"),
         headline="ours_over_transformers",
         what="our KD step time over a plain transformers KD loop's (teacher no_grad forward, student "
              "forward/backward on the KL, AdamW), same shapes and device, bf16 (GPU: the 1b pair)",
         good="below 1: our step is faster; above 1 the plain loop wins"),
    Part("calibration_vs_forward", 60, "bench_calibration.py",
         gpu=("--shape", "1b", "--samples", "8", "--repeats", "3"),
         dry=("--shape", "tiny", "--samples", "4", "--repeats", "2"),
         headline="calibration_over_plain",
         what="the pruning importance pass over a plain forward on the same data, fp32 as recipes/prune.py "
              "calibrates (GPU: the 1b teacher, 8 samples of 4096 tokens)",
         good="1.0 is free; up to about 1.3 the hooks cost little"),
    Part("kd_loss_memory_vs_ce", 60, "bench_kd_loss_memory.py",
         gpu=("--tokens", "4096", "--vocab", "131072", "--cases", "ce,kd", "--rounds", "2"),
         dry=(),
         headline="over_ce.kd",
         what="extra peak GPU memory of the KD loss's forward+backward over cross-entropy's on the same bf16 "
              "logits (4096 tokens x vocab 131072)",
         good="about 2 or less: the KL over the vocabulary is chunked, so it holds no fp32 copy of the logits",
         gpu_only="it measures torch.cuda.max_memory_allocated; a CPU's peak resident memory is another measure"),
    Part("offline_vs_student", 150, "bench_offline_kd.py",
         gpu=("--shape", "1b", "--dtype", "bfloat16", "--rounds", "3", "--steps", "2", "--topk", "64", "--profile"),
         dry=("--shape", "tiny", "--rounds", "2", "--steps", "1", "--topk", "8"),
         headline="offline_over_student",
         what="an offline KD step (student + teacher-cache lookup, top-K) over a student-only step (GPU: the 1b "
              "pair, bf16, K = 64)",
         good="the goal is at most 1.05: reading the cache should cost almost nothing"),
)
KEYS = tuple(p.key for p in BENCHMARKS) + ("tests",)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ----------------------------------------------------------------------------- one part in its own process
def run_logged(cmd: list, limit: float, env: dict) -> tuple[int, str]:
    """Run ``cmd`` under ``timeout``, its output streamed to ours; returns its exit code and last line."""
    full = ["timeout", "-k", str(KILL_AFTER_S), str(int(limit)), *cmd]
    proc = subprocess.Popen(full, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    last = ""
    for line in proc.stdout:
        print(line, end="", flush=True)
        last = line.strip() or last
    return proc.wait(), last


def failed(error: str, seconds: float) -> dict:
    return {"status": "failed", "error": error, "seconds": round(seconds, 1)}


def failure(rc: int, last: str, limit: float, seconds: float) -> dict | None:
    """The entry of a process that timed out or failed; None when it exited 0."""
    if rc in (124, 137):
        return failed(f"timed out after {int(limit)} s (last line: {last})", seconds)
    if rc != 0:
        return failed(last or f"exit code {rc}", seconds)
    return None


def pick(result: dict, dotted: str) -> dict:
    for k in dotted.split("."):
        result = result[k]
    return result


def run_benchmark(part: Part, out: Path, dry: bool, limit: float, env: dict) -> dict:
    result_file = out / f"{part.key}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "bench" / part.script), *(part.dry if dry else part.gpu), "--json", str(result_file)]
    t0 = time.monotonic()
    rc, last = run_logged(cmd, limit, env)
    seconds = time.monotonic() - t0
    bad = failure(rc, last, limit, seconds)
    if bad:
        return bad
    try:
        result = json.loads(result_file.read_text())
        head = pick(result, part.headline)
    except (OSError, ValueError, KeyError) as e:
        return failed(f"no result in {result_file.name}: {e}", seconds)
    return {"status": "ok", **{k: head[k] for k in ("median", "min", "max", "n")}, "what": part.what,
            "good": part.good, "args": list(part.dry if dry else part.gpu), "seconds": round(seconds, 1),
            "result": result}


def junit_counts(xml_file: Path) -> dict:
    """Counts, failures (test and first line of the message) and skip reasons from pytest's JUnit XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, reasons = [], set()
    for case in ET.parse(xml_file).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            reasons.add((outcome.get("message") or "").strip())
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            message = (outcome.get("message") or "").strip().splitlines() or [""]
            failures.append({"test": name, "message": message[0]})
    return {**counts, "failures": failures, "skip_reasons": sorted(reasons)}


def run_tests(part: Part, out: Path, dry: bool, limit: float, env: dict) -> dict:
    xml_file = out / "gpu_tests.xml"
    xml_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *(part.dry if dry else part.gpu), "-v", "-p", "no:cacheprovider",
           "-o", f"faulthandler_timeout={TRACE_AFTER_S}", "--durations=0", "--junitxml", str(xml_file)]
    env = dict(env, MINITRON_TEST_TRACE=str(out / "test_logs"))
    t0 = time.monotonic()
    rc, last = run_logged(cmd, limit, env)
    seconds = time.monotonic() - t0
    if rc in (124, 137) or not xml_file.is_file():
        return failure(rc, last, limit, seconds) or failed(f"pytest wrote no report (exit {rc}): {last}", seconds)
    counts = junit_counts(xml_file)
    entry = {"summary": last, "seconds": round(seconds, 1), **counts}
    if counts["failed"] or counts["errors"] or rc not in (0, 5):
        return {"status": "failed", "error": last, **entry}
    if counts["passed"] == 0:
        return {"status": "skipped", "why": "; ".join(counts["skip_reasons"]) or "no gpu test collected", **entry}
    return {"status": "passed", **entry}


# ----------------------------------------------------------------------------- the suite
def device_info(env: dict) -> dict:
    """Python, torch, CUDA, the device, megatron-core and transformers, as the parts' processes see them."""
    code = ("import json, platform, torch\n"
            "def version(m):\n"
            "    try:\n"
            "        from importlib.metadata import version as v; return v(m)\n"
            "    except Exception: return None\n"
            "cuda = torch.cuda.is_available()\n"
            "print(json.dumps({'name': torch.cuda.get_device_name() if cuda else 'cpu', 'python': platform.python_version(),"
            " 'torch': torch.__version__, 'cuda': torch.version.cuda, 'megatron_core': version('megatron-core'),"
            " 'transformers': version('transformers')}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout)


def child_env(dry: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               TEST_TIMINGS_NAME="gpu_suite")  # the tests part's timings report (tests/conftest.py)
    if dry:  # the CPU, even on a machine with a GPU
        env.update(MINITRON_FORCE_CPU="1", CUDA_VISIBLE_DEVICES="")
    return env


def run_part(part: Part, out: Path, dry: bool, budget: Budget, env: dict) -> dict:
    if dry and part.gpu_only:
        return {"status": "skipped", "why": part.gpu_only}
    limit = min(DRY_LIMIT_S if dry else part.limit_s, budget.left())
    if limit < MIN_PART_S:
        return failed(f"not run: {max(budget.left(), 0):.0f} s left of the suite's budget", 0.0)
    print(f"\n===== {part.key} (limit {int(limit)} s) =====", flush=True)
    run = run_tests if part is TESTS else run_benchmark
    return run(part, out, dry, limit, env)


def headline(entry: dict) -> str:
    if entry["status"] == "ok":
        return f"ok {entry['median']:.3f} [{entry['min']:.3f}, {entry['max']:.3f}] in {entry['seconds']} s"
    if entry["status"] == "skipped":
        return f"skipped: {entry['why']}"
    if entry["status"] == "not run":
        return "not run (--only)"
    if entry["status"] == "passed":
        return f"passed {entry['passed']}, skipped {entry['skipped']} in {entry['seconds']} s"
    return f"{entry['status']}: {entry.get('error')}"


def write(out: Path, report: dict) -> None:
    tmp = out / "gpu_suite.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "gpu_suite.json")


def run_suite(out: Path, dry: bool, budget_s: float, only: tuple = KEYS) -> dict:
    t0, budget, env = time.monotonic(), Budget(budget_s), child_env(dry)
    report = {"dry_run": dry, "device": device_info(env), "elapsed_s": 0.0,
              **{k: {"status": "failed", "error": "not run: the suite stopped before it"} for k in KEYS}}
    print(f"[gpu_suite] device {json.dumps(report['device'])}  dry run {dry}  budget {budget_s:.0f} s", flush=True)
    for part in (*BENCHMARKS, TESTS):
        if part.key not in only:
            report[part.key] = {"status": "not run", "why": "--only"}
            continue
        report[part.key] = run_part(part, out, dry, budget, env)
        report["elapsed_s"] = round(time.monotonic() - t0, 1)
        write(out, report)
        print(f"[gpu_suite] {part.key}: {headline(report[part.key])}", flush=True)
    print(f"[gpu_suite] done in {report['elapsed_s']} s: {out / 'gpu_suite.json'}", flush=True)
    return report


# ----------------------------------------------------------------------------- command line
class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}; usage: python bench/gpu_suite.py [--dry-run] [--out DIR] [--budget-s SECONDS] "
              f"[--only KEY[,KEY...]]",
              file=sys.stderr)
        sys.exit(2)


def main():
    ap = OneLineParser(description="The GPU suite's driver (bench/gpu_suite.sh).")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU; GPU-only parts skipped")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_suite")
    ap.add_argument("--budget-s", type=float, default=510.0, help="the whole suite's time limit")
    ap.add_argument("--only", default=",".join(KEYS), help="the parts to run, comma-separated")
    a = ap.parse_args()
    if a.budget_s <= 0:
        ap.error(f"--budget-s={a.budget_s:g} must be positive")
    only = tuple(k.strip() for k in a.only.split(","))
    unknown = [k for k in only if k not in KEYS]
    if unknown or not only:
        ap.error(f"--only={a.only}: unknown part {unknown[0] if unknown else '(none)'}; allowed: {', '.join(KEYS)}")
    out = Path(a.out).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"--out={a.out} cannot be created ({e.strerror})")
    run_suite(out, a.dry_run, a.budget_s, only)


if __name__ == "__main__":
    main()
