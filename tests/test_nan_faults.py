"""Non-finite training: a damaged teacher cache is refused before compute, a non-finite step stops the job
(exit 2, one line naming the iteration) before the optimizer steps, and the last checkpoint stays as it was
and resumable. Tiny random teacher and student of tests/test_teacher_cache.py."""

import shutil

import numpy as np
import pytest
import torch

from conftest import run_main
from test_teacher_cache import CACHE, DISTILL, _digest, _train_records, job  # noqa: F401 (the module fixture)

BF16_NAN, BF16_ONE = 0x7FC0, 0x3F80


@pytest.fixture(scope="module")
def cache(job):  # noqa: F811
    """A top-16 bf16 cache in shards of 3 samples: train samples 0-2, 3-5, ..., 15; valid 0-2, 3."""
    out = job["dir"] / "nan_cache"
    p = run_main(CACHE, *job["common"], f"cache.dir={out}", "cache.topk=16", "cache.shard_samples=3")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def good_run(job, cache):  # noqa: F811
    """The job trained from the intact cache: 4 iterations, checkpoints at 2 and 4."""
    work = job["dir"] / "nan_good"
    p = run_main(DISTILL, *_args(job, cache, work))
    assert p.returncode == 0, p.stderr[-3000:]
    return work


def _args(job, cache, work):  # noqa: F811
    return [*job["common"], f"workdir={work}", f"student.checkpoint={job['student']}",
            f"distill.teacher_cache={cache}"]


def _damaged_copy(cache, dst, split, shard, damage):
    shutil.copytree(cache, dst)
    f = dst / split / f"{shard:05d}" / "logp.bin"
    a = np.fromfile(f, dtype=np.uint16)
    damage(a)
    a.tofile(f)
    return f


def _one_error_line(p):
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stdout[-1500:] + p.stderr[-3000:]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return err[0]


def test_shard_of_random_bytes_is_refused_before_compute(job, cache, good_run, tmp_path):  # noqa: F811
    rng = np.random.default_rng(0)
    bad = _damaged_copy(cache, tmp_path / "cache", "train", 4,
                        lambda a: a.__setitem__(slice(None), rng.integers(0, 1 << 16, a.size, dtype=np.uint16)))
    before = _digest(good_run), _digest(tmp_path / "cache")
    p = run_main(DISTILL, *_args(job, tmp_path / "cache", good_run))
    line = _one_error_line(p)
    assert str(bad) in line and "train sample 12" in line, line
    assert "[train]" not in p.stdout  # refused before any training step
    assert (_digest(good_run), _digest(tmp_path / "cache")) == before  # the finished job's output as it was


def test_nan_in_one_sample_stops_at_its_iteration_and_keeps_the_last_checkpoint(job, cache, good_run,  # noqa: F811
                                                                                tmp_path):
    """Train sample 10 (the second of shard 3, which the check before compute does not read) holds a few NaN
    log-probabilities; iteration 3 reads samples 8-11. The job resumes from the checkpoint at 2, stops at 3
    before the optimizer steps, and leaves its checkpoints as they were; with the cache repaired, it resumes
    from 2 and trains as the uninterrupted run did."""
    per_sample = 32 * 16  # seq_length x K
    bad = _damaged_copy(cache, tmp_path / "cache", "train", 3,
                        lambda a: a.__setitem__(slice(per_sample + 5, per_sample + 200, 40), BF16_NAN))
    work = tmp_path / "work"
    shutil.copytree(good_run, work)
    shutil.rmtree(work / "checkpoints" / "iter_0000004")  # as if killed after the checkpoint at 2
    before = _digest(work / "checkpoints")
    p = run_main(DISTILL, *_args(job, tmp_path / "cache", work))
    line = _one_error_line(p)
    assert "iteration 3 of 4" in line and str(bad) in line and "train sample 10" in line, line
    assert "iteration 2" in p.stdout and "resumed from" in p.stdout
    assert _digest(work / "checkpoints") == before  # nothing saved from the non-finite step
    p = run_main(DISTILL, *_args(job, cache, work))
    assert p.returncode == 0 and "iteration 2" in p.stdout, p.stderr[-3000:]
    first, again = _train_records(good_run), _train_records(work)
    assert all(again[i][k] == first[i][k] for i in (3, 4) for k in ("lm", "logits", "total"))


def test_check_stops_on_nonfinite_loss_gradient_or_noted_fault():
    from minitron_nemo.errors import UserError
    from minitron_nemo.training import faults

    lin = torch.nn.Linear(3, 2)
    lin(torch.ones(1, 3)).sum().backward()
    faults.check("iteration 1 of 9", {"lm": 2.0}, lin)  # finite: no stop
    with pytest.raises(UserError, match=r"iteration 7 of 9: non-finite loss \(total=nan\)"):
        faults.check("iteration 7 of 9", {"lm": 2.0, "total": float("nan")}, lin)
    lin.weight.grad[0, 1] = float("inf")
    faults.check("iteration 2 of 9", {"lm": 2.0}, lin, grads=False)
    with pytest.raises(UserError, match="iteration 2 of 9: non-finite gradients"):
        faults.check("iteration 2 of 9", {"lm": 2.0}, lin)
    faults.note("shard file X holds NaN")
    with pytest.raises(UserError, match="iteration 4 of 9: invalid input values: shard file X holds NaN"):
        faults.check("iteration 4 of 9", {"lm": 1.0}, None)
    faults.check("iteration 5 of 9", {"lm": 1.0}, None)  # a fault is reported once


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_value_check_accepts_a_teacher_and_refuses_garbage(dtype):
    from minitron_nemo.distill.bucket_kl import teacher_topk
    from minitron_nemo.distill.cache import bad_values, sum_tolerance

    v, k = 4096, 64
    logits = torch.randn(32, v, generator=torch.Generator().manual_seed(0)) * 0.01  # near-uniform: most rounding
    _, logp, lse = teacher_topk(logits, v, 1.0)
    logp = logp.to(getattr(torch, dtype)).float()
    lse, target = lse.numpy(), logp[:, 0].numpy()
    tol = sum_tolerance(dtype, v)
    assert bad_values(logp, lse, target, tol) is None
    assert bad_values(logp[:, :k], lse, target, tol) is None
    nan = logp.clone()
    nan[3, 5] = float("nan")
    assert bad_values(nan, lse, target, tol)[1] == "non-finite log-probabilities"
    assert "above 0" in bad_values(logp.abs(), lse, target, tol)[1]
    assert "summing to" in bad_values(torch.full((32, k), -0.01), lse, target, tol)[1]
    assert bad_values(logp, lse * np.inf, target, tol)[0] == "lse.bin"
    assert bad_values(logp, lse, np.full_like(target, 0.5), tol)[0] == "target.bin"


def test_all_ranks_stop_together(job, cache, tmp_path):  # noqa: F811
    """Data parallel x 2, two processes started as the launcher starts them (without it, since it would end
    the other rank itself): train sample 10, read by one rank only, holds log-probabilities above 0 (a
    finite loss, so only that rank knows); both ranks stop at iteration 3 with its line, exit 2, none is
    left waiting in a collective, and no checkpoint of the step is saved."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    _damaged_copy(cache, tmp_path / "cache", "train", 3, lambda a: a.__setitem__(slice(512, 520), BF16_ONE))
    work = tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MINITRON_STORE_FILE=str(tmp_path / "store_port"), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(DISTILL), *_args(job, tmp_path / "cache", work)], cwd=ROOT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        lines = [line for line in err.splitlines() if line.strip()]
        assert p.returncode == 2 and len(lines) == 1, out[-1500:] + err[-3000:]
        assert "iteration 3 of 4" in lines[0] and "train sample 10" in lines[0] and "above 0" in lines[0], lines
    assert sorted(c.name for c in (work / "checkpoints").iterdir()) == ["iter_0000002"]
