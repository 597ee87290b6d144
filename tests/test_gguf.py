"""The SmolLM2-135M-Instruct GGUF teacher: direct reader == transformers' loader, Q/K un-permuted, config."""

import json

import pytest
import torch
from safetensors.torch import load_file

from minitron_nemo.checkpoint.gguf import permute_qk, read_gguf, unpermute_qk
from minitron_nemo.data import assets


@pytest.fixture(scope="module")
def hf_dir():
    return assets.smollm2_hf_dir()


@pytest.fixture(scope="module")
def direct():
    return read_gguf(assets.smollm2_gguf_path())


def test_config(hf_dir, direct):
    cfg = json.loads((hf_dir / "config.json").read_text())
    expect = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "hidden_size": 576,
              "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
              "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
              "hidden_act": "silu", "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2}
    assert {k: cfg.get(k) for k in expect} == expect
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    assert "quantization_config" not in cfg
    assert {k: v for k, v in cfg.items() if k != "transformers_version"} == direct[0]
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"):
        assert (hf_dir / f).is_file()
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(hf_dir)
    assert hf.tie_word_embeddings and hf.head_dim == 64 and hf.rope_parameters["rope_theta"] == 1e5


def test_direct_reader_equals_transformers_loader(hf_dir, direct):
    saved = load_file(hf_dir / "model.safetensors")
    sd = direct[1]
    assert sorted(saved) == sorted(sd) and len(sd) == 2 + 30 * 9  # tied: no lm_head.weight
    for k, v in saved.items():
        assert v.dtype == torch.float32 and v.shape == sd[k].shape, k
        assert torch.equal(v, sd[k]), k  # bitwise


def test_permutation_roundtrip_and_layout():
    w = torch.randn(3 * 64, 576)
    assert torch.equal(unpermute_qk(permute_qk(w, 3), 3), w)
    assert not torch.equal(permute_qk(w, 3), w)
    # one head of dim 4, rows [a, b | c, d] (HF rotate-half halves) -> llama.cpp pairs [a, c, b, d]
    x = torch.arange(4.0)[:, None]
    assert permute_qk(x, 1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


def _loss(model, ids):
    with torch.no_grad():
        out = model(ids[None], labels=ids[None])
    return out.loss.item()


def test_qk_permutation_is_undone(hf_dir):
    """On real held-out text the converted model is good; re-applying llama.cpp's permutation ruins it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = (assets.shakespeare_dir() / "plays" / "julius_caesar.txt").read_text()
    start = text.index("Friends, Romans, countrymen")
    ids = torch.tensor(tok(text[start - 3000:start + 1000])["input_ids"][:384])
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    good = _loss(model, ids)
    for layer in model.model.layers:
        a = layer.self_attn
        a.q_proj.weight.data = permute_qk(a.q_proj.weight.data, 9)
        a.k_proj.weight.data = permute_qk(a.k_proj.weight.data, 3)
    bad = _loss(model, ids)
    print(f"loss {good:.3f} (ppl {torch.tensor(good).exp():.1f}); with llama.cpp's Q/K layout {bad:.3f}")
    assert good < 3.5  # SmolLM2-135M on Shakespeare: perplexity in the tens
    assert bad > good + 1.0
