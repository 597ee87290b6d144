"""Sliding-window attention: Mistral's ``sliding_window`` (every layer) and Qwen2's ``use_sliding_window``
(the layers ``layer_types`` names). Imported from transformers, our logits equal theirs on sequences four
times longer than the window, at TP=1 and at TP=2 (the heads, and so the windowed core attention, split over
two ranks); exported back, the window is in config.json; depth pruning keeps each kept layer's kind."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, run_main, run_py, run_torchrun
from hf_models import make_hf_model

WORKERS = ROOT / "tests" / "workers"
WINDOW = 8  # logits_worker.py compares 32-token sequences


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    d = tmp_path_factory.mktemp("window")
    hf = make_hf_model("mistral", d / "hf", sliding_window=WINDOW)
    ck = d / "ck"
    run_py(ROOT / "recipes" / "import_hf.py", f"source={hf}", f"output={ck}")
    return hf, ck


def test_the_window_changes_transformers_logits(imported):
    """The comparison below exercises the window: without it transformers' own logits differ."""
    import transformers as tf

    hf, _ = imported
    tokens = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(0))
    windowed = tf.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    full = tf.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, sliding_window=None).eval()
    with torch.no_grad():
        a, b = windowed(tokens).logits, full(tokens).logits
    assert torch.equal(a[:, :WINDOW], b[:, :WINDOW])           # within the window nothing differs
    assert (a[:, WINDOW:] - b[:, WINDOW:]).abs().max() > 1e-2    # past it, the logits do


def test_logits_match_transformers_past_the_window_at_tp1_and_tp2(imported):
    hf, ck = imported
    mc = json.loads((ck / "meta.json").read_text())
    assert mc["saved_tensor_model_parallel_size"] == 1
    import yaml

    assert yaml.safe_load((ck / "model.yaml").read_text())["sliding_window"] == WINDOW
    run_py(WORKERS / "logits_worker.py", ck, hf, 1, 1)
    run_torchrun(WORKERS / "logits_worker.py", 2, ck, hf, 2, 1)


def test_export_writes_the_window(imported, tmp_path):
    from safetensors.torch import load_file

    hf, ck = imported
    out = tmp_path / "hf_out"
    run_py(ROOT / "recipes" / "export_hf.py", f"checkpoint={ck}", f"output={out}")
    assert json.loads((out / "config.json").read_text())["sliding_window"] == WINDOW
    a, b = load_file(str(hf / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_bad_window_is_one_line(imported, tmp_path):
    import shutil

    from test_user_errors import assert_one_line

    hf, _ = imported
    bad = tmp_path / "hf"
    shutil.copytree(hf, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "sliding_window": 0}))
    p = run_main(ROOT / "recipes" / "import_hf.py", f"source={bad}", f"output={tmp_path / 'ck'}")
    assert_one_line(p, 2, "sliding_window=0 is not supported for MistralForCausalLM")
    assert not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------------- windows on some layers (Qwen2)
QWEN2_WINDOW = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)  # layers 3 and 4 windowed


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    import sys

    sys.path.insert(0, str(WORKERS))
    from prune_common import make_text, make_tokenizer

    d = tmp_path_factory.mktemp("qwen2_window")
    hf = make_hf_model("qwen2", d / "hf", **QWEN2_WINDOW)
    make_tokenizer(make_text(d / "calib.txt"), hf)
    ck = d / "ck"
    run_py(ROOT / "recipes" / "import_hf.py", f"source={hf}", f"output={ck}")
    return d, hf, ck


def test_windows_on_some_layers_match_transformers(qwen2):
    import transformers as tf
    import yaml

    d, hf, ck = qwen2
    mc = yaml.safe_load((ck / "model.yaml").read_text())
    assert (mc["sliding_window"], mc["window_layers"]) == (WINDOW, [0, 0, 1, 1])
    tokens = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(0))
    windowed = tf.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    full = tf.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32,
                                                   layer_types=["full_attention"] * 4).eval()
    with torch.no_grad():
        assert (windowed(tokens).logits - full(tokens).logits).abs().max() > 1e-2   # the windowed layers matter
    run_py(WORKERS / "logits_worker.py", ck, hf, 1, 1)
    run_torchrun(WORKERS / "logits_worker.py", 2, ck, hf, 2, 1)


def test_depth_pruning_keeps_each_layers_attention_kind(qwen2):
    """Dropping layer 2 (full attention) leaves full, windowed, windowed: the pruned checkpoint says so, the
    export writes it as layer_types, and transformers' logits on the export equal ours."""
    import yaml

    d, hf, ck = qwen2
    out, exported = d / "pruned", d / "pruned_hf"
    run_py(ROOT / "recipes" / "prune.py", f"checkpoint={ck}", f"output={out}", f"prune.calibration.data={d / 'calib.txt'}",
           "prune.calibration.num_samples=8", "prune.calibration.seq_length=32", "prune.calibration.micro_batch_size=4",
           "prune.drop_layers=[2]")
    mc = yaml.safe_load((out / "model.yaml").read_text())
    assert (mc["num_layers"], mc["sliding_window"], mc["window_layers"]) == (3, WINDOW, [0, 1, 1])
    run_py(ROOT / "recipes" / "export_hf.py", f"checkpoint={out}", f"output={exported}")
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert (cfg["use_sliding_window"], cfg["sliding_window"], cfg["max_window_layers"]) == (True, WINDOW, 1)
    run_py(WORKERS / "logits_worker.py", out, exported, 1, 1)
