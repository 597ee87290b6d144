"""Load CKPT at TP x PP and compare its full logits with transformers' on HF_DIR (fp32).

usage: logits_worker.py CKPT HF_DIR TP PP [TOL [EP]]
"""

import sys

import torch

from minitron_nemo import runtime
from minitron_nemo.checkpoint import store
from minitron_nemo.models.builder import build_model
from minitron_nemo.models.forward import full_logits


def main():
    ckpt, hf_dir, tp, pp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    tol = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-4
    ep = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    mc = store.load_model_config(ckpt)
    runtime.init_distributed(tp, pp, expert_model_parallel_size=ep,
                             expert_tensor_parallel_size=1 if mc.experts_replicated_over_tp else None)
    model = build_model(mc)
    store.load_weights(model, ckpt)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mc.vocab_size, (2, 32), generator=g)
    ours = full_logits(model, tokens)[..., : mc.vocab_size]

    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(tokens).logits.float()
    diff = (ours - theirs).abs().max().item()
    runtime.print0(f"max|logits diff| = {diff:.3e} (tp={tp} pp={pp} ep={ep})")
    assert diff < tol, f"logits differ by {diff}"
    runtime.shutdown()


if __name__ == "__main__":
    main()
