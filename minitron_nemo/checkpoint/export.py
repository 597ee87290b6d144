"""Write a minitron_nemo checkpoint as a Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from minitron_nemo import outputs, runtime
from minitron_nemo.checkpoint import hf as hfconv
from minitron_nemo.checkpoint import store

SHARD_BYTES = 4 << 30


def save_hf_dir(mc, tensors: dict, out_dir, *, token_ids: dict | None = None, tokenizer_src=None,
                dtype: torch.dtype = torch.float32) -> Path:
    """Write ``config.json``, safetensors (sharded above 4 GiB) and tokenizer files atomically."""
    with outputs.atomic_dir(out_dir) as tmp:
        _write_hf(tmp, mc, tensors, token_ids, tokenizer_src, dtype)
    return Path(out_dir).resolve()


def _write_hf(tmp: Path, mc, tensors: dict, token_ids, tokenizer_src, dtype) -> None:
    cfg = hfconv.hf_config_from_model_config(mc, token_ids)
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        v = v.to(dtype).contiguous()
        if cur and size + v.numel() * v.element_size() > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.numel() * v.element_size()
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer_src is not None:
        store.copy_tokenizer(tokenizer_src, tmp)


def export_hf(ckpt_dir, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """Load ``ckpt_dir`` at TP=1, PP=1 in this process and write it as an HF directory."""
    from minitron_nemo.models.builder import build_model

    mc = store.load_model_config(ckpt_dir)
    runtime.init_distributed(1, 1)
    model = build_model(mc, params_dtype=torch.float32)
    store.load_weights(model, ckpt_dir)
    tensors = hfconv.canonical_to_hf(mc, store.canonical_state_dict(model))
    out = None
    if runtime.is_rank0():
        meta = store.load_meta(ckpt_dir)
        out = save_hf_dir(mc, tensors, out_dir, token_ids=meta.get("hf_token_ids"),
                          tokenizer_src=store.tokenizer_dir(ckpt_dir), dtype=dtype)
    runtime.shutdown()
    return out or Path(out_dir)
