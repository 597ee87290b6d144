"""Several ranks, one report: a layout the model cannot take is refused before any process group starts,
by rank 0 alone (the other ranks exit quietly), under torchrun and under the project's launcher
(``python -m minitron_nemo.launch``), which adds nothing to the rank's one line and leaves no rank behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_user_errors import ENV, assert_one_line

LAUNCH = [sys.executable, "-m", "minitron_nemo.launch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def ranks(launcher: list, n: int, *args, timeout=300):
    e = dict(ENV, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, f"--nproc_per_node={n}", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=e, timeout=timeout)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from hf_models import make_hf_model

    d = tmp_path_factory.mktemp("launch")
    return {f: make_hf_model(f, d / f) for f in ("llama", "qwen3_moe")}


LAYOUTS = {  # name: (family, ranks, overrides, what the line names)
    "tp=3 on 4 heads": ("llama", 3, ["parallel.tensor_model_parallel_size=3"],
                        "tensor_model_parallel_size=3 does not divide num_attention_heads=4"),
    "ep=3 on 4 experts": ("qwen3_moe", 3, ["parallel.expert_model_parallel_size=3"],
                          "expert_model_parallel_size=3 does not divide num_moe_experts=4"),
    "3 ranks for tp=2": ("llama", 3, ["parallel.tensor_model_parallel_size=2"],
                         "world size 3 is not divisible by tensor x pipeline parallel 2x1"),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_refusal_is_one_line_from_rank_0(tmp_path, hf, name):
    family, n, overrides, needle = LAYOUTS[name]
    out = tmp_path / "ckpt"
    p = ranks(LAUNCH, n, ROOT / "recipes" / "import_hf.py", f"source={hf[family]}", f"output={out}", *overrides)
    assert_one_line(p, 2, needle)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_under_torchrun_the_line_is_printed_once(tmp_path, hf):
    """torchrun adds its own failure report (README: "Several ranks"); the project's line appears once."""
    p = ranks(TORCHRUN, 3, ROOT / "recipes" / "import_hf.py", f"source={hf['llama']}", f"output={tmp_path / 'c'}",
              "parallel.tensor_model_parallel_size=3")
    ours = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and ours == ["error: tensor_model_parallel_size=3 does not divide "
                                          "num_attention_heads=4; allowed: a divisor of 4"], p.stderr[-3000:]


RANK_SCRIPT = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
# one write of the whole line: the ranks share the launcher's stdout
os.write(1, f"rank {rank} of {os.environ['WORLD_SIZE']} store {os.environ['MINITRON_STORE_FILE']} pid {os.getpid()}\\n".encode())
here, world = os.path.dirname(os.path.abspath(__file__)), int(os.environ["WORLD_SIZE"])
open(os.path.join(here, f"ready{rank}"), "w").close()
mode = sys.argv[1]
if mode == "ok":
    sys.exit(0)
if mode == "oom" and rank == 1:  # once every rank has printed its pid
    while not all(os.path.exists(os.path.join(here, f"ready{r}")) for r in range(world)):
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
time.sleep(120)
"""


def _pids(stdout: str) -> list:
    return [int(line.split()[-1]) for line in stdout.splitlines() if line.startswith("rank ")]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_ranks_get_the_torchrun_environment(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    p = ranks(LAUNCH, 3, script, "ok")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    lines = sorted(p.stdout.splitlines())
    assert [line.split()[:4] for line in lines] == [["rank", str(r), "of", "3"] for r in range(3)]
    assert len({line.split()[5] for line in lines}) == 1  # one rendezvous: the file rank 0 writes its port to


JOB_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from minitron_nemo import runtime
runtime.init_distributed(1, 1)
x = torch.tensor([float(sys.argv[1])])
dist.all_reduce(x)
# one write of the whole line: the ranks share the launcher's stdout
os.write(1, f"job {sys.argv[1]} rank {dist.get_rank()} sum {x.item():g}\\n".encode())
runtime.shutdown()
"""


def test_jobs_started_at_once_keep_to_their_own_ranks(tmp_path):
    """Four two-rank jobs at once: each rank 0 binds its store's port itself, so no job's rank can reach
    another job's store (a port chosen by the launcher and bound later by rank 0 could be taken meanwhile)."""
    script = tmp_path / "job.py"
    script.write_text(JOB_SCRIPT)
    e = dict(ENV, PYTHONPATH=str(ROOT), MINITRON_FORCE_CPU="1")
    procs = [subprocess.Popen([*LAUNCH, "--nproc_per_node=2", str(script), str(j)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=e) for j in range(1, 5)]
    for j, proc in enumerate(procs, 1):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert sorted(out.split("\n")[:-1]) == [f"job {j} rank {r} sum {2 * j}" for r in range(2)], out


def test_a_killed_rank_is_named_and_the_others_stopped(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    p = ranks(LAUNCH, 3, script, "oom")
    assert_one_line(p, 128 + signal.SIGKILL, "rank 1", "SIGKILL")
    pids = _pids(p.stdout)
    assert len(pids) == 3 and all(_gone(pid) for pid in pids)


def test_sigterm_reaches_every_rank_once(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    e = dict(ENV, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([*LAUNCH, "--nproc_per_node=2", str(script), "wait"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=e)
    started = [proc.stdout.readline(), proc.stdout.readline()]
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err == "", err
    assert time.time() - t0 < 20  # the ranks stopped on the forwarded signal, not after the grace period
    assert all(_gone(pid) for pid in _pids("".join(started)))


@pytest.mark.parametrize("args, needle", [([], "no --nproc_per_node given"),
                                          (["--nproc_per_node=0", "x.py"], "--nproc_per_node='0'"),
                                          (["--nnodes=2", "x.py"], "unknown option --nnodes=2"),
                                          (["--nproc_per_node=2", "missing.py"], "script missing.py is not a file")])
def test_bad_launcher_arguments(args, needle):
    e = dict(ENV, PYTHONPATH=str(ROOT))
    p = subprocess.run([*LAUNCH, *args], capture_output=True, text=True, cwd=ROOT, env=e, timeout=60)
    assert_one_line(p, 2, needle)
