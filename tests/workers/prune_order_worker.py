"""Ordering sanity on the real SmolLM2-135M: pruning by importance hurts least, at random in between,
the most important units hurt most (held-out LM loss on a different Shakespeare split).

usage: prune_order_worker.py HF_DIR TRAIN_TXT HELDOUT_TXT
Prints one "ORDER axis least=.. random=.. most=.." line per axis (FFN neurons by activation, layers by
Block Importance) and asserts least < random < most.
"""

import sys

import torch

from minitron_nemo import runtime
from minitron_nemo.checkpoint import hf as hfconv
from minitron_nemo.checkpoint import store
from minitron_nemo.data.windows import to_batches
from minitron_nemo.models.builder import build_model
from minitron_nemo.prune import depth
from minitron_nemo.prune import importance as imp
from minitron_nemo.prune.api import prune_to
from minitron_nemo.prune.data import calibration_windows
from minitron_nemo.prune.targets import Targets, validate


def main():
    hf_dir, train, heldout = sys.argv[1:4]
    runtime.init_distributed(1, 1)
    mc = hfconv.model_config_from_hf(hfconv.read_hf_config(hf_dir))
    model = build_model(mc)
    store.load_hf_into_model(model, hf_dir, mc)
    calib = to_batches(calibration_windows(train, hf_dir, 8, 128, seed=0, vocab_size=mc.vocab_size), 4)
    held = to_batches(calibration_windows(heldout, hf_dir, 6, 128, seed=1, vocab_size=mc.vocab_size), 4)
    scores = imp.estimate(model, calib, progress=False)
    full = depth.mean_loss(model, held)
    g = torch.Generator().manual_seed(0)

    def variants(key):
        s = scores[key]
        rand = torch.rand(s.shape, generator=g)
        return {"least": s, "random": rand, "most": -s}  # trimming keeps the highest scores

    cases = {"ffn": (Targets(target_ffn_hidden_size=mc.ffn_hidden_size * 3 // 4), "ffn", "bi"),
             "layers": (Targets(target_num_layers=mc.num_layers - mc.num_layers // 4), "layer_bi", "bi")}
    for axis, (t, key, crit) in cases.items():
        new_mc = validate(mc, t, 1, 1)
        losses = {}
        for name, s in variants(key).items():
            # "least" keeps the top 75% by importance, i.e. removes the least important 25%
            pruned, _, kept = prune_to(model, mc, new_mc, {**scores, key: s}, layer_criterion=crit)
            losses[name] = depth.mean_loss(pruned, held)
            del pruned
        runtime.print0(f"ORDER {axis} full={full:.4f} " + " ".join(f"{k}={v:.4f}" for k, v in losses.items()))
        assert losses["least"] < losses["random"] < losses["most"], (axis, losses)
    runtime.shutdown()


if __name__ == "__main__":
    main()
