"""A Llama whose hidden size is not a multiple of its head count (what width pruning with heads kept
produces): random Megatron weights -> checkpoint -> export_hf -> transformers logits.

usage: odd_heads_export_worker.py WORKDIR
"""

import json
import sys
from pathlib import Path

import torch

from minitron_nemo import runtime
from minitron_nemo.checkpoint import store
from minitron_nemo.checkpoint.export import export_hf
from minitron_nemo.models.builder import build_model
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.models.forward import full_logits


def main():
    work = Path(sys.argv[1])
    mc = ModelConfig(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=3,
                     num_query_groups=3, kv_channels=24, vocab_size=256, share_embeddings_and_output_weights=True)
    runtime.init_distributed(1, 1, seed=7)
    model = build_model(mc)
    with torch.no_grad():  # norms away from 1 so a wrong mapping shows
        for name, p in model.named_parameters():
            if "layernorm" in name or "final_norm" in name:
                p.uniform_(0.5, 1.5)
    store.save_checkpoint(model, work / "ckpt", mc)
    tokens = torch.randint(0, mc.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    ours = full_logits(model, tokens)[..., : mc.vocab_size]
    hf = export_hf(work / "ckpt", work / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    print("config", cfg["architectures"][0], cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"],
          cfg.get("sliding_window"))
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(tokens).logits.float()
    print(f"max|logits diff| = {(ours - theirs).abs().max().item():.3e}")


if __name__ == "__main__":
    main()
