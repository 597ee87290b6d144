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


# Python's own warning filters, as a user's terminal has them (no -W, no PYTHONWARNINGS)
PYTHON_DEFAULT_WARNINGS = (("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                           ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                           ("ignore", ResourceWarning, None))


def run_main(script, *args, cwd=ROOT, env=None, timeout=None) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` run in this process: the script's ``main()`` with ``sys.argv``, the working
    directory, the environment and the warning filters set as in a user's terminal; file descriptors 1 and 2
    captured (so output of child processes counts too). Returns what ``subprocess.run`` would: the exit code
    (1 and the traceback on stderr for an uncaught exception), stdout and stderr. Afterwards the process is as
    before: locks released, parallel state and the process group destroyed, signal handlers, ``sys.argv``,
    the working directory and the environment restored. About 30x cheaper than a subprocess after the first
    call (the imports are shared); the few cases about exit codes, signals or stray processes stay real
    processes (``run_py``)."""
    import io
    import runpy
    import signal
    import tempfile
    import traceback
    import warnings

    path = Path(script) if Path(script).is_absolute() else ROOT / script
    saved = dict(argv=list(sys.argv), cwd=os.getcwd(), env=dict(os.environ), path=list(sys.path),
                 signals={s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)})
    code = 0
    with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err:
        sys.stdout.flush(), sys.stderr.flush()
        fds = os.dup(1), os.dup(2)
        streams = sys.stdout, sys.stderr
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), write_through=True)
        try:
            os.chdir(cwd)
            os.environ.update({k: str(v) for k, v in (env or {}).items()})
            sys.argv = [str(path), *map(str, args)]
            with warnings.catch_warnings():
                warnings.resetwarnings()
                for action, category, module in reversed(PYTHON_DEFAULT_WARNINGS):
                    warnings.filterwarnings(action, category=category, module=module or "")
                from minitron_nemo import console

                console.install_filters()
                try:
                    sys.path.insert(0, str(path.parent))  # as `python SCRIPT` puts the script's folder first
                    runpy.run_path(str(path), run_name="__main__")
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                    if isinstance(e.code, str):
                        print(e.code, file=sys.stderr)
                except BaseException:  # what an uncaught exception prints
                    traceback.print_exc()
                    code = 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            sys.stdout, sys.stderr = streams
            os.dup2(fds[0], 1), os.dup2(fds[1], 2)
            os.close(fds[0]), os.close(fds[1])
            _reset_process(saved)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return subprocess.CompletedProcess([sys.executable, str(path), *map(str, args)], code, stdout, stderr)


def _reset_process(saved: dict) -> None:
    """Undo what a recipe's ``main()`` leaves in the process (see ``run_main``)."""
    import signal

    from minitron_nemo import outputs

    outputs.release_locks()
    if "megatron.core" in sys.modules:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for s, h in saved["signals"].items():
        signal.signal(s, h)
    sys.argv, sys.path[:] = saved["argv"], saved["path"]
    os.chdir(saved["cwd"])
    os.environ.clear()
    os.environ.update(saved["env"])


def run_torchrun(script, nproc: int, *args, timeout: int = 900, env=None, torchrun: bool = False
                 ) -> subprocess.CompletedProcess:
    """Run ``script`` with ``nproc`` gloo ranks; fail the test with its output on error. The ranks are started by
    the project's launcher (``python -m minitron_nemo.launch``: rank 0 binds its store's port itself, so jobs
    started at once on this machine, as pytest-xdist's workers start them, cannot take each other's port), or
    with ``torchrun=True`` by torchrun's agent (for a script that calls ``init_process_group`` itself)."""
    launcher = ["torch.distributed.run", "--standalone"] if torchrun else ["minitron_nemo.launch"]
    cmd = [sys.executable, "-m", *launcher, f"--nproc_per_node={nproc}", str(script), *map(str, args)]
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(launcher)} {script} {args} failed ({p.returncode}):\n{p.stdout[-4000:]}\n"
                    f"{p.stderr[-8000:]}")
    return p


# MINITRON_TEST_TRACE=DIR (bench/gpu_suite.py sets it for the GPU tests): every process run_py or
# kill_9_once_logged starts writes its output to DIR as it runs, and a line is printed when it starts and ends,
# so a session stopped from outside still shows where its time went.
_TRACE_DIR = os.environ.get("MINITRON_TEST_TRACE")
_TRACE_COUNT = [0]


def trace(message: str) -> None:
    if _TRACE_DIR:
        print(f"[trace] {message}", file=sys.__stderr__, flush=True)


def trace_log(script) -> Path | None:
    """A fresh log path in the trace folder for a process running ``script``; None when not tracing."""
    if not _TRACE_DIR:
        return None
    _TRACE_COUNT[0] += 1
    Path(_TRACE_DIR).mkdir(parents=True, exist_ok=True)
    return Path(_TRACE_DIR) / f"{_TRACE_COUNT[0]:02d}_{Path(str(script)).stem}"


def _run_traced(cmd: list, log: Path, timeout: int, env: dict) -> subprocess.CompletedProcess:
    """``subprocess.run`` with the output streamed to ``log.out`` / ``log.err`` instead of pipes."""
    import time

    trace(f"start {' '.join(cmd[1:])[:300]} -> {log.name}.out/.err")
    t0 = time.monotonic()
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=err, timeout=timeout, env=env, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            trace(f"{log.name} timed out after {time.monotonic() - t0:.1f} s")
            raise
    trace(f"{log.name} exit {rc} after {time.monotonic() - t0:.1f} s")
    read = lambda suffix: Path(f"{log}{suffix}").read_text(errors="replace")  # noqa: E731
    return subprocess.CompletedProcess(cmd, rc, read(".out"), read(".err"))


def run_py(*args, timeout: int = 900, env=None, check=True) -> subprocess.CompletedProcess:
    """Run ``python *args`` from the repo root."""
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    cmd = [sys.executable, *map(str, args)]
    log = trace_log(args[0])
    if log is None:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)
    else:
        p = _run_traced(cmd, log, timeout, e)
    if check and p.returncode != 0:
        pytest.fail(f"python {args} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
    return p


def tiny_kd_args(work: Path, teacher: Path, train: Path, valid: Path, *, iters: int, save_every: int,
                 dtype: str = "float32", global_batch: int = 2) -> list:
    """A tiny distillation job (recipes/distill.py): the teacher pruned in-job to hidden 48 / FFN 64, text data,
    32-token sequences, a checkpoint every ``save_every`` steps."""
    return [f"workdir={work}", f"teacher.checkpoint={teacher}", "teacher.corrected_checkpoint=null", "~model",
            "teacher.max_loss_fraction=10", "teacher.held_out=false", "data=text", f"data.train_text={train}",
            f"data.valid_text={valid}", f"data.test_text={valid}", "data.seq_length=32", "data.valid_samples=4",
            "data.test_tokens=64", f"dtype={dtype}", "prune.grid=16", "prune.target_hidden_size=48",
            "prune.target_ffn_hidden_size=64", "prune.calibration.num_samples=4", "prune.calibration.seq_length=32",
            "prune.calibration.micro_batch_size=2", "trainer.micro_batch_size=2",
            f"trainer.global_batch_size={global_batch}", f"trainer.train_iters={iters}", "trainer.warmup_iters=1",
            "trainer.eval_interval=0", "trainer.tensorboard=false", f"checkpointing.save_interval={save_every}"]


def tiny_imported(tmp_path_factory, family: str) -> tuple:
    """``(dir, checkpoint)`` for a module fixture: tests/workers/prune_common.py's tiny random ``family`` model
    (weights spread so that units differ, its own BPE tokenizer) imported, with its HF directory
    ``dir/hf_{family}`` and ``dir/calib.txt``."""
    sys.path.insert(0, str(ROOT / "tests" / "workers"))
    from prune_common import small_checkpoint

    d = tmp_path_factory.mktemp(family)
    return d, small_checkpoint(d, family)


def train_records(work: Path) -> dict:
    """Each training step's losses, learning rate and gradient norm from a job's ``metrics.jsonl``."""
    import json

    recs = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["iteration"]: {k: r[k] for k in ("total", "logits", "lr", "grad_norm")} for r in recs
            if r["kind"] == "train"}


def kill_9_once_logged(script: Path, args: list, mark: str, log: Path, env: dict | None = None) -> None:
    """Start ``python SCRIPT ARGS`` (output to ``log``); SIGKILL it as soon as ``mark`` is in its log. Fails the test
    when the process ends (or hangs for 10 minutes) first."""
    import time

    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    traced = trace_log(script)
    if traced is not None:  # the killed job's log where the trace keeps it
        log = Path(f"{traced}.log")
        trace(f"start {script} (killed once its log has {mark!r}) -> {log.name}")
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=e)
    deadline = time.time() + 600
    while mark not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the job ended (or hung) before it could be killed:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    proc.kill()
    assert proc.wait(timeout=60) == -9
    trace(f"{log.name} killed after {time.time() - t0:.1f} s")


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory):
    """The small random Llama of tests/workers/prune_common.py (its own trained tokenizer) as HF
    (``hf_llama``) and imported (``ckpt_llama``), with ``calib.txt`` and ``valid.txt``, built once per
    session: ``(dir, checkpoint)``. Read-only for the tests (recipes refuse to write into a source); a
    module takes its own copy of the texts with ``module_dir``."""
    sys.path.insert(0, str(ROOT / "tests" / "workers"))
    from prune_common import checkpoint_with_valid_text

    return checkpoint_with_valid_text(tmp_path_factory.mktemp("small_llama"))


def module_dir(small: tuple, tmp: Path) -> tuple:
    """``(tmp, checkpoint)``: a module's own directory holding copies of the session model's texts (and a
    link to its HF directory), beside the shared checkpoint."""
    import shutil

    src, ckpt = small
    for name in ("calib.txt", "valid.txt"):
        shutil.copy(src / name, tmp / name)
    (tmp / "hf_llama").symlink_to(src / "hf_llama", target_is_directory=True)
    return tmp, ckpt


def earlier_dataset(prefix, tokenizer_dir) -> dict:
    """A real ``PREFIX.bin/.idx`` from an earlier preprocessing run (which a re-run may replace, a failed run
    must leave as it was); returns ``{file name: bytes}`` to compare with afterwards."""
    from minitron_nemo.data.indexed import HFTokenizer, write_indexed_dataset

    write_indexed_dataset(["an earlier corpus", "of two documents"], HFTokenizer(tokenizer_dir), prefix)
    return {Path(f"{prefix}{s}").name: Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx")}


# ----------------------------------------------------------------------------- markers, workers, the timings report
def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end recipe runs (the experiment, the stage chains, the real "
                                       "SmolLM2 checkpoint); `make test-fast` skips them")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one); bench/gpu_suite.sh runs "
                                       "`pytest -m gpu tests` on a lent GPU machine")
    if hasattr(config, "workerinput"):
        # one pytest-xdist worker per core: one compute thread each, inherited by the processes it starts
        # (a test that needs another count sets OMP_NUM_THREADS itself)
        os.environ["OMP_NUM_THREADS"] = "1"
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)


# The files that take longest (see runs/test_timings) start first: under pytest-xdist each file runs on one
# worker (--dist loadfile --no-loadscope-reorder keeps this order), so no worker is left alone with a long
# file at the end while the other idles.
LONG_FILES = ("test_experiment.py", "test_moe.py", "test_user_errors.py", "test_import_nemo.py",
              "test_teacher_cache.py", "test_distill_job.py", "test_slurm.py", "test_smollm2.py")


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(LONG_FILES)))  # stable: file order kept


_TIMES: dict = {}
_START: list = []


def pytest_sessionstart(session):
    import time

    _START.append(time.monotonic())


def pytest_runtest_logreport(report):
    _TIMES[report.nodeid] = _TIMES.get(report.nodeid, 0.0) + report.duration
    if report.when == "teardown":
        trace(f"{report.nodeid}: {_TIMES[report.nodeid]:.1f} s (setup + call + teardown)")


def pytest_sessionfinish(session, exitstatus):
    """``runs/test_timings/<TEST_TIMINGS_NAME or pytest>.tsv``: every test's wall time (setup + call +
    teardown, slowest first) and the per-file totals, written on every run (CI prints its head)."""
    if not _TIMES or hasattr(session.config, "workerinput"):
        return
    out = ROOT / "runs" / "test_timings"
    out.mkdir(parents=True, exist_ok=True)
    files: dict = {}
    for nodeid, t in _TIMES.items():
        files[nodeid.split("::")[0]] = files.get(nodeid.split("::")[0], 0.0) + t
    import time

    workers = getattr(session.config.option, "numprocesses", None) or 0
    lines = [f"# {len(_TIMES)} tests, {sum(_TIMES.values()):.1f} s in tests, {time.monotonic() - _START[0]:.1f} s "
             f"wall on {workers or 'no'} xdist workers (exit {int(exitstatus)})",
             "# per file"] + [f"{t:8.1f}\t{f}" for f, t in sorted(files.items(), key=lambda x: -x[1])]
    lines += ["# per test"] + [f"{t:8.1f}\t{n}" for n, t in sorted(_TIMES.items(), key=lambda x: -x[1])]
    (out / f"{os.environ.get('TEST_TIMINGS_NAME', 'pytest')}.tsv").write_text("\n".join(lines) + "\n")
