"""GGUF (llama.cpp) Llama checkpoints -> Hugging Face directories.

Two independent paths that must agree bit for bit (``tests/test_gguf.py``):
  * ``gguf_to_hf``: transformers' GGUF loader (dequantizes, undoes the Q/K permutation), then
    ``save_pretrained`` as fp32 safetensors plus tokenizer files, with a cleaned-up ``config.json``;
  * ``read_gguf``: a small direct reader (``gguf.GGUFReader`` + ``gguf.quants.dequantize``) that maps
    llama.cpp tensor names to HF names and undoes the Q/K permutation itself.

llama.cpp's converter permutes the rows of ``q_proj``/``k_proj`` from HF's rotate-half RoPE layout
(per head: first half, second half) to the interleaved GPT-J layout (pairs): per head, rows
``[h, 2, d/2] -> [h, d/2, 2]``. ``unpermute_qk`` is its inverse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from minitron_nemo.errors import UserError

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}


def hf_name(name: str) -> str:
    """llama.cpp tensor name -> HF Llama name (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    raise UserError(f"unsupported GGUF tensor {name!r} (only plain Llama checkpoints are supported)")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp interleaved rows (what llama.cpp's converter does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of ``permute_qk``: llama.cpp interleaved rows -> HF rotate-half rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _config(reader) -> dict:
    """``hf_config`` of an open ``GGUFReader`` (tokenizer vocab/merges are not read)."""
    meta = {k: f.contents() for k, f in reader.fields.items()
            if k.startswith(("general.", "llama.")) or k.endswith("_token_id")}
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}  # GGUF order: [in, out]
    meta.setdefault("llama.vocab_size", shapes["token_embd.weight"][1])
    return hf_config(meta, tied="output.weight" not in shapes)


def _eps(x: float) -> float:
    """GGUF stores eps as float32 (1e-5 -> 9.9999997e-06): back to the shortest decimal."""
    return float(str(np.float32(x)))


def hf_config(meta: dict, tied: bool) -> dict:
    """HF ``config.json`` dict for a llama GGUF's metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"GGUF architecture {arch!r} is not supported; expected llama")
    g = lambda k, d=None: meta.get(f"llama.{k}", d)  # noqa: E731
    heads, hidden = int(g("attention.head_count")), int(g("embedding_length"))
    head_dim = int(g("attention.key_length", g("rope.dimension_count", hidden // heads)))
    theta = float(g("rope.freq_base", 10000.0))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(g("vocab_size")),
        "hidden_size": hidden, "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)), "head_dim": head_dim,
        "max_position_embeddings": int(g("context_length", 2048)), "hidden_act": "silu",
        "rms_norm_eps": _eps(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": tied, "dtype": "float32",
    }
    if g("rope.scaling.type") not in (None, "none"):
        raise UserError(f"GGUF rope scaling {g('rope.scaling.type')!r} is not supported")
    for k in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{k}_token_id" in meta:
            cfg[f"{'pad' if k == 'padding' else k}_token_id"] = int(meta[f"tokenizer.ggml.{k}_token_id"])
    return cfg


def read_gguf(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Direct reader: ``(hf_config_dict, {hf_name: fp32 tensor})`` with Q/K un-permuted.

    Tied checkpoints (no ``output.weight``) get no ``lm_head.weight`` entry, as in HF safetensors.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    reader = gguf.GGUFReader(str(path))
    cfg = _config(reader)
    sd = {}
    for t in reader.tensors:
        # numpy shape is the reverse of the GGUF shape, i.e. HF's [out, in]
        w = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
        if ".attn_q." in t.name:
            w = unpermute_qk(w, cfg["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, cfg["num_key_value_heads"])
        sd[hf_name(t.name)] = w.contiguous()
    return cfg, sd


def gguf_to_hf(gguf_path, out_dir) -> Path:
    """Write an HF Llama dir (fp32 ``model.safetensors``, config, tokenizer, generation config) to ``out_dir``.

    Uses transformers' GGUF loader; ``config.json`` is rewritten from the GGUF metadata (``hf_config``)
    so that ``rms_norm_eps``, ``rope_theta``, ``head_dim`` and ``tie_word_embeddings`` are explicit.
    ``out_dir`` should be a fresh (temp) dir; callers rename it into place.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise UserError(f"GGUF file not found: {gguf_path}")
    src, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # The loader already dequantized to fp32; drop the GGUF "quantizer" so that the model can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)

    import gguf

    cfg = _config(gguf.GGUFReader(str(gguf_path)))
    saved = json.loads((out_dir / "config.json").read_text())
    for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        if saved.get(k) != cfg[k]:
            raise RuntimeError(f"transformers and GGUF metadata disagree on {k}: {saved.get(k)} vs {cfg[k]}")
    cfg["transformers_version"] = saved.get("transformers_version")
    tmp = out_dir / "config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, out_dir / "config.json")
    return out_dir
