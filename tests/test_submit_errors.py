"""launchers/submit.py refuses, in one line with exit code 2 and before anything is written or submitted:
no ``sbatch`` on PATH, ``launcher.logs`` naming an existing file, and a text data file that does not exist.
Run in-process (``conftest.run_main``) against a fake ``sbatch`` that records its calls."""

import os
from pathlib import Path

import pytest

from conftest import run_main

SUBMIT = "launchers/submit.py"


@pytest.fixture
def fake_sbatch(tmp_path) -> tuple:
    """``(PATH with a fake sbatch first, its calls file)``: the fake prints a job id and records its arguments."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch_calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", calls


def submit(tmp: Path, path: str, *extra):
    return run_main(SUBMIT, "distill", f"workdir={tmp / 'w'}", f"launcher.logs={tmp / 'logs'}", *extra,
                    env={"PATH": path})


def one_line(p, *needles) -> None:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-3000:])
    assert lines[0].startswith("error: ") and all(n in lines[0] for n in needles), lines[0]


def test_the_fake_sbatch_submits(tmp_path, fake_sbatch):
    path, calls = fake_sbatch
    p = submit(tmp_path, path)
    assert p.returncode == 0 and "submitted distill: job 4242" in p.stdout, p.stderr[-3000:]
    assert calls.read_text().startswith("--parsable ") and (tmp_path / "w").is_dir()


def test_no_sbatch_on_path(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line(submit(tmp_path, str(tmp_path / "empty")), "sbatch is not on PATH", "--dry-run")
    assert not (tmp_path / "w").exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("under", [False, True], ids=["the file", "under the file"])
def test_logs_naming_a_file(tmp_path, fake_sbatch, under):
    path, calls = fake_sbatch
    (tmp_path / "notes").write_bytes(b"a user's file\n")
    value = tmp_path / "notes" / "logs" if under else tmp_path / "notes"
    one_line(run_main(SUBMIT, "distill", f"workdir={tmp_path / 'w'}", f"launcher.logs={value}", env={"PATH": path}),
             f"launcher.logs={value}", "existing file")
    assert (tmp_path / "notes").read_bytes() == b"a user's file\n"
    assert not calls.exists() and not (tmp_path / "w").exists()


@pytest.mark.parametrize("key", ["train_text", "valid_text"])
def test_missing_text_file(tmp_path, fake_sbatch, key):
    path, calls = fake_sbatch
    (tmp_path / "train.txt").write_text("some text\n")
    files = {"train_text": tmp_path / "train.txt", "valid_text": tmp_path / "train.txt", key: tmp_path / "missing.txt"}
    one_line(submit(tmp_path, path, "data=text", *[f"data.{k}={v}" for k, v in files.items()]),
             f"data.{key}={tmp_path / 'missing.txt'} does not exist")
    assert not calls.exists() and not (tmp_path / "w").exists() and not (tmp_path / "logs").exists()
