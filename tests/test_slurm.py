"""Slurm launcher: rendered scripts, bad input, and jobs on a real (throw-away) Slurm on this host.

The real-Slurm tests install Debian's slurm-wlm + munge when missing (root + apt-get; skipped with the
reason otherwise), start munged/slurmctld/slurmd in the test's temp dir and stop them at the end.
"""

import json
import os
import re
import sys
import time

import pytest

from conftest import ROOT, run_py

sys.path.insert(0, str(ROOT / "launchers"))
import submit  # noqa: E402

from slurm.cluster import SlurmCluster, ensure_installed  # noqa: E402


def submit_main(capsys, *argv):
    """Run the submitter in-process; ``(exit code, stdout, stderr)``."""
    try:
        submit.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_input(capsys):
    code, _, err = submit_main(capsys, "distil", "--dry-run")
    assert_one_line_error(code, err, "unknown stage 'distil'", "pipeline")
    code, _, err = submit_main(capsys, "distill", "--dry-run", "launcher.container.image=null")
    assert_one_line_error(code, err, "launcher.container.image is required")
    code, _, err = submit_main(capsys, "distill", "--dry-run", "launcher.nodes=3", "launcher.gpus_per_node=2",
                               "parallel.tensor_model_parallel_size=4")
    assert_one_line_error(code, err, "3 nodes x 2 GPUs = 6 ranks", "TP x PP = 4x1")
    code, _, err = submit_main(capsys, "distill", "--dry-run", "launcher.nodes=2", "launcher.gpus_per_node=8",
                               "+parallel.data_parallel_size=8", "parallel.tensor_model_parallel_size=4")
    assert_one_line_error(code, err, "16 ranks but TP x PP x DP = 4x1x8 = 32")
    code, _, err = submit_main(capsys, "distill", "--dry-run", "launcher.mode=mpi")
    assert_one_line_error(code, err, "launcher.mode='mpi'")
    code, _, err = submit_main(capsys, "distill", "--config-name", "mn_minitron_8b", "--dry-run", "launcher.nodes=32")
    assert_one_line_error(code, err, "teacher.checkpoint is required")
    # the real command line: one line, exit 2, nothing submitted
    p = run_py(ROOT / "launchers" / "submit.py", "evaluate", check=False, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: the evaluate stage needs data.test_text"), p.stderr


def test_dry_run_pipeline(capsys, tmp_path):
    code, out, err = submit_main(capsys, "pipeline", "--dry-run", "launcher.nodes=2", "launcher.partition=batch",
                                 "launcher.account=llm", f"launcher.logs={tmp_path}/logs", "data.test_text=/data/test.txt",
                                 "prune.calibration.data=/data/calib", "trainer.train_iters=10")
    assert code == 0, err
    scripts = out.split("# ---- ")[1:]
    assert [s.split("\n")[0].rsplit("-", 1)[1] for s in scripts] == [
        "correct.sbatch", "prune.sbatch", "distill.sbatch", "export.sbatch", "evaluate.sbatch"]
    distill = scripts[2]
    for want in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=batch", "#SBATCH --account=llm", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --requeue", f"#SBATCH --output={tmp_path}/logs/%x-%j.out",
                 "--container-image=nvcr.io/nvidia/nemo:", f"--container-mounts={ROOT}:{ROOT}",
                 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", "export TORCH_NCCL_AVOID_RECORD_STREAMS=1",
                 "export NCCL_NVLS_ENABLE=0", "recipes/distill.py --config-name smollm2_demo",
                 "trainer.train_iters=10", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert want in distill, want
    assert "launcher." not in distill.split("srun ", 1)[1].split("\n")[0]
    assert "#SBATCH --nodes=1" in scripts[1] and "recipes/prune.py checkpoint=" in scripts[1]
    assert "#SBATCH --ntasks-per-node=1" in scripts[3] and "checkpoint=$(final_checkpoint)" in scripts[3]
    assert "--dependency=afterok:<distill job id>" in scripts[3]
    assert "$ sbatch --parsable /" in scripts[0] and "--dependency" not in scripts[0]
    # torchrun per node, no container
    code, out, err = submit_main(capsys, "distill", "--dry-run", "launcher=slurm_bare", "launcher.mode=torchrun",
                                 "launcher.nodes=4")
    assert code == 0, err
    assert "#SBATCH --ntasks-per-node=1" in out and "--container" not in out
    assert "--rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT" in out and "--nnodes=$SLURM_NNODES" in out


# ---------------------------------------------------------------------------------------------------
# real Slurm

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = ensure_installed()
    if why:
        print(f"skipping real-Slurm tests: {why}", flush=True)
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm")
    with SlurmCluster(root, cpus=2) as c:
        os.environ["SLURM_CONF"] = str(c.conf)
        try:
            yield c
        finally:
            os.environ.pop("SLURM_CONF", None)


def submit_tiny(capsys, cluster, work, iters=30, every=5, step_seconds="0.2"):
    code, out, err = submit_main(
        capsys, "distill", "launcher=slurm_bare", "launcher.gpus_per_node=2", "launcher.request_gpus=false",
        "launcher.time=00:10:00", f"launcher.logs={work}/logs", "launcher.recipes.distill=tests/slurm/tiny_job.py",
        "launcher.job_name=tiny", f"+launcher.env.TINY_STEP_SECONDS={step_seconds}", "+launcher.env.OMP_NUM_THREADS=1",
        f"workdir={work}", f"trainer.train_iters={iters}", f"checkpointing.save_interval={every}")
    assert code == 0, (out, err, cluster.logs())
    print(out, end="")
    return re.findall(r"submitted distill: job (\d+)", out)[-1]


def job_log(work, job):
    return (work / "logs" / f"tiny-{job}.out").read_text()


def test_tiny_job_and_preemption(capsys, cluster, tmp_path):
    t0 = time.time()
    ref = tmp_path / "uninterrupted"
    job = submit_tiny(capsys, cluster, ref)
    info = cluster.wait(job)
    log = job_log(ref, job)
    print(f"uninterrupted job {job}: {info['JobState']} exit {info['ExitCode']} in {time.time() - t0:.0f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log, cluster.logs())
    result = json.loads((ref / "result.json").read_text())
    assert result == {**result, "step": 30, "world": 2}
    assert "[tiny] rank 0/2" in log
    assert "[tiny] done: final loss" in log and (ref / "checkpoints" / "step_0030.pt").is_file()
    assert (ref / "logs" / f"tiny-{job}" / "job.sbatch").is_file()

    # preempted mid-run: SIGTERM -> checkpoint -> exit 85 -> scontrol requeue -> resume -> same final loss
    t1 = time.time()
    pre = tmp_path / "preempted"
    job = submit_tiny(capsys, cluster, pre)
    deadline = time.time() + 120
    while not (pre / "checkpoints" / "step_0010.pt").is_file():
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), cluster.job(job)
        time.sleep(0.3)
    cluster.run("scancel", "--signal=TERM", job)
    info = cluster.wait(job, timeout=240, until=lambda i: i.get("JobState") == "COMPLETED" and i.get("Restarts") != "0")
    log = job_log(pre, job)
    print(f"preempted job {job}: {info['JobState']} exit {info['ExitCode']} restarts {info['Restarts']} "
          f"in {time.time() - t1:.0f}s")
    print("\n".join(l for l in log.splitlines() if "[launcher]" in l or "resumed" in l or "stopping" in l
                    or "done" in l))
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log)
    assert "ranks exited with 85" in log and "requeueing job" in log and "[tiny] resumed from" in log
    resumed = json.loads((pre / "result.json").read_text())
    assert resumed["step"] == 30 and resumed["loss"] == result["loss"], (resumed, result)
