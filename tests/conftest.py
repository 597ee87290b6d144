import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(path, name: str):
    """A recipe script imported as a module (to call its ``main`` in-process, e.g. for bad-input checks)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_torchrun(script, nproc: int, *args, timeout: int = 900, env=None) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun with ``nproc`` gloo ranks; fail the test with its output on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)
    if p.returncode != 0:
        pytest.fail(f"torchrun {script} {args} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
    return p


def run_py(*args, timeout: int = 900, env=None, check=True) -> subprocess.CompletedProcess:
    """Run ``python *args`` from the repo root."""
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=e, cwd=ROOT)
    if check and p.returncode != 0:
        pytest.fail(f"python {args} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
    return p


def earlier_dataset(prefix, tokenizer_dir) -> dict:
    """A real ``PREFIX.bin/.idx`` from an earlier preprocessing run (which a re-run may replace, a failed run
    must leave as it was); returns ``{file name: bytes}`` to compare with afterwards."""
    from minitron_nemo.data.indexed import HFTokenizer, write_indexed_dataset

    write_indexed_dataset(["an earlier corpus", "of two documents"], HFTokenizer(tokenizer_dir), prefix)
    return {Path(f"{prefix}{s}").name: Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx")}
