"""Packed rows against documents alone: CKPT at TP=2, then at PP=2 (one launch of 2 ranks), three
documents of different lengths packed into one row (plus padding); each document's logits in the row must
equal its logits alone (fp32).

usage: packing_worker.py CKPT [TOL]
"""

import sys

import torch

from minitron_nemo import runtime
from minitron_nemo.checkpoint import store
from minitron_nemo.models.builder import build_model
from minitron_nemo.models.forward import full_logits


def main():
    ckpt = sys.argv[1]
    tol = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-5
    for tp, pp in ((2, 1), (1, 2)):
        check(ckpt, tp, pp, tol)
    runtime.shutdown()


def check(ckpt, tp: int, pp: int, tol: float):
    mc = store.load_model_config(ckpt)
    runtime.init_distributed(tp, pp)
    model = build_model(mc)
    store.load_weights(model, ckpt)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, mc.vocab_size, (n,), generator=g) for n in (23, 9, 17)]
    pad = 7
    row = torch.cat([*docs, torch.zeros(pad, dtype=torch.long)])[None]
    segments = torch.cat([torch.full((len(d),), k) for k, d in enumerate([*docs, torch.zeros(pad)])])[None]
    packed = full_logits(model, row, segments)[0, :, : mc.vocab_size]
    unpacked_row = full_logits(model, row)[0, :, : mc.vocab_size]
    at, worst = 0, 0.0
    for d in docs:
        alone = full_logits(model, d[None])[0, :, : mc.vocab_size]
        worst = max(worst, (packed[at:at + len(d)] - alone).abs().max().item())
        at += len(d)
    leak = (unpacked_row[len(docs[0]):at] - packed[len(docs[0]):at]).abs().max().item()
    runtime.print0(f"max|packed - alone| = {worst:.3e}; without packing the later documents differ by {leak:.3e} "
                   f"(tp={tp} pp={pp})")
    assert worst < tol, f"packed logits differ from the documents alone by {worst}"
    assert leak > 1e-3, "the check cannot tell packed from unpacked attention"


if __name__ == "__main__":
    main()
