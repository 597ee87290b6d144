"""gpt-oss (GptOssForCausalLM) on a tiny random model written by transformers (tests/hf_models.py): four biased
experts, top-2 over the top-2 router logits, the clamped GLU with a limit the weights reach, attention sinks,
q/k/v/o biases, windows of 8 on every other layer, YaRN stretching an original context of 16.

Each of those features changes transformers' logits on the test's 32-token sequences (so the parity exercises
them); our logits equal transformers' at TP=1, TP=2, PP=2 and TP=2 x EP=2; import at TP=1, at TP=2 x EP=2 and at
PP=2, then export, round-trips bitwise; pruning (hidden, heads, experts, expert width, layers) at TP=2 exports a model
whose transformers logits equal ours, with each kept head's sink and each kept expert's biases carried over;
distillation killed with -9 and run again resumes bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import (ROOT, kill_9_once_logged, run_main, run_py, run_torchrun, tiny_imported, tiny_kd_args,
                      train_records)

WORKERS = ROOT / "tests" / "workers"
DISTILL = ROOT / "recipes" / "distill.py"
SEQ = 32  # logits_worker.py's sequences: four windows, twice YaRN's original context
ETP1 = "parallel.expert_tensor_parallel_size=1"


@pytest.fixture(scope="module")
def goss(tmp_path_factory):
    return tiny_imported(tmp_path_factory, "gpt_oss")


def hf_model(hf: Path, **overrides):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, **overrides).eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_each_gpt_oss_feature_changes_transformers_logits(goss):
    d, _ = goss
    hf = d / "hf_gpt_oss"
    cfg = json.loads((hf / "config.json").read_text())
    rope = cfg["rope_parameters"]
    assert cfg["sliding_window"] * 4 == SEQ and rope["original_max_position_embeddings"] * 2 == SEQ
    tokens = torch.randint(0, 250, (2, SEQ), generator=torch.Generator().manual_seed(0))
    model = hf_model(hf)
    ref = logits(model, tokens)
    from minitron_nemo.checkpoint.hf import hf_model_config
    from minitron_nemo.models.builder import count_parameters

    assert count_parameters(hf_model_config(hf)) == sum(p.numel() for p in model.parameters())
    variants = {
        "no YaRN": dict(rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]}),
        "no window": dict(sliding_window=SEQ),
        "no clamp": dict(swiglu_limit=1e6),
    }
    for name, overrides in variants.items():
        assert (logits(hf_model(hf, **overrides), tokens) - ref).abs().max() > 1e-3, name
    no_sinks = hf_model(hf)
    for layer in no_sinks.model.layers:
        layer.self_attn.sinks.data.fill_(-1e4)
    assert (logits(no_sinks, tokens) - ref).abs().max() > 1e-3, "no sinks"


def test_logits_match_transformers_at_tp1_tp2_pp2_and_ep2(goss):
    d, ck = goss
    import yaml

    mc = yaml.safe_load((ck / "model.yaml").read_text())
    assert (mc["family"], mc["sliding_window"], mc["window_layers"], mc["attention_sinks"], mc["glu_clamp"],
            mc["yarn_factor"], mc["num_moe_experts"]) == ("gpt_oss", 8, [1, 0, 1, 0], True, 1.0, 16.0, 4)
    hf = d / "hf_gpt_oss"
    run_py(WORKERS / "logits_worker.py", ck, hf, 1, 1)
    run_torchrun(WORKERS / "logits_worker.py", 2, ck, hf, 2, 1)
    run_torchrun(WORKERS / "logits_worker.py", 2, ck, hf, 1, 2)
    run_torchrun(WORKERS / "logits_worker.py", 4, ck, hf, 2, 1, 1e-4, 2)


def _same_safetensors(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    src, got = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(src) == sorted(got)
    for k in src:
        assert torch.equal(src[k], got[k]), k


@pytest.mark.parametrize("nproc, layout", [(1, []),
                                            (4, ["parallel.tensor_model_parallel_size=2",
                                                 "parallel.expert_model_parallel_size=2", ETP1]),
                                            (2, ["parallel.pipeline_model_parallel_size=2"])],
                         ids=["tp1", "tp2ep2", "pp2"])
def test_import_then_export_round_trips_bitwise(goss, tmp_path, nproc, layout):
    d, _ = goss
    src, ck, out = d / "hf_gpt_oss", tmp_path / "ck", tmp_path / "hf"
    run_torchrun(ROOT / "recipes" / "import_hf.py", nproc, f"source={src}", f"output={ck}", *layout)
    p = run_main(ROOT / "recipes" / "export_hf.py", f"checkpoint={ck}", f"output={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    _same_safetensors(src, out)
    a, b = (json.loads((x / "config.json").read_text()) for x in (src, out))
    for k in ("architectures", "layer_types", "sliding_window", "rope_parameters", "swiglu_limit", "swiglu_alpha",
              "num_local_experts", "num_experts_per_tok", "intermediate_size", "head_dim", "attention_bias"):
        assert a[k] == b[k], k


def test_biased_experts_need_expert_tensor_parallelism_1(goss, tmp_path):
    from test_user_errors import assert_one_line

    d, _ = goss
    p = run_main(ROOT / "recipes" / "import_hf.py", f"source={d / 'hf_gpt_oss'}", f"output={tmp_path / 'out'}",
                 "parallel.expert_tensor_parallel_size=2")
    assert_one_line(p, 2, "parallel.expert_tensor_parallel_size=2: model.family='gpt_oss' has biased experts")
    assert not (tmp_path / "out").exists()


def test_pruning_at_tp2_exports_what_we_compute_with_sinks_and_biases_of_the_kept_units(goss, tmp_path):
    """Hidden 64 -> 48, heads 4 -> 2, experts 4 -> 2 of width 32 -> 16, layers 4 -> 2 through the recipe at TP=2."""
    from safetensors.torch import load_file

    d, ck = goss
    out, hf = tmp_path / "pruned", tmp_path / "pruned_hf"
    run_torchrun(ROOT / "recipes" / "prune.py", 2, f"checkpoint={ck}", f"output={out}",
                 f"prune.calibration.data={d / 'calib.txt'}", "prune.grid=16", "prune.calibration.num_samples=16",
                 "prune.calibration.seq_length=32", "prune.calibration.micro_batch_size=4",
                 "prune.calibration.loss_samples=8", "prune.target_hidden_size=48", "prune.target_num_attention_heads=2",
                 "prune.target_num_moe_experts=2", "prune.target_moe_ffn_hidden_size=16", "prune.target_num_layers=2",
                 "parallel.tensor_model_parallel_size=2", ETP1)
    p = run_main(ROOT / "recipes" / "export_hf.py", f"checkpoint={out}", f"output={hf}")
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.loads((hf / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_local_experts"],
            cfg["intermediate_size"]) == (2, 48, 2, 2, 16)
    run_py(WORKERS / "logits_worker.py", out, hf, 1, 1)
    # every kept unit carries its own sink / biases: each pruned layer's values are found, in order, in one
    # source layer (the random values are distinct)
    src, got = load_file(str(d / "hf_gpt_oss" / "model.safetensors")), load_file(str(hf / "model.safetensors"))
    for j in range(2):
        for name in ("self_attn.sinks", "mlp.router.bias"):
            new = got[f"model.layers.{j}.{name}"]
            assert any(_ordered_subset(new, src[f"model.layers.{i}.{name}"]) for i in range(4)), name
        bias = got[f"model.layers.{j}.mlp.experts.gate_up_proj_bias"]  # [2, 32]: each kept expert's own neurons
        assert all(any(_ordered_subset(b, src[f"model.layers.{i}.mlp.experts.gate_up_proj_bias"][e])
                       for i in range(4) for e in range(4)) for b in bias)


def _ordered_subset(part: torch.Tensor, whole: torch.Tensor) -> bool:
    idx = [int((whole == v).nonzero()[0]) if (whole == v).any() else -1 for v in part.tolist()]
    return -1 not in idx and idx == sorted(idx)


def test_distillation_killed_and_rerun_resumes_bitwise(goss, tmp_path):
    d, ck = goss
    text = d / "calib.txt"
    iters, save_every = 6, 2
    moe = ["prune.target_ffn_hidden_size=null", "prune.target_num_moe_experts=2", "prune.target_moe_ffn_hidden_size=16"]
    ref, work = tmp_path / "ref", tmp_path / "killed"
    run_py(DISTILL, *tiny_kd_args(ref, ck, text, text, iters=iters, save_every=save_every), *moe)
    args = tiny_kd_args(work, ck, text, text, iters=iters, save_every=save_every) + moe
    kill_9_once_logged(DISTILL, args, f"[train] iter {save_every + 1}/{iters} ", tmp_path / "killed.log")
    p = run_py(DISTILL, *args)
    assert "[train] resumed from" in p.stdout, p.stdout[-3000:]
    assert train_records(work) == train_records(ref)
    assert sorted(train_records(ref)) == list(range(1, iters + 1))
