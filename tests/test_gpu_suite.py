"""bench/gpu_suite.sh --dry-run: the GPU suite end to end on the CPU with tiny shapes (the code paths of the
device run but the shapes and the GPU-only parts), and its refusals of bad command lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

from conftest import ROOT

BENCHMARKS = ("mfu", "kd_step_vs_ideal", "kd_vs_hf_loop", "calibration_vs_forward", "kd_loss_memory_vs_ce",
              "offline_vs_student")
KEYS = {*BENCHMARKS, "tests", "device", "dry_run", "elapsed_s"}


def suite(*args, out=None, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, **({"OUT": str(out)} if out else {}))
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), *args], capture_output=True, text=True,
                           cwd=ROOT, env=env, timeout=timeout)


def test_dry_run_writes_every_part(tmp_path):
    p = suite("--dry-run", out=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert set(report) == KEYS
    assert report["dry_run"] is True and report["device"]["name"] == "cpu"
    assert 0 < report["elapsed_s"] < 510
    for key in BENCHMARKS:
        entry = report[key]
        if entry["status"] == "skipped":
            assert entry["why"], (key, entry)
            continue
        assert entry["status"] == "ok", (key, entry)
        assert entry["min"] <= entry["median"] <= entry["max"] and entry["n"] >= 2, (key, entry)
        assert entry["result"]["device"] == "cpu", (key, entry)
    assert report["kd_loss_memory_vs_ce"]["status"] == "skipped"  # the CUDA allocator's peak: GPU only
    tests = report["tests"]
    assert tests["status"] == "skipped" and tests["skipped"] >= 5 and tests["passed"] == tests["failed"] == 0, tests
    log = (tmp_path / "gpu_suite.log").read_text()
    assert "===== offline_vs_student" in log and "[gpu_suite] done in" in log
    assert log.index("===== offline_vs_student") < log.index("===== tests")  # the tests get what is left
    with tarfile.open(tmp_path / "parts.tgz") as tar:  # the rest in one archive: the device tool returns 8 files
        names = set(tar.getnames())
    assert {f"{k}.json" for k in BENCHMARKS if report[k]["status"] == "ok"} | {"gpu_tests.xml"} <= names, names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_suite.json", "gpu_suite.log", "parts.tgz"]


def test_only_runs_the_parts_named(tmp_path):
    p = suite("--dry-run", "--only", "tests", out=tmp_path, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert all(report[k] == {"status": "not run", "why": "--only"} for k in BENCHMARKS), report
    assert report["tests"]["status"] == "skipped", report["tests"]


def test_bad_command_lines_are_one_line_errors(tmp_path):
    p = suite("--gpu", out=tmp_path, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: unknown argument"), p
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--budget-s", "soon"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--budget-s", "-1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "--budget-s=-1 must be positive" in p.stderr, p
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--only", "mfu,speed"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "unknown part speed; allowed: mfu" in p.stderr, p
    p = suite("--only", out=tmp_path, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: --only needs"), p


def test_the_docs_table_is_the_report_of_the_kept_json():
    """docs/gpu.md's table of the first GPU run is bench/gpu_report.py's rendering of the JSON kept beside it."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_report.py"), str(ROOT / "docs" / "gpu_suite_h200.json")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0 and "| `offline_vs_student` |" in p.stdout, p
    assert p.stdout.strip() in (ROOT / "docs" / "gpu.md").read_text()
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_report.py"), str(ROOT / "README.md")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not a GPU suite JSON" in p.stderr, p
