"""An HF model's weights, converted by the importer (``store.load_hf_into_model``), run by our Megatron-Core
forward and by transformers on this process's device (the GPU, or the CPU in CPU mode), in fp32 and bf16.

usage: device_logits_worker.py HF_DIR [te]     (te: Transformer Engine's layer spec)

Prints one JSON line: the device, and per dtype ``diff`` = max|ours - transformers'| in that dtype, ``ours_err`` /
``hf_err`` = max|logits - transformers' fp32 logits| of each side, and ``scale`` = max|transformers' fp32 logits|.
"""

import json
import sys

import torch

from minitron_nemo import runtime
from minitron_nemo.checkpoint import hf as hfconv
from minitron_nemo.checkpoint import store
from minitron_nemo.models.builder import build_model
from minitron_nemo.models.forward import full_logits


def ours(hf_dir, mc, tokens, dtype, use_te):
    model = build_model(mc, params_dtype=dtype, use_te=use_te)
    store.load_hf_into_model(model, hf_dir, mc)
    return full_logits(model, tokens)[..., : mc.vocab_size].float().cpu()


def theirs(hf_dir, tokens, dtype):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(runtime.device()).eval()
    with torch.no_grad():
        return model(tokens.to(runtime.device())).logits.float().cpu()


def main():
    hf_dir, use_te = sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "te"
    runtime.init_distributed(1, 1)
    mc = hfconv.model_config_from_hf(hfconv.read_hf_config(hf_dir))
    tokens = torch.randint(0, mc.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    ref = theirs(hf_dir, tokens, torch.float32)
    out = {"device": "cpu" if runtime.cpu_mode() else torch.cuda.get_device_name(), "te": use_te}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = ours(hf_dir, mc, tokens, dtype, use_te), theirs(hf_dir, tokens, dtype)
        out[name] = {"diff": (a - b).abs().max().item(), "ours_err": (a - ref).abs().max().item(),
                     "hf_err": (b - ref).abs().max().item(), "scale": ref.abs().max().item()}
    print(json.dumps(out), flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
