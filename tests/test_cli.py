"""The command line as Hydra users type it: --help, --cfg job [--package], typo suggestions, the recipe list,
and a console that shows the project's own lines only (warnings on, as in a user's terminal).

Recipes run in this process (``conftest.run_main``), but for REAL_PROCESS, the module's recipe list and the
warning-free successful run, which are real processes."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, run_main

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
RECIPES = ["recipes/import_hf.py", "recipes/export_hf.py", "recipes/prune.py", "recipes/evaluate.py",
           "recipes/correct_teacher.py", "recipes/distill.py", "recipes/preprocess_data.py", "recipes/demo.py",
           "launchers/submit.py", "recipes/experiments/minitron_smollm2.py"]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(ENV, PYTHONPATH=str(ROOT)))


REAL_PROCESS = {"recipes/distill.py", "launchers/submit.py"}


@pytest.mark.parametrize("script", RECIPES)
def test_help(script):
    p = (run if script in REAL_PROCESS else run_main)(ROOT / script, "--help")
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr[-2000:]
    first = __import__("ast").get_docstring(__import__("ast").parse((ROOT / script).read_text())).splitlines()[0]
    assert first in p.stdout
    if script not in ("recipes/preprocess_data.py", "recipes/demo.py"):  # the Hydra recipes
        assert "Config: conf/" in p.stdout and "--cfg job" in p.stdout


def test_cfg_job_prints_the_composed_config_and_one_group():
    p = run_main(ROOT / "recipes/distill.py", "--config-name", "mn_minitron_8b", "trainer.optim.lr=3e-4", "--cfg", "job")
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = yaml.safe_load(p.stdout)
    assert cfg["trainer"]["optim"]["lr"] == 3e-4 and cfg["model"]["hidden_size"] == 5120
    assert cfg["correction"]["original_lr"] == 3e-4  # resolved interpolation (${trainer.optim.lr})
    p = run_main(ROOT / "recipes/prune.py", "--cfg", "job", "--package", "prune.search")
    assert p.returncode == 0, p.stderr[-2000:]
    assert yaml.safe_load(p.stdout)["max_candidates"] == 20


def test_mistyped_key_suggests_the_closest():
    p = run_main(ROOT / "recipes/distill.py", "trainer.optim.lrr=1e-4")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "did you mean trainer.optim.lr?" in p.stderr


def test_module_lists_the_recipes():
    p = run("-m", "minitron_nemo", "--help")
    assert p.returncode == 0
    for script in RECIPES[:-1]:
        assert script in p.stdout


def test_a_successful_run_prints_no_warnings(tmp_path):
    """Import and export of a small model: stderr is empty (the expected library warnings are filtered once)."""
    from hf_models import make_hf_model

    hf = make_hf_model("mistral", tmp_path / "hf")
    for args in ((ROOT / "recipes/import_hf.py", f"source={hf}", f"output={tmp_path / 'ck'}"),
                 (ROOT / "recipes/export_hf.py", f"checkpoint={tmp_path / 'ck'}", f"output={tmp_path / 'hf2'}")):
        p = run(*args)
        assert p.returncode == 0, p.stderr[-3000:]
        warnings = [line for line in p.stderr.splitlines() if line.strip()]
        assert warnings == [], warnings
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["hidden_size"] == 64
