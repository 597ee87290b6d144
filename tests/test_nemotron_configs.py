"""The Nemotron-H model configs (conf/model/nemotron_h_8b.yaml, nemotron_nano_12b_v2.yaml, nemotron_nano_9b_v2.yaml):
each layer pattern has its model's layer kinds, and the parameter count we compute from the config equals that of
the model transformers builds from our exported config.json (on the meta device: no memory)."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import ROOT

# (layers, Mamba-2, attention, MLP) per config, as the models' published layer patterns give them
KINDS = {"nemotron_h_8b": (52, 24, 4, 24), "nemotron_nano_12b_v2": (62, 28, 6, 28), "nemotron_nano_9b_v2": (56, 27, 4, 25)}


def model_config(name: str):
    from minitron_nemo.models.config import ModelConfig

    return ModelConfig.from_dict(yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text()))


@pytest.mark.parametrize("name", sorted(KINDS))
def test_layer_kinds_and_count_against_transformers(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    from minitron_nemo.checkpoint.hf import hf_config_from_model_config
    from minitron_nemo.models.builder import count_parameters

    mc = model_config(name)
    kinds = [mc.layer_kind(i) for i in range(mc.num_layers)]
    assert (len(kinds), kinds.count("mamba"), kinds.count("attention"), kinds.count("mlp")) == KINDS[name]
    hf = hf_config_from_model_config(mc)
    cfg = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == "NemotronHForCausalLM"
    assert count_parameters(mc) == sum(p.numel() for p in model.parameters())


def test_the_9b_is_the_12b_pruned_in_depth_hidden_and_ffn_only():
    """Nemotron-Nano-9B-v2 keeps the 12B's Mamba mixers and attention heads; 62 -> 56 layers, hidden 5120 -> 4480,
    FFN 20480 -> 15680."""
    big, small = model_config("nemotron_nano_12b_v2"), model_config("nemotron_nano_9b_v2")
    keep = ("mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim", "num_attention_heads",
            "num_query_groups", "kv_channels", "vocab_size")
    assert all(getattr(big, k) == getattr(small, k) for k in keep)
    assert (big.num_layers, big.hidden_size, big.ffn_hidden_size) == (62, 5120, 20480)
    assert (small.num_layers, small.hidden_size, small.ffn_hidden_size) == (56, 4480, 15680)
