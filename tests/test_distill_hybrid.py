"""Distillation of a hybrid Mamba-Transformer student from a hybrid teacher (Nemotron-H), online and from the teacher
cache, each resumed bitwise on the CPU: the tiny random Nemotron-H of tests/workers/prune_common.py ("M-M*-M",
its own tokenizer) teaches a student of its architecture with fresh weights (``student.init=random``)."""

from __future__ import annotations

import shutil

import pytest

from conftest import ROOT, kill_9_once_logged, run_main, run_py, tiny_imported, train_records

DISTILL, CACHE = ROOT / "recipes" / "distill.py", ROOT / "recipes" / "cache_teacher.py"
ITERS, SAVE_EVERY = 8, 4


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d, ck = tiny_imported(tmp_path_factory, "nemotron_h")
    text = (d / "calib.txt").read_text()
    (d / "train.txt").write_text(text[:120_000])
    (d / "valid.txt").write_text(text[-20_000:])
    common = [f"teacher.checkpoint={ck}", "teacher.corrected_checkpoint=null", "~model", "teacher.max_loss_fraction=10",
              "teacher.held_out=false", "data=text", f"data.train_text={d / 'train.txt'}",
              f"data.valid_text={d / 'valid.txt'}", f"data.test_text={d / 'valid.txt'}", "data.seq_length=32",
              "data.valid_samples=4", "data.test_tokens=64", "dtype=float32", f"student.checkpoint={ck}",
              "student.init=random", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
              f"trainer.train_iters={ITERS}", "trainer.warmup_iters=1", "trainer.eval_interval=0",
              "trainer.tensorboard=false", f"checkpointing.save_interval={SAVE_EVERY}"]
    return d, common


def test_online_kd_learns_and_resumes_bitwise_after_kill_9(job, tmp_path):
    d, common = job
    ref = tmp_path / "ref"
    p = run_py(DISTILL, *common, f"workdir={ref}")
    assert "(architecture only: random init)" in p.stdout and "[train] TP 1 x PP 1 x DP 1" in p.stdout
    full = train_records(ref)
    assert sorted(full) == list(range(1, ITERS + 1))
    first, last = full[1]["logits"], sum(full[i]["logits"] for i in (ITERS - 1, ITERS)) / 2
    assert last < first, (first, last)  # the student moves toward the teacher's distribution

    work = tmp_path / "killed"
    kill_9_once_logged(DISTILL, [*common, f"workdir={work}"], f"[train] iter {SAVE_EVERY + 1}/{ITERS} ",
                       tmp_path / "killed.log")
    assert not (work / "results.json").exists()
    p = run_py(DISTILL, *common, f"workdir={work}")
    assert "[train] resumed from" in p.stdout, p.stdout[-3000:]
    again = train_records(work)  # the resumed run's records of iterations 5.. replace the killed run's
    assert sorted(again) == list(range(1, ITERS + 1))
    assert all(again[i] == full[i] for i in again), [(i, again[i], full[i]) for i in again if again[i] != full[i]]


def test_offline_kd_from_the_cache_resumes_bitwise(job, tmp_path):
    d, common = job
    cache = tmp_path / "cache"
    p = run_main(CACHE, *common, f"cache.dir={cache}", "cache.topk=16", "cache.shard_samples=4")
    assert p.returncode == 0, p.stderr[-3000:]
    args = [*common, f"workdir={tmp_path / 'offline'}", f"distill.teacher_cache={cache}"]
    p = run_py(DISTILL, *args)
    assert "offline, from the cache" in p.stdout
    first = train_records(tmp_path / "offline")
    assert sorted(first) == list(range(1, ITERS + 1))
    shutil.rmtree(tmp_path / "offline" / "checkpoints" / f"iter_{ITERS:07d}")  # as if killed after the one at 4
    p = run_py(DISTILL, *args)
    assert "resumed from" in p.stdout and f"iteration {SAVE_EVERY}" in p.stdout, p.stdout[-3000:]
    again = train_records(tmp_path / "offline")
    assert all(again[i] == first[i] for i in range(SAVE_EVERY + 1, ITERS + 1))
