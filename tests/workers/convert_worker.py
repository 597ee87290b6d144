"""Import every family's HF model at TP x PP (x EP), check logits against transformers, save checkpoints.

usage: convert_worker.py WORKDIR TP PP [EP] [RESHARD_FROM_TAG]
For each family in WORKDIR/hf_<family>: import at TP x PP (x EP) -> WORKDIR/ck_<family>_<tag> (tag
tp<TP>pp<PP>, with EP given tp<TP>pp<PP>ep<EP>), compare
logits (fp32, tol 1e-4). With RESHARD_FROM_TAG, also load WORKDIR/ck_<family>_<from> (saved at
another layout) at this layout and compare logits.
"""

import sys
from pathlib import Path

import torch
import transformers

from minitron_nemo import runtime
from minitron_nemo.checkpoint import hf as hfconv
from minitron_nemo.checkpoint import store
from minitron_nemo.models.builder import build_model
from minitron_nemo.models.forward import full_logits


def check_logits(model, mc, hf_dir, what):
    tokens = torch.randint(0, mc.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = full_logits(model, tokens)[..., : mc.vocab_size]
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(tokens).logits.float()
    diff = (ours - theirs).abs().max().item()
    runtime.print0(f"{what}: max|logits diff| = {diff:.2e}")
    assert diff < 1e-4, f"{what}: logits differ by {diff}"


def main():
    work, tp, pp = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rest = sys.argv[4:]
    ep = int(rest.pop(0)) if rest and rest[0].isdigit() else None
    reshard_from = rest[0] if rest else None
    tag = f"tp{tp}pp{pp}" + (f"ep{ep}" if ep else "")
    for hf_dir in sorted(work.glob("hf_*")):
        fam = hf_dir.name[3:]
        mc = hfconv.model_config_from_hf(hfconv.read_hf_config(hf_dir))
        runtime.init_distributed(tp, pp, expert_model_parallel_size=ep or 1)
        model = build_model(mc)
        store.load_hf_into_model(model, hf_dir, mc)
        check_logits(model, mc, hf_dir, f"{fam} import {tag}")
        store.save_checkpoint(model, work / f"ck_{fam}_{tag}", mc, tokenizer_src=hf_dir)
        if reshard_from:
            model = build_model(mc)
            store.load_weights(model, work / f"ck_{fam}_{reshard_from}")
            check_logits(model, mc, hf_dir, f"{fam} saved at {reshard_from}, loaded at {tag}")
    runtime.shutdown()


if __name__ == "__main__":
    main()
