"""Nemotron-H (NemotronHForCausalLM), the hybrid Mamba-Transformer, on a tiny random model written by transformers
(tests/hf_models.py): Mamba-2, MLP and attention blocks "M-M*-M", 8 Mamba heads of 16 in 2 groups, state 16, chunks
of 8, the step clamped at time_step_min=0.01.

The dt floor changes transformers' logits on the 32-token sequences (four chunks), so the parity exercises it; our
parameter count is transformers'; our logits equal transformers' at TP=1, TP=2 and PP=2 (each PP stage holds Mamba
layers); import at TP=2 and at PP=2, then export, round-trips bitwise; what Megatron-Core cannot express is a
one-line refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_main, run_py, run_torchrun, tiny_imported

WORKERS = ROOT / "tests" / "workers"
SEQ = 32  # logits_worker.py's sequences: four Mamba chunks


@pytest.fixture(scope="module")
def nemo_h(tmp_path_factory):
    return tiny_imported(tmp_path_factory, "nemotron_h")


def hf_model(hf: Path, **overrides):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, **overrides).eval()


def test_parameter_count_and_the_dt_floor_changes_transformers_logits(nemo_h):
    from minitron_nemo.checkpoint.hf import hf_model_config
    from minitron_nemo.models.builder import count_parameters

    d, _ = nemo_h
    hf = d / "hf_nemotron_h"
    model = hf_model(hf)
    mc = hf_model_config(hf)
    assert (mc.hybrid_pattern, mc.mamba_dt_min, mc.mamba_chunk_size) == ("M-M*-M", 0.01, 8)
    assert count_parameters(mc) == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, 250, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens).logits
        no_floor = hf_model(hf, time_step_min=1e-9)(tokens).logits
    assert (ref - no_floor).abs().max() > 1e-3


def test_logits_match_transformers_at_tp1_tp2_pp2(nemo_h):
    d, ck = nemo_h
    hf = d / "hf_nemotron_h"
    run_py(WORKERS / "logits_worker.py", ck, hf, 1, 1)
    run_torchrun(WORKERS / "logits_worker.py", 2, ck, hf, 2, 1)
    run_torchrun(WORKERS / "logits_worker.py", 2, ck, hf, 1, 2)


@pytest.mark.parametrize("layout", ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"],
                         ids=["tp2", "pp2"])
def test_import_then_export_round_trips_bitwise(nemo_h, tmp_path, layout):
    from safetensors.torch import load_file

    d, _ = nemo_h
    src, ck, out = d / "hf_nemotron_h", tmp_path / "ck", tmp_path / "hf"
    run_torchrun(ROOT / "recipes" / "import_hf.py", 2, f"source={src}", f"output={ck}", layout)
    p = run_main(ROOT / "recipes" / "export_hf.py", f"checkpoint={ck}", f"output={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x, y = (json.loads((h / "config.json").read_text()) for h in (src, out))
    for k in ("architectures", "layers_block_type", "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size",
              "conv_kernel", "chunk_size", "time_step_min", "head_dim", "num_key_value_heads", "intermediate_size"):
        assert x[k] == y[k], k


def test_moe_layers_are_a_one_line_refusal(nemo_h, tmp_path):
    from test_user_errors import assert_one_line

    d, _ = nemo_h
    src = tmp_path / "hf_moe"
    src.mkdir()
    cfg = json.loads((d / "hf_nemotron_h" / "config.json").read_text())
    cfg["layers_block_type"][1] = "moe"
    (src / "config.json").write_text(json.dumps(cfg))
    p = run_main(ROOT / "recipes" / "import_hf.py", f"source={src}", f"output={tmp_path / 'out'}")
    assert_one_line(p, 2, "layers_block_type has 'moe' (hybrid pattern 'MEM*-M')")
    assert not (tmp_path / "out").exists()


def test_the_8b_model_config_has_the_cards_layers():
    """Nemotron-H-8B: 52 layers, 24 Mamba-2, 4 attention and 24 MLP (conf/model/nemotron_h_8b.yaml)."""
    import yaml

    from minitron_nemo.models.config import ModelConfig

    mc = ModelConfig.from_dict(yaml.safe_load((ROOT / "conf" / "model" / "nemotron_h_8b.yaml").read_text()))
    kinds = [mc.layer_kind(i) for i in range(mc.num_layers)]
    assert (len(kinds), kinds.count("mamba"), kinds.count("attention"), kinds.count("mlp")) == (52, 24, 4, 24)
