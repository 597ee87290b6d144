"""Wrappers that run recipes as child processes (recipes/compress.py, recipes/demo.py, the experiments;
``minitron_nemo/children.py``): Ctrl-C and SIGTERM reach the child once, the wrapper waits for the child's
checkpoint and exit, then exits 128 + signal with one line on stderr and no traceback. Real processes and
real signals: a tiny child that traps them, and compress.py stopped during its distillation stage."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, module_dir
from test_compress import job as compress_job

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # what a user's terminal shows

# Records every stop signal it gets, "checkpoints" for 1 s after the first one (a second delivery of the
# same signal would land inside that window), then says why it stopped and exits 128 + signal.
CHILD = """
import os, signal, sys, time
marker = sys.argv[1]
got = []
def on(signum, _frame):
    got.append(signum)
    with open(marker, "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, on)
with open(marker + ".pid", "w") as f:
    f.write(str(os.getpid()))
print("ready", flush=True)
while not got:
    time.sleep(0.01)
time.sleep(1.0)
with open(marker, "a") as f:
    f.write("saved\\n")
print("interrupted by " + signal.Signals(got[0]).name + " at step 7; re-run resumes", file=sys.stderr, flush=True)
sys.exit(128 + got[0])
"""

# The wrapper: one child through children.run; "log" sends the child's stderr to a file instead of its own.
WRAPPER = """
import sys
from minitron_nemo import children
log = {"stderr": open(sys.argv[3], "w")} if sys.argv[2] == "log" else {}
sys.exit(children.run([sys.executable, sys.argv[1], sys.argv[4]], **log))
"""


@pytest.fixture
def start(tmp_path):
    """``start(stderr_to)``: the wrapper in a session of its own (its process group is what a terminal signals
    on Ctrl-C), once its child is ready; ``(wrapper, marker file)``. Whatever is still running at the end
    is killed."""
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    marker, procs = tmp_path / "marker", []

    def _start(stderr_to: str = "shared"):
        procs.append(subprocess.Popen([sys.executable, tmp_path / "wrapper.py", tmp_path / "child.py", stderr_to,
                                       tmp_path / "child.log", marker], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=ROOT, start_new_session=True, env=dict(ENV, PYTHONPATH=str(ROOT))))
        assert procs[-1].stdout.readline().strip() == "ready"
        return procs[-1], marker

    yield _start
    child = Path(f"{marker}.pid")
    for pid in [p.pid for p in procs] + ([int(child.read_text())] if child.is_file() else []):
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_ctrl_c_in_a_terminal_reaches_the_child_once_and_the_wrapper_waits(start):
    """Ctrl-C: SIGINT to the terminal's foreground process group (the wrapper's)."""
    proc, marker = start()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert marker.read_text().split() == ["SIGINT", "saved"]   # one SIGINT, and the child's "checkpoint"
    assert proc.returncode == 130 and err.strip().splitlines() == ["interrupted by SIGINT at step 7; re-run resumes"], err
    assert gone(int(Path(f"{marker}.pid").read_text()))


def test_sigterm_to_the_wrapper_alone_is_forwarded(start):
    """A supervisor's SIGTERM to the wrapper's pid only."""
    proc, marker = start()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert marker.read_text().split() == ["SIGTERM", "saved"]
    assert proc.returncode == 143 and err.strip().splitlines() == ["interrupted by SIGTERM at step 7; re-run resumes"], err
    assert gone(int(Path(f"{marker}.pid").read_text()))


def test_the_wrapper_says_why_when_the_child_writes_elsewhere(start, tmp_path):
    """The child's stderr goes to a log (the experiments): the wrapper prints the one line itself."""
    proc, marker = start(stderr_to="log")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert marker.read_text().split() == ["SIGTERM", "saved"]
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["interrupted by SIGTERM; re-run the same command to continue"], err
    assert "interrupted by SIGTERM at step 7" in (tmp_path / "child.log").read_text()


def test_a_killed_wrapper_stops_its_child(start):
    """kill -9 of the wrapper alone (nothing forwarded): the child gets SIGTERM from the kernel and stops
    as it would on a forwarded one, instead of running on alone."""
    proc, marker = start()
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not (marker.is_file() and "saved" in marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.is_file() and marker.read_text().split() == ["SIGTERM", "saved"]
    pid = int(Path(f"{marker}.pid").read_text())
    while not gone(pid) and "Z" not in state(pid) and time.monotonic() < deadline:  # exited (maybe unreaped)
        time.sleep(0.05)
    assert gone(pid) or "Z" in state(pid)


def state(pid: int) -> str:
    """The State line of /proc/PID/status ("" once the process is gone)."""
    try:
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except OSError:
        return ""


# ----------------------------------------------------------------------------- compress.py, for real
COMPRESS = ROOT / "recipes" / "compress.py"


@pytest.fixture(scope="module")
def work(small_llama, tmp_path_factory):
    return module_dir(small_llama, tmp_path_factory.mktemp("wrapper_signals"))


def chain_args(tmp: Path, ckpt, iters: int) -> list:
    """A one-stage chain on the session's tiny Llama: prune hidden 64 -> 48, distil ``iters`` steps."""
    return compress_job(tmp, ckpt, "stages=[{name:a,prune:{target_hidden_size:48}}]", iters=iters, eval_interval=0)


def processes_naming(text: str) -> list:
    """The live processes whose command line contains ``text``."""
    found = []
    for d in Path("/proc").iterdir():
        with_text = False
        if d.name.isdigit():
            try:
                with_text = text in (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
        if with_text:
            found.append(int(d.name))
    return found


@pytest.fixture
def compress(work):
    """``compress(iters)``: compress.py on a one-stage chain in a session of its own; afterwards nothing that
    names the chain's folder is left running."""
    tmp, ckpt = work
    env = dict(ENV, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def _compress(iters: int):
        return subprocess.Popen([sys.executable, COMPRESS, *chain_args(tmp, ckpt, iters)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True)

    yield _compress
    for pid in processes_naming(str(tmp / "chain")):
        os.kill(pid, signal.SIGKILL)


def test_sigterm_to_compress_during_distillation_checkpoints_and_a_rerun_resumes(work, compress):
    """`timeout` / a supervisor stops compress.py (SIGTERM to its process group) while the distill child
    trains: the child checkpoints and says so, compress.py exits 143, nothing is left running; the same
    command resumes from that checkpoint."""
    tmp, _ = work
    proc = compress(100000)
    for line in proc.stdout:  # the distill child trains
        if line.startswith("[train] iter"):
            break
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143 and len(lines) == 1 and "Traceback" not in err, (out[-2000:], err[-3000:])
    saved = sorted((tmp / "chain" / "stages" / "a" / "distill" / "checkpoints").glob("iter_*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").is_file(), saved
    stopped = int(saved[0].name.split("_")[1])
    assert lines[0].startswith(f"interrupted by SIGTERM at iteration {stopped} of 100000") and str(saved[0]) in lines[0]
    assert processes_naming(str(tmp / "chain")) == []
    # the same command (a shorter schedule ends the test quickly) resumes the stage from that checkpoint
    rerun = compress(stopped + 2)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and f"resumed from {saved[0]}" in out, (out[-2000:], err[-3000:])
    assert "[compress] prune.py" not in out
    assert (tmp / "chain" / "stages" / "summary.json").is_file()
