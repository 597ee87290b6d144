"""The project on a GPU (marker ``gpu``; bench/gpu_suite.sh runs ``pytest -m gpu tests`` on a lent machine):
logits of an imported HF Llama against transformers in fp32 and bf16, pruning keeping the units the CPU keeps,
distillation in bf16 through recipes/distill.py, kill -9 and resume, Transformer Engine's layer spec.

Each test takes a ``device``: ``cuda`` (marked ``gpu``, skipped without a CUDA device) or ``cpu``, the same test
body in CPU mode (``MINITRON_FORCE_CPU=1``) on tiny models, which the CPU suite runs, so the GPU tests' code is
checked where no GPU is. One GPU means DP=1: the distributed optimizer at DP > 1 is covered by the CPU tests
(tests/test_dist_optimizer.py), since two NCCL ranks cannot share one GPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT, kill_9_once_logged, module_dir, run_py, tiny_kd_args
from hf_models import make_hf_model

WORKERS = ROOT / "tests" / "workers"
DISTILL, PRUNE = ROOT / "recipes" / "distill.py", ROOT / "recipes" / "prune.py"
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="no CUDA device")])
ITERS, SAVE_EVERY = 16, 4


@pytest.fixture(params=[CUDA, "cpu"])
def device(request):
    return request.param


def device_env(device: str) -> dict:
    """The environment that puts a recipe or worker on ``device``."""
    return {"MINITRON_FORCE_CPU": "1" if device == "cpu" else "0"}


@pytest.fixture(scope="module")
def work(small_llama, tmp_path_factory):
    """The session's small random Llama (its own tokenizer, no download) and a copy of its texts."""
    return module_dir(small_llama, tmp_path_factory.mktemp("gpu"))


def checkpoint_tensors(ckpt: Path) -> dict:
    """Every tensor of a checkpoint's weights (a torch.distributed.checkpoint directory)."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(ckpt / "weights")).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
             if hasattr(m, "size")}
    dcp.load(state, checkpoint_id=str(ckpt / "weights"), no_dist=True)
    return state


# ----------------------------------------------------------------------------- logits against transformers
def test_logits_match_transformers_in_fp32_and_bf16(device, tmp_path):
    """fp32: within 1e-4 of the largest logit (kernels on the GPU sum in another order than transformers').
    bf16: our error against transformers' fp32 logits at most twice transformers' own bf16 error plus 1% of
    the largest logit, and the two bf16 forwards within 5% of it."""
    hf = make_hf_model("llama", tmp_path / "hf")
    out = json.loads(run_py(WORKERS / "device_logits_worker.py", hf, env=device_env(device)).stdout.splitlines()[-1])
    assert (out["device"] == "cpu") == (device == "cpu"), out
    fp32, bf16 = out["float32"], out["bfloat16"]
    assert fp32["diff"] <= 1e-4 * max(fp32["scale"], 1.0), out
    assert bf16["ours_err"] <= 2 * bf16["hf_err"] + 1e-2 * bf16["scale"], out
    assert bf16["diff"] <= 5e-2 * bf16["scale"], out


# ----------------------------------------------------------------------------- pruning
PRUNE_ARGS = ["prune.grid=16", "prune.calibration.num_samples=16", "prune.calibration.seq_length=32",
              "prune.calibration.micro_batch_size=4", "prune.target_hidden_size=48", "prune.target_ffn_hidden_size=64",
              "prune.target_num_attention_heads=2"]


@pytest.fixture(scope="module")
def pruned(work):
    """``pruned(device)``: recipes/prune.py on the session model's calibration text (run once per device)."""
    tmp, ckpt = work
    runs = {}

    def run(device):
        if device not in runs:
            out = tmp / f"pruned_{device}"
            run_py(PRUNE, f"checkpoint={ckpt}", f"output={out}", f"prune.calibration.data={tmp / 'calib.txt'}",
                   *PRUNE_ARGS, env=device_env(device))
            runs[device] = out
        return runs[device]

    return run


@pytest.mark.parametrize("device", [CUDA])  # no CPU variant: it would compare the CPU with itself
def test_pruning_keeps_the_units_the_cpu_keeps(device, pruned):
    """Channels, neurons and heads ranked on the device keep the CPU's units: the pruned checkpoints are equal
    tensor for tensor (trimming copies the kept rows and columns), the importance scores within 1e-3."""
    from safetensors.torch import load_file

    on_device, on_cpu = pruned(device), pruned("cpu")
    a, b = checkpoint_tensors(on_device), checkpoint_tensors(on_cpu)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (load_file(str(d / "prune" / "importance.safetensors")) for d in (on_device, on_cpu))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k].double(), sb[k].double(), rtol=1e-3, atol=1e-6), k


# ----------------------------------------------------------------------------- distillation in bf16
def distill_args(tmp: Path, ckpt: Path, out: Path) -> list:
    """A KD job in bf16: the session model pruned in-job to hidden 48 / FFN 64, a checkpoint every 4 steps."""
    return tiny_kd_args(out, ckpt, tmp / "calib.txt", tmp / "valid.txt", iters=ITERS, save_every=SAVE_EVERY,
                        dtype="bfloat16", global_batch=4)


def records(work: Path) -> list:
    """The training records of ``metrics.jsonl`` in the order written (a resumed run appends its own)."""
    lines = (work / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(str.strip, lines)) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def distilled(work):
    """``distilled(device)``: the uninterrupted bf16 KD job on ``device`` (run once per device)."""
    tmp, ckpt = work
    runs = {}

    def run(device):
        if device not in runs:
            out = tmp / f"distill_{device}"
            p = run_py(DISTILL, *distill_args(tmp, ckpt, out), env=device_env(device))
            runs[device] = out, p.stdout
        return runs[device]

    return run


def test_distillation_in_bf16(device, distilled):
    out, stdout = distilled(device)
    assert "[train] TP 1 x PP 1 x DP 1" in stdout, stdout[-2000:]
    recs = records(out)
    assert [r["iteration"] for r in recs] == list(range(1, ITERS + 1))
    assert all(math.isfinite(r[k]) for r in recs for k in ("total", "logits", "grad_norm")), recs
    first, last = recs[0]["logits"], sum(r["logits"] for r in recs[-4:]) / 4
    assert last < first, (first, last)  # the student learns the teacher's distribution
    final = checkpoint_tensors(out / "checkpoints" / f"iter_{ITERS:07d}")
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert (out / "results.json").is_file()


# ----------------------------------------------------------------------------- kill -9, then the same command
def kill_after_a_checkpoint(args: list, env: dict, log: Path) -> None:
    """Start the job; SIGKILL it once it has logged the step after its first checkpoint."""
    kill_9_once_logged(DISTILL, args, f"[train] iter {SAVE_EVERY + 1}/{ITERS} ", log, env)


def test_kill_9_then_resume_gives_the_same_losses(device, work, distilled, tmp_path):
    """The step recomputed after the checkpoint repeats the killed run's loss bitwise (same weights, optimizer
    state, data position). Against the uninterrupted run every loss is equal bitwise on the CPU; on the GPU
    within 1e-2 relative (bf16), since flash attention's backward may add in another order from run to run."""
    tmp, ckpt = work
    ref_dir, _ = distilled(device)
    out = tmp_path / "w"
    args, env = distill_args(tmp, ckpt, out), device_env(device)
    kill_after_a_checkpoint(args, env, tmp_path / "killed.log")
    assert not (out / "results.json").exists()
    killed = {r["iteration"]: r for r in records(out)}
    p = run_py(DISTILL, *args, env=env)
    assert "[train] resumed from" in p.stdout, p.stdout[-3000:]
    resumed = records(out)[len(killed):]
    first = resumed[0]["iteration"]
    assert first - 1 in killed and first in killed, (first, sorted(killed))  # it resumed from a checkpoint it saved
    assert [r["iteration"] for r in resumed] == list(range(first, ITERS + 1))
    for k in ("total", "logits", "lr"):
        assert resumed[0][k] == killed[first][k], (k, resumed[0], killed[first])
    reference = {r["iteration"]: r for r in records(ref_dir)}
    for r in resumed:
        for k in ("total", "logits"):
            if device == "cpu":
                assert r[k] == reference[r["iteration"]][k], (k, r, reference[r["iteration"]])
            else:
                assert math.isclose(r[k], reference[r["iteration"]][k], rel_tol=1e-2), (k, r, reference[r["iteration"]])


# ----------------------------------------------------------------------------- Transformer Engine
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="transformer_engine is not installed")
def test_transformer_engine_spec_matches_transformers(tmp_path):
    """The TE layer spec (fused norm + linear, TE attention) on the same weights: fp32 within 1e-3 of the largest
    logit (TE may take TF32 GEMMs), bf16 as close to transformers' fp32 logits as the local spec must be."""
    hf = make_hf_model("llama", tmp_path / "hf")
    out = json.loads(run_py(WORKERS / "device_logits_worker.py", hf, "te", env=device_env("cuda")).stdout.splitlines()[-1])
    assert out["te"] and out["device"] != "cpu", out
    fp32, bf16 = out["float32"], out["bfloat16"]
    assert fp32["diff"] <= 1e-3 * max(fp32["scale"], 1.0), out
    assert bf16["ours_err"] <= 2 * bf16["hf_err"] + 1e-2 * bf16["scale"], out
