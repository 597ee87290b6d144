"""Slurm launcher: rendered scripts, bad input, and jobs on a real (throw-away) Slurm on this host.

The real-Slurm tests install Debian's slurm-wlm + munge when missing (root + apt-get; skipped with the
reason otherwise), start munged/slurmctld/slurmd in the test's temp dir and stop them at the end, and
submit the real distillation job (recipes/distill.py rendered by launchers/submit.py, no container,
2 gloo tasks on CPU) with a tiny random teacher: once uninterrupted, once preempted and requeued.
"""

import contextlib
import io
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
    assert "#SBATCH --ntasks-per-node=1" in scripts[3] and "checkpoint=$(final_checkpoint runs/smollm2_demo/results.json)" in scripts[3]
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


TRAIN_ITERS, SAVE_EVERY, TEST_TOKENS = 40, 10, 1024


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A random 4-layer Llama (tests/hf_models) with SmolLM2's tokenizer, and small slices of the cached
    Shakespeare splits as train / valid / test text."""
    import torch
    from hf_models import make_hf_model
    from safetensors.torch import load_file, save_file

    from minitron_nemo.checkpoint.store import copy_tokenizer
    from minitron_nemo.data import assets

    d = tmp_path_factory.mktemp("teacher")
    teacher = make_hf_model("llama", d / "hf")
    hf = assets.smollm2_hf_dir()
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    cfg = json.loads((teacher / "config.json").read_text())
    sd = load_file(str(teacher / "model.safetensors"))
    g = torch.Generator().manual_seed(0)  # the tokenizer's vocabulary: a random embedding of that size (tied)
    sd["model.embed_tokens.weight"] = torch.randn(vocab, cfg["hidden_size"], generator=g) * cfg["initializer_range"]
    save_file(sd, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    (teacher / "config.json").write_text(json.dumps({**cfg, "vocab_size": vocab}))
    copy_tokenizer(hf, teacher)
    text = {}
    for split, chars in (("train", 200_000), ("valid", 30_000), ("test", 30_000)):
        text[split] = d / f"{split}.txt"
        text[split].write_text(assets.shakespeare_splits()[split].read_text()[:chars])
    return teacher, text


def submit_distill(cluster, teacher, work, *launcher):
    """The real distillation job (recipes/distill.py, rendered by submit.py) on 2 gloo ranks: the tiny
    teacher, pruned in-job to half its width, distilled for TRAIN_ITERS steps. Returns the job id."""
    hf, text = teacher
    argv = ["distill", "launcher=slurm_bare", "launcher.gpus_per_node=2", "launcher.request_gpus=false",
            "launcher.time=00:10:00", f"launcher.logs={work}/logs", "launcher.job_name=distill",
            "+launcher.env.OMP_NUM_THREADS=1", *launcher,
            f"workdir={work}", f"teacher.checkpoint={hf}", "teacher.corrected_checkpoint=null", "~model",
            "teacher.max_loss_fraction=10",  # a random teacher scores about ln(vocab): not a trained one
            "data=text", f"data.train_text={text['train']}", f"data.valid_text={text['valid']}",
            f"data.test_text={text['test']}", "data.seq_length=32", "data.valid_samples=4",
            f"data.test_tokens={TEST_TOKENS}", "prune.target_hidden_size=32", "prune.target_ffn_hidden_size=48",
            "prune.grid=16", "prune.calibration.num_samples=8", "prune.calibration.seq_length=32",
            "prune.calibration.micro_batch_size=2", "prune.calibration.loss_samples=4", "trainer.micro_batch_size=1",
            "trainer.global_batch_size=2", f"trainer.train_iters={TRAIN_ITERS}", "trainer.warmup_iters=2",
            "trainer.eval_interval=20", "trainer.tensorboard=false", f"checkpointing.save_interval={SAVE_EVERY}"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            submit.main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    assert code == 0, (out.getvalue(), err.getvalue(), cluster.logs())
    print(out.getvalue(), end="")
    return re.findall(r"submitted distill: job (\d+)", out.getvalue())[-1]


def job_log(work, job):
    return (work / "logs" / f"distill-{job}.out").read_text()


def assert_no_leftovers(cluster, job, grace: float = 15):
    """No process of the job outlives it (the step's processes are killed with it)."""
    deadline = time.time() + grace
    while (left := cluster.leftovers(job)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, left


def train_losses(work) -> dict:
    """``{iteration: train losses}`` from WORKDIR/metrics.jsonl (one record per iteration, resumed runs included)."""
    recs = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in recs if r["kind"] == "train"]
    by_it = {r["iteration"]: {k: r[k] for k in ("total", "logits", "lm")} for r in train}
    assert len(by_it) == len(train), "an iteration was logged twice"
    return by_it


def check_completed(cluster, job, work, info, t0, what):
    """COMPLETED 0:0, the final checkpoint (COMPLETE marker as the trainer writes it), results.json, the
    log and the script copy, no leftover process; returns ``(log, results, losses)``."""
    log = job_log(work, job)
    print(f"{what} job {job}: {info['JobState']} exit {info['ExitCode']} restarts {info['Restarts']} on "
          f"{info['NodeList']} in {time.time() - t0:.0f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-6000:], cluster.logs())
    assert "ranks exited with 0" in log and f"[train] iter {TRAIN_ITERS}/{TRAIN_ITERS}" in log, log[-6000:]
    assert "DP 2)" in log, log[-6000:]  # 2 Slurm tasks = 2 data-parallel gloo ranks
    final = work / "checkpoints" / f"iter_{TRAIN_ITERS:07d}"
    assert (final / "COMPLETE").read_text() == str(TRAIN_ITERS)
    results = json.loads((work / "results.json").read_text())
    assert results["final_checkpoint"] == str(final) and results["tokens"] == TEST_TOKENS, results
    assert (work / "logs" / f"distill-{job}" / "job.sbatch").is_file()
    assert_no_leftovers(cluster, job)
    losses = train_losses(work)
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    return log, results, losses


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_teacher, tmp_path_factory):
    """The distillation job run once without interruption: ``(log, results.json, train losses)``."""
    t0, work = time.time(), tmp_path_factory.mktemp("uninterrupted")
    job = submit_distill(cluster, tiny_teacher, work)
    return check_completed(cluster, job, work, cluster.wait(job), t0, "uninterrupted")


@pytest.mark.e2e
def test_distill_job(uninterrupted):
    log, _, _ = uninterrupted
    assert "restart 0" in log and "pruning the teacher in-job" in log and "requeue" not in log, log[-6000:]


@pytest.mark.e2e
def test_preemption_requeue_resume(cluster, tiny_teacher, uninterrupted, tmp_path):
    """The time-limit signal, as Slurm sends it (--signal=B:USR1): the batch shell forwards it to the ranks,
    which checkpoint and exit 85; the script requeues the job; it resumes and ends with the same losses."""
    _, ref_results, ref_losses = uninterrupted
    t0, work = time.time(), tmp_path / "preempted"
    job = submit_distill(cluster, tiny_teacher, work)
    first = work / "checkpoints" / f"iter_{SAVE_EVERY:07d}" / "COMPLETE"
    deadline = time.time() + 180
    while not first.is_file():
        state = cluster.job(job).get("JobState")
        assert time.time() < deadline and state in ("PENDING", "RUNNING"), (state, cluster.logs())
        time.sleep(0.2)
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    info = cluster.wait(job, timeout=240, until=lambda i: i.get("JobState") == "COMPLETED" and i.get("Restarts") != "0")
    log, results, losses = check_completed(cluster, job, work, info, t0, "preempted")
    print("\n".join(l for l in log.splitlines() if l.startswith(("[launcher]", "[signals]", "[train] resumed"))))
    assert info["Restarts"] == "1", info
    assert "SIGUSR1 received" in log and "ranks exited with 85" in log and "requeueing job" in log, log[-6000:]
    resumed = re.findall(r"\[train\] resumed from \S+/iter_(\d+)", log)
    assert len(resumed) == 1 and SAVE_EVERY <= int(resumed[0]) < TRAIN_ITERS, (resumed, log[-6000:])
    before, after = log.split("restart 1", 1)
    assert "pruning the teacher in-job" in before and "pruning" not in after  # the saved student is reused
    print(f"final training loss: uninterrupted {ref_losses[TRAIN_ITERS]['total']!r}, "
          f"preempted at iteration {int(resumed[0])} and resumed {losses[TRAIN_ITERS]['total']!r}")
    assert losses == ref_losses
    assert results["student_distilled"] == ref_results["student_distilled"], (results, ref_results)


# ---------------------------------------------------------------------------------------------------
# two hosts: two slurmd in network namespaces of their own on a private bridge

@pytest.mark.e2e
def test_two_hosts(tiny_teacher, uninterrupted, tmp_path, monkeypatch):
    """The same job on 2 nodes x 1 task: the gloo rendezvous and all-reduces cross the hosts' veth
    interfaces (each namespace has its own loopback); the losses match the single-host run's."""
    from slurm.netns import IFNAME, Hosts, why_not

    why = why_not()
    if why:
        print(f"skipping the two-host test: {why}", flush=True)
        pytest.skip(why)
    _, ref_results, ref_losses = uninterrupted
    with Hosts(["mnode1", "mnode2"]) as hosts, \
            SlurmCluster(tmp_path / "slurm", cpus=2, nodes=hosts.nodes, ctl_addr=hosts.ctl_addr) as cluster:
        monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
        rx0 = {n: hosts.rx_bytes(n) for n in hosts.names}
        t0, work = time.time(), tmp_path / "two_hosts"
        job = submit_distill(cluster, tiny_teacher, work, "launcher.nodes=2", "launcher.gpus_per_node=1",
                             f"+launcher.env.GLOO_SOCKET_IFNAME={IFNAME}")
        info = cluster.wait(job)
        rx = {n: hosts.rx_bytes(n) - rx0[n] for n in hosts.names}
        log, results, losses = check_completed(cluster, job, work, info, t0, "two-host")
    assert info["NumNodes"] == "2" and info["NodeList"] == "mnode[1-2]", info
    assert "on mnode[1-2], master mnode1:" in log, log[-6000:]
    # every step all-reduces the student's gradients between the hosts: each receives at least half of them
    params = int(re.search(r"\[distill\] student \S+: ([\d,]+) params", log).group(1).replace(",", ""))
    print(f"bytes received over {IFNAME}: {rx}; student {params:,} params x {TRAIN_ITERS} steps")
    assert all(b >= TRAIN_ITERS * params * 4 // 2 for b in rx.values()), (rx, params)
    assert losses == ref_losses
    assert results["student_distilled"] == ref_results["student_distilled"], (results, ref_results)
