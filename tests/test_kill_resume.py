"""kill -9 (what the OOM killer sends) during a distillation job: nothing of the killed run survives it or
keeps its workdir locked, and the same command, run again, resumes and ends bitwise where an uninterrupted
run ends. Real processes, since signals and orphans are the point; every process a test starts carries a
marker in its environment, so a leftover (re-parented to PID 1 or not) is found by scanning /proc. Also the
lock file's record: a lock still held after its recorded owner ended is named as a leftover."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_user_errors import ENV, run, teacher  # noqa: F401  (teacher: the tiny Llama with SmolLM2's tokenizer)

DISTILL = "recipes/distill.py"
ITERS, SAVE_EVERY = 12, 2
MARK = "MINITRON_KILL_TEST"


def job_args(work: Path, teacher) -> list[str]:
    """A tiny distillation job: the teacher pruned in-job to half its width, a checkpoint every 2 steps."""
    d, text = teacher
    return [f"workdir={work}", f"teacher.checkpoint={d}", "teacher.corrected_checkpoint=null", "~model",
            "teacher.max_loss_fraction=10", "teacher.held_out=false", "data=text", f"data.train_text={text}",
            f"data.valid_text={text}", f"data.test_text={text}", "data.seq_length=32", "data.valid_samples=2",
            "data.test_tokens=64", "dtype=float32", "prune.grid=16", "prune.target_hidden_size=16",
            "prune.target_ffn_hidden_size=32", "prune.calibration.num_samples=4", "prune.calibration.seq_length=32",
            "prune.calibration.micro_batch_size=2", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
            f"trainer.train_iters={ITERS}", "trainer.warmup_iters=1", "trainer.eval_interval=0",
            "trainer.tensorboard=false", f"checkpointing.save_interval={SAVE_EVERY}"]


def marked_env(tmp: Path) -> dict:
    return {MARK: str(tmp)}


def start(work: Path, teacher, tmp: Path) -> tuple[subprocess.Popen, Path]:
    log = tmp / "killed.log"
    e = dict(ENV, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **marked_env(tmp))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / DISTILL), *job_args(work, teacher)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=e)
    return proc, log


def until(condition, proc: subprocess.Popen, log: Path, poll: float = 0.02):
    """Poll ``condition()`` until it is true; fail when the job ends first."""
    deadline = time.time() + 300
    while not (found := condition()):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the job ended (or hung) before the moment to kill it came:\n{log.read_text()[-3000:]}")
        time.sleep(poll)
    return found


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def open_files(pid: int) -> list[str]:
    return [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]


def marked_processes(tmp: Path) -> list[str]:
    """Live processes (zombies have no environment) started with this test's marker."""
    mark = f"{MARK}={tmp}".encode()
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and mark in (p / "environ").read_bytes().split(b"\0"):
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{p.name}: {cmd[:150]}")
        except OSError:
            continue
    return found


def assert_nothing_left(tmp: Path, grace: float = 10.0) -> None:
    deadline = time.time() + grace
    while (left := marked_processes(tmp)) and time.time() < deadline:
        time.sleep(0.1)
    assert not left, f"processes of the killed run outlived it: {left}"


def kill_9(proc: subprocess.Popen) -> None:
    proc.kill()
    assert proc.wait(timeout=60) == -9


def rerun(work: Path, teacher, tmp: Path) -> str:
    """The same command again, nothing killed by hand: it resumes and finishes."""
    p = run(DISTILL, *job_args(work, teacher), env=marked_env(tmp))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[train] resumed from" in p.stdout, p.stdout[-3000:]
    return p.stdout


# ----------------------------------------------------------------------------- the result, bitwise
def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def train_losses(work: Path) -> dict:
    """``{iteration: losses}``, the last record of each (a resumed run repeats the steps after its checkpoint)."""
    recs = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["iteration"]: {k: r[k] for k in ("total", "logits", "lm", "lr", "grad_norm")}
            for r in recs if r["kind"] == "train"}


def assert_bitwise_equal(work: Path, ref: Path) -> None:
    name = f"iter_{ITERS:07d}"
    a, b = work / "checkpoints" / name, ref / "checkpoints" / name
    assert (a / "COMPLETE").is_file() and (b / "COMPLETE").is_file()
    for part in ("weights", "train_state/optimizer"):   # the student, its Adam moments
        shards = sorted(p.name for p in (b / part).glob("*.distcp"))
        assert shards and shards == sorted(p.name for p in (a / part).glob("*.distcp"))
        for s in shards:
            assert (a / part / s).read_bytes() == (b / part / s).read_bytes(), (part, s)
    state = [torch.load(d / "train_state" / "rank_00000.pt", weights_only=False) for d in (a, b)]
    for s in state:  # Python's and NumPy's generators are not seeded (they differ between any two runs) nor used
        del s["rng"]["python"], s["rng"]["numpy"]
    assert same(*state), "Adam step, scheduler, data position or torch RNG state differs"
    assert train_losses(work) == train_losses(ref) and len(train_losses(ref)) == ITERS
    results = [json.loads((d / "results.json").read_text()) for d in (work, ref)]
    assert results[0]["student_distilled"] == results[1]["student_distilled"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher):
    """The same job, uninterrupted."""
    work = tmp_path_factory.mktemp("reference") / "w"
    p = run(DISTILL, *job_args(work, teacher))
    assert p.returncode == 0, p.stderr[-3000:]
    return work


# ----------------------------------------------------------------------------- kill -9
def test_kill_9_during_training_then_the_same_command_resumes_bitwise(tmp_path, teacher, reference):
    work = tmp_path / "w"
    proc, log = start(work, teacher, tmp_path)
    until(lambda: f"[train] iter {SAVE_EVERY + 1}/{ITERS} " in log.read_text(), proc, log)
    kill_9(proc)
    assert_nothing_left(tmp_path)
    assert not (work / "results.json").exists()  # it was killed before the end
    assert list((work / "checkpoints").glob("iter_*/COMPLETE"))  # there is a checkpoint to resume from
    rerun(work, teacher, tmp_path)
    assert_bitwise_equal(work, reference)
    assert_nothing_left(tmp_path)


def test_kill_9_during_a_checkpoint_save_then_the_same_command_resumes_bitwise(tmp_path, teacher, reference):
    """Killed while Megatron's forked writer processes write a training checkpoint's shards: the writers die
    with it, the half-written checkpoint is never resumed from."""
    work = tmp_path / "w"
    proc, log = start(work, teacher, tmp_path)
    until(lambda: f"[train] iter {SAVE_EVERY + 1}/{ITERS} " in log.read_text(), proc, log)  # one checkpoint saved
    until(lambda: children(proc.pid), proc, log, poll=0.001)  # the next save's writers are at work
    kill_9(proc)
    assert_nothing_left(tmp_path)  # the writers included: they carry the marker too
    cut = [p.name for p in (work / "checkpoints").iterdir() if not (p / "COMPLETE").is_file()]
    assert cut, "the kill did not land during a save"
    rerun(work, teacher, tmp_path)
    assert_bitwise_equal(work, reference)
    assert not [p for p in (work / "checkpoints").iterdir() if not (p / "COMPLETE").is_file()]
    assert_nothing_left(tmp_path)


def test_a_killed_process_leaves_no_forked_child_and_no_lock(tmp_path):
    """The mechanism alone: a process holding a lock forks a child (multiprocessing, fork) that would
    sleep for a minute; the child has closed its copy of the lock descriptor. The process is killed with
    -9: the child dies with it and the lock is free at once."""
    out = tmp_path / "out"
    code = ("import multiprocessing, time; from minitron_nemo import outputs; "
            f"outputs.claim_dir({str(out)!r}); "
            "c = multiprocessing.get_context('fork').Process(target=time.sleep, args=(60,)); c.start(); "
            "print(c.pid, flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env=dict(ENV, PYTHONPATH=str(ROOT), **marked_env(tmp_path)))
    child = int(holder.stdout.readline())
    assert child in children(holder.pid)
    lock = str(tmp_path / ".out.lock")
    deadline = time.time() + 10  # the child closes it as soon as it runs
    while lock in open_files(child) and time.time() < deadline:
        time.sleep(0.01)
    assert lock in open_files(holder.pid) and lock not in open_files(child)
    kill_9(holder)
    assert_nothing_left(tmp_path, grace=5)
    from minitron_nemo import outputs

    outputs.take_lock(tmp_path / ".out.lock", "output", out)  # no "in use by another run"
    outputs.release_locks()


# ----------------------------------------------------------------------------- the lock record
def hold(lock: Path) -> subprocess.Popen:
    """Another process holding the flock of ``lock`` (as a leftover child of a killed run would)."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def refusal(lock: Path, out: Path) -> str:
    from minitron_nemo import outputs
    from minitron_nemo.errors import UserError

    with pytest.raises(UserError) as e:
        outputs.take_lock(lock, "output", out)
    return str(e.value)


def ended_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("owner", ["ended", "pid reused"])
def test_a_lock_held_after_its_owner_ended_names_the_leftover(tmp_path, owner):
    from minitron_nemo import outputs

    lock, out = tmp_path / ".out.lock", tmp_path / "out"
    record = dict(outputs.owner_record(), cmd="recipes/distill.py workdir=out")
    if owner == "ended":
        record["pid"] = ended_pid()
    else:  # a live process has the recorded pid, but it started at another time
        record["start"] = str(int(record["start"]) - 1)
    lock.write_text(json.dumps(record))
    holder = hold(lock)
    try:
        line = refusal(lock, out)
    finally:
        holder.kill()
        holder.wait()
    assert "\n" not in line and "in use by another run" not in line, line
    assert f"pid {holder.pid} (" in line and f"kill {holder.pid}" in line, line
    assert f"left over from an ended run (pid {record['pid']} on " in line, line


def test_a_lock_of_a_live_owner_is_in_use_and_a_free_one_is_taken(tmp_path):
    from minitron_nemo import outputs

    lock, out = tmp_path / ".out.lock", tmp_path / "out"
    lock.write_text("")
    holder = hold(lock)
    try:  # the holder is the recorded owner, alive
        lock.write_text(json.dumps(dict(outputs.owner_record(), pid=holder.pid,
                                        start=outputs.start_time(holder.pid), cmd="recipes/prune.py")))
        line = refusal(lock, out)
    finally:
        holder.kill()
        holder.wait()
    assert line.startswith(f"output={out} is in use by another run (pid {holder.pid} on "), line
    assert "recipes/prune.py" in line and "left over" not in line, line
    # the owner ended and nothing holds the lock: the next run takes it and records itself
    outputs.take_lock(lock, "output", out)
    try:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        outputs.release_locks()
    assert not lock.exists()
