"""Gemma 3 text models (Gemma3ForCausalLM) on a tiny random model written by transformers (tests/hf_models.py):
windows of 8 on three of four layers, their own RoPE base, linear RoPE scaling on the global layer, a query scalar
other than head_dim, four (1 + w) RMSNorms per layer, QK-norm, scaled embeddings, GeGLU.

Our logits equal transformers' on sequences four times the window at TP=1, TP=2 and PP=2; each of those
features changes transformers' logits on the same tokens (so the parity exercises them); import and export
round-trip bitwise; width and depth pruning at TP=2 exports a model whose transformers logits equal ours;
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
SEQ = 32  # logits_worker.py's sequences; the tiny model's window is 8
ITERS, SAVE_EVERY = 8, 2


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return tiny_imported(tmp_path_factory, "gemma3")


def hf_logits(hf: Path, tokens: torch.Tensor, **overrides) -> torch.Tensor:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, **overrides).eval()
    with torch.no_grad():
        return model(tokens).logits


def test_each_gemma3_feature_changes_transformers_logits(gemma):
    d, _ = gemma
    hf = d / "hf_gemma3"
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["sliding_window"] * 4 == SEQ and cfg["query_pre_attn_scalar"] != cfg["head_dim"]
    tokens = torch.randint(0, 250, (2, SEQ), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(hf, tokens)
    rope = cfg["rope_parameters"]
    variants = {
        "no window": dict(sliding_window=SEQ),
        "global RoPE base on the windowed layers": dict(rope_parameters={
            **rope, "sliding_attention": {**rope["sliding_attention"], "rope_theta": rope["full_attention"]["rope_theta"]}}),
        "no linear scaling": dict(rope_parameters={**rope, "full_attention": {
            "rope_type": "default", "rope_theta": rope["full_attention"]["rope_theta"]}}),
        "query scalar = head_dim": dict(query_pre_attn_scalar=cfg["head_dim"]),
    }
    for name, overrides in variants.items():
        assert (hf_logits(hf, tokens, **overrides) - ref).abs().max() > 1e-3, name


def test_logits_match_transformers_at_tp1_tp2_and_pp2(gemma):
    d, ck = gemma
    import yaml

    mc = yaml.safe_load((ck / "model.yaml").read_text())
    assert (mc["family"], mc["sliding_window"], mc["window_layers"], mc["local_rotary_base"],
            mc["rotary_interpolation_factor"], mc["post_norms"]) == ("gemma3", 8, [1, 0, 1, 1], 1e4, 8.0, True)
    run_py(WORKERS / "logits_worker.py", ck, d / "hf_gemma3", 1, 1)
    run_torchrun(WORKERS / "logits_worker.py", 2, ck, d / "hf_gemma3", 2, 1)
    run_torchrun(WORKERS / "logits_worker.py", 2, ck, d / "hf_gemma3", 1, 2)


def test_export_round_trip_is_bitwise(gemma, tmp_path):
    from safetensors.torch import load_file

    d, ck = gemma
    out = tmp_path / "hf"
    p = run_main(ROOT / "recipes" / "export_hf.py", f"checkpoint={ck}", f"output={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    src, got = load_file(str(d / "hf_gemma3" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(src) == sorted(got) and all(torch.equal(src[k], got[k]) for k in src)
    a, b = (json.loads((x / "config.json").read_text()) for x in (d / "hf_gemma3", out))
    for k in ("architectures", "layer_types", "sliding_window", "rope_parameters", "query_pre_attn_scalar",
              "head_dim", "tie_word_embeddings", "hidden_activation", "rms_norm_eps"):
        assert a[k] == b[k], k


def test_width_and_depth_pruning_at_tp2_exports_what_we_compute(gemma, tmp_path):
    """Hidden 64 -> 48, FFN 96 -> 64, heads 4 -> 2, layers 4 -> 2 through the recipe at TP=2 (the scores of all
    four norms, the slicing and the masking equivalence are checked in tests/workers/prune_mask_worker.py)."""
    d, ck = gemma
    out = tmp_path / "pruned"
    run_torchrun(ROOT / "recipes" / "prune.py", 2, f"checkpoint={ck}", f"output={out}",
                 f"prune.calibration.data={d / 'calib.txt'}", "prune.grid=16", "prune.calibration.num_samples=16",
                 "prune.calibration.seq_length=32", "prune.calibration.micro_batch_size=4",
                 "prune.calibration.loss_samples=8", "prune.target_hidden_size=48", "prune.target_ffn_hidden_size=64",
                 "prune.target_num_attention_heads=2", "prune.target_num_layers=2",
                 "parallel.tensor_model_parallel_size=2")
    import yaml

    mc = yaml.safe_load((out / "model.yaml").read_text())
    assert (mc["num_layers"], mc["hidden_size"], mc["ffn_hidden_size"], mc["num_attention_heads"]) == (2, 48, 64, 2)
    hf = tmp_path / "pruned_hf"
    p = run_main(ROOT / "recipes" / "export_hf.py", f"checkpoint={out}", f"output={hf}")
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["hidden_size"] == 48 and len(cfg["layer_types"]) == 2
    run_py(WORKERS / "logits_worker.py", out, hf, 1, 1)


# ----------------------------------------------------------------------------- distillation, kill -9, resume
def test_distillation_killed_and_rerun_resumes_bitwise(gemma, tmp_path):
    d, ck = gemma
    text = d / "calib.txt"
    ref, work = tmp_path / "ref", tmp_path / "killed"
    run_py(DISTILL, *tiny_kd_args(ref, ck, text, text, iters=ITERS, save_every=SAVE_EVERY))
    args = tiny_kd_args(work, ck, text, text, iters=ITERS, save_every=SAVE_EVERY)
    kill_9_once_logged(DISTILL, args, f"[train] iter {SAVE_EVERY + 1}/{ITERS} ", tmp_path / "killed.log")
    p = run_py(DISTILL, *args)
    assert "[train] resumed from" in p.stdout, p.stdout[-3000:]
    assert train_records(work) == train_records(ref)
    assert sorted(train_records(ref)) == list(range(1, ITERS + 1))


@pytest.mark.parametrize("edit, needle", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported for Gemma3ForCausalLM"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true is not supported"),
    ({"hidden_activation": "silu"}, "hidden_activation='silu' is not supported for Gemma3ForCausalLM"),
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, "its text model, Gemma3ForCausalLM"),
])
def test_what_gemma3_import_cannot_express_is_one_line(gemma, tmp_path, edit, needle):
    import shutil

    from test_user_errors import assert_one_line, snapshot

    d, _ = gemma
    src = tmp_path / "src"
    shutil.copytree(d / "hf_gemma3", src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **edit}))
    before = snapshot(tmp_path)
    p = run_main(ROOT / "recipes" / "import_hf.py", f"source={src}", f"output={tmp_path / 'out'}")
    assert_one_line(p, 2, needle)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
