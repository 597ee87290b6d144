"""The distributed optimizer (optimizer state sharded over data-parallel ranks) on CPU, as GPU jobs run
it: at DP=2 it gives the non-distributed optimizer's losses and weights, a run stopped after a checkpoint
and resumed repeats the uninterrupted one exactly, and at TP=2 x DP=2 with sequence parallelism it gives
TP=1 x DP=2's losses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import ROOT, module_dir, run_torchrun

DISTILL = ROOT / "recipes" / "distill.py"


@pytest.fixture(scope="module")
def work(small_llama, tmp_path_factory):
    return module_dir(small_llama, tmp_path_factory.mktemp("dist_opt"))


def job(tmp, ckpt, out, *extra):
    """The distillation recipe's LM-loss training of the tiny Llama on text, 4 iterations of 4 samples (2 per
    DP rank)."""
    return ["--config-name", "smollm2_demo", f"workdir={out}", f"teacher.checkpoint={ckpt}",
            "teacher.corrected_checkpoint=null", "~model", "teacher.max_loss_fraction=10", "teacher.held_out=false",
            f"student.checkpoint={ckpt}", "student.loss=lm", "data=text", f"data.train_text={tmp / 'calib.txt'}",
            f"data.valid_text={tmp / 'valid.txt'}", "data.seq_length=32", "data.valid_samples=4",
            "data.test_tokens=64", "trainer.micro_batch_size=1", "trainer.global_batch_size=4",
            "trainer.train_iters=4", "trainer.warmup_iters=1", "trainer.eval_interval=4", "trainer.tensorboard=false",
            "trainer.optim.lr=5e-3", "checkpointing.save_interval=2", "checkpointing.keep_last=3", *extra]


def losses(out) -> dict:
    return {(r["kind"], r["iteration"]): r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def weights(ckpt, part="weights") -> dict:
    """Every tensor of a checkpoint's weights, or of another ``part`` (Megatron's torch_dist format is a
    torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(ckpt / part)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
             if hasattr(m, "size")}
    dcp.load(state, checkpoint_id=str(ckpt / part), no_dist=True)
    return state


def optimizer_state(ckpt) -> dict:
    """``{kind: {weight: tensor}}`` of a training checkpoint's optimizer (kinds: exp_avg, exp_avg_sq and, where
    the optimizer keeps them apart from the weights, fp32_param)."""
    out: dict = {}
    for key, t in weights(ckpt, "train_state/optimizer").items():
        kind, name = key.removeprefix("optimizer.state.").split(".", 1)
        out.setdefault(kind, {})[name] = t
    return out


@pytest.fixture(scope="module")
def dp2(work, tmp_path_factory):
    """DP=2 runs with the distributed optimizer and with the replicated one."""
    tmp, ckpt = work
    out = tmp_path_factory.mktemp("dp2")
    p = run_torchrun(DISTILL, 2, *job(tmp, ckpt, out / "dist"))
    assert "[train] TP 1 x PP 1 x DP 2, distributed optimizer" in p.stdout, p.stdout[-2000:]
    run_torchrun(DISTILL, 2, *job(tmp, ckpt, out / "plain", "trainer.optim.use_distributed_optimizer=false"))
    return out


def test_sharded_state_matches_the_replicated_optimizer_and_resumes_exactly(work, dp2):
    tmp, ckpt = work
    dist_run, plain = dp2 / "dist", dp2 / "plain"
    a, b = losses(dist_run), losses(plain)
    for key in (("train", 1), ("train", 2), ("train", 3), ("train", 4), ("valid", 4)):
        assert abs(a[key]["student_lm"] - b[key]["student_lm"]) <= 1e-6 * abs(b[key]["student_lm"]), (key, a[key], b[key])
    assert a[("train", 4)]["student_lm"] != a[("train", 1)]["student_lm"]  # it trained
    wa, wb = weights(dist_run / "checkpoints" / "iter_0000004"), weights(plain / "checkpoints" / "iter_0000004")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)
    # the sharded optimizer's state, gathered into model space: the replicated optimizer's, weight by weight
    oa, ob = (optimizer_state(d / "checkpoints" / "iter_0000004") for d in (dist_run, plain))
    assert set(oa) == {"exp_avg", "exp_avg_sq", "fp32_param"} and set(ob) == {"exp_avg", "exp_avg_sq"}
    for kind in ob:
        assert oa[kind].keys() == ob[kind].keys() == wa.keys()
        for k in wa:   # to 1e-5 of each tensor's largest entry (the gradients are summed in another order)
            assert (oa[kind][k] - ob[kind][k]).abs().max() <= 1e-5 * ob[kind][k].abs().max(), (kind, k)
    assert all(torch.equal(oa["fp32_param"][k], wa[k]) for k in wa)
    # stopped after iteration 2's checkpoint, resumed: iterations 3 and 4 repeat exactly
    shutil.rmtree(dist_run / "checkpoints" / "iter_0000004")
    (dist_run / "results.json").unlink()
    run_torchrun(DISTILL, 2, *job(tmp, ckpt, dist_run))
    again = losses(dist_run)
    for key in (("train", 3), ("train", 4), ("valid", 4)):
        assert again[key]["student_lm"] == a[key]["student_lm"], (key, again[key], a[key])
    assert all(torch.equal(v, weights(dist_run / "checkpoints" / "iter_0000004")[k]) for k, v in wa.items())


def test_tp2_dp2_with_sequence_parallelism_gives_tp1_dp2s_losses(work, dp2, tmp_path):
    """Four ranks: TP=2 (sequence parallel) x DP=2, the distributed optimizer sharding over the DP pairs."""
    tmp, ckpt = work
    p = run_torchrun(DISTILL, 4, *job(tmp, ckpt, tmp_path / "tp2", "parallel.tensor_model_parallel_size=2",
                                      "parallel.sequence_parallel=true", "checkpointing.save_interval=null"))
    assert "[train] TP 2 x PP 1 x DP 2, sequence parallel, distributed optimizer" in p.stdout, p.stdout[-2000:]
    a, b = losses(tmp_path / "tp2"), losses(dp2 / "plain")
    for key in (("train", 1), ("train", 2), ("train", 3), ("train", 4), ("valid", 4)):
        assert abs(a[key]["student_lm"] - b[key]["student_lm"]) <= 1e-5 * abs(b[key]["student_lm"]), (key, a[key], b[key])


def test_bf16_with_fp32_main_params_follows_fp32_and_resumes_exactly(work, dp2, tmp_path):
    """bf16 parameters, fp32 main parameters and gradients in the distributed optimizer (the GPU default):
    the trajectory of the fp32 run within bf16's precision; resumed after a checkpoint, exactly the same."""
    tmp, ckpt = work
    out = tmp_path / "bf16"
    p = run_torchrun(DISTILL, 2, *job(tmp, ckpt, out, "dtype=bfloat16"))
    assert "distributed optimizer" in p.stdout
    a, b = losses(out), losses(dp2 / "dist")
    for key in (("train", 1), ("train", 2), ("train", 3), ("train", 4), ("valid", 4)):
        assert abs(a[key]["student_lm"] - b[key]["student_lm"]) <= 2e-2 * abs(b[key]["student_lm"]), (key, a[key], b[key])
    main = optimizer_state(out / "checkpoints" / "iter_0000004")["fp32_param"]
    assert {t.dtype for t in main.values()} == {torch.float32}            # fp32 main parameters
    assert {v.dtype for v in weights(out / "checkpoints" / "iter_0000004").values()} == {torch.bfloat16}
    shutil.rmtree(out / "checkpoints" / "iter_0000004")
    (out / "results.json").unlink()
    run_torchrun(DISTILL, 2, *job(tmp, ckpt, out, "dtype=bfloat16"))
    again = losses(out)
    for key in (("train", 3), ("train", 4), ("valid", 4)):
        assert again[key]["student_lm"] == a[key]["student_lm"], (key, again[key], a[key])


def test_overlapped_gradient_reduce_and_parameter_gather_give_the_same_run(work, dp2, tmp_path):
    """overlap_grad_reduce (per-bucket reduce-scatter during backward) and overlap_param_gather (the updated
    parameters gathered by the next forward, and before a checkpoint is written)."""
    tmp, ckpt = work
    out = tmp_path / "overlap"
    p = run_torchrun(DISTILL, 2, *job(tmp, ckpt, out, "trainer.optim.overlap_grad_reduce=true",
                                      "trainer.optim.overlap_param_gather=true"))
    assert "gradient reduce overlapped, parameter gather overlapped" in p.stdout, p.stdout[-2000:]
    a, b = losses(out), losses(dp2 / "dist")
    for key in (("train", 1), ("train", 2), ("train", 3), ("train", 4), ("valid", 4)):
        assert abs(a[key]["student_lm"] - b[key]["student_lm"]) <= 1e-6 * abs(b[key]["student_lm"]), (key, a[key], b[key])
    for it in ("iter_0000002", "iter_0000004"):  # iteration 2's checkpoint is written before any forward follows
        wa, wb = weights(out / "checkpoints" / it), weights(dp2 / "dist" / "checkpoints" / it)
        assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wb), it


def test_parameter_gather_overlap_alone_is_one_line(work, tmp_path):
    from conftest import run_main
    from test_user_errors import assert_one_line

    tmp, ckpt = work
    p = run_main(str(DISTILL), *job(tmp, ckpt, tmp_path / "job", "trainer.optim.overlap_param_gather=true"))
    assert_one_line(p, 2, "trainer.optim.overlap_param_gather=true needs", "overlap_grad_reduce=true")
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("source,ranks,layout", [("dist", 1, ()), ("dist", 2, ("parallel.tensor_model_parallel_size=2",)),
                                                 ("plain", 2, ())], ids=["dist-to-dp1", "dist-to-tp2", "plain-to-dist"])
def test_a_checkpoint_resumes_at_another_layout_or_optimizer(work, dp2, tmp_path, source, ranks, layout):
    """Saved at DP=2 with the distributed optimizer (its state gathered into model space), resumed at DP=1
    (no distributed optimizer) or at TP=2; or saved by the replicated fp32 optimizer (no main parameters of
    its own) and resumed with the distributed one. The next iterations repeat the saving run's losses, which
    needs each weight's Adam moments and main parameters."""
    tmp, ckpt = work
    out = tmp_path / "run"
    shutil.copytree(dp2 / source, out)
    shutil.rmtree(out / "checkpoints" / "iter_0000004")
    (out / "results.json").unlink()
    p = run_torchrun(DISTILL, ranks, *job(tmp, ckpt, out, *layout))
    if layout or ranks != 2:
        assert "was saved at TP 1 x PP 1 x DP 2; resuming at" in p.stdout, p.stdout[-3000:]
    a, b = losses(out), losses(dp2 / source)
    for key in (("train", 3), ("train", 4), ("valid", 4)):
        assert abs(a[key]["student_lm"] - b[key]["student_lm"]) <= 1e-6 * abs(b[key]["student_lm"]), (key, a[key], b[key])
