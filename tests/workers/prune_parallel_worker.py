"""Parallel invariance of importance and trimming.

    prune_parallel_worker.py run HF_DIR OUT_ROOT       (torchrun, 2 ranks: TP=2, then PP=2, then DP=2)
    prune_parallel_worker.py compare HF_DIR OUT...     (one process: TP=1 reference vs every OUT)

``run`` (one launch, Megatron parallel state re-initialised per layout) loads the HF model at TP x PP, scores it on fixed random windows (all width axes, BI, per-layer
and k=2 block removal losses), prunes width + depth (``drop_layers=[1, 2]`` moves layers across
pipeline stages) and writes OUT/scores.safetensors and the pruned checkpoint OUT/ckpt.
``compare`` computes the same at TP=1 and checks every OUT against it (fp32 tolerance).
"""

import sys
from pathlib import Path

import torch
from megatron.core import parallel_state as ps

from minitron_nemo import runtime
from minitron_nemo.checkpoint import hf as hfconv
from minitron_nemo.checkpoint import store
from minitron_nemo.data.windows import to_batches
from minitron_nemo.models.builder import build_model
from minitron_nemo.prune import depth
from minitron_nemo.prune import importance as imp
from minitron_nemo.prune.api import prune_model
from minitron_nemo.prune.targets import Targets

TARGETS = Targets(target_hidden_size=48, target_ffn_hidden_size=64, target_num_attention_heads=2,
                  drop_layers=[1, 2], grid=16)


def scores_and_prune(hf_dir):
    mc = hfconv.model_config_from_hf(hfconv.read_hf_config(Path(hf_dir)))
    model = build_model(mc)
    store.load_hf_into_model(model, hf_dir, mc)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, mc.vocab_size, (8, 17), generator=g)
    batches = to_batches(windows, 2, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    scores = imp.estimate(model, batches, progress=False)
    scores.update(depth.layer_loss_scores(model, mc.num_layers, batches, progress=False))
    scores.update(depth.block_loss_scores(model, mc.num_layers, batches, 2, progress=False))
    res = prune_model(model, mc, TARGETS, scores=scores, progress=False)
    return mc, scores, res


LAYOUTS = (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1))


def run(hf_dir, root):
    from safetensors.torch import save_file

    for name, tp, pp in LAYOUTS:
        runtime.init_distributed(tp, pp)
        out = Path(root) / name
        mc, scores, res = scores_and_prune(hf_dir)
        out.mkdir(parents=True, exist_ok=True)
        if runtime.is_rank0():
            save_file({k: v.contiguous() for k, v in scores.items()}, str(out / "scores.safetensors"))
        store.save_checkpoint(res.model, out / "ckpt", res.config)
        runtime.print0(f"{name}: kept layers {res.kept_layers}; scores {sorted(scores)}")
    runtime.shutdown()


def compare(hf_dir, outs):
    from safetensors.torch import load_file

    runtime.init_distributed(1, 1)
    mc, ref_scores, res = scores_and_prune(hf_dir)
    ref_w = store.canonical_state_dict(res.model)
    for out in outs:
        got = load_file(str(Path(out) / "scores.safetensors"))
        assert sorted(got) == sorted(ref_scores), (sorted(got), sorted(ref_scores))
        for k, v in ref_scores.items():
            err = ((got[k] - v).abs().max() / v.abs().max().clamp_min(1e-6)).item()
            assert err < 1e-4, f"{out}: score {k} differs (rel {err:.2e})\n{got[k]}\n{v}"
        new_mc = store.load_model_config(Path(out) / "ckpt")
        assert new_mc == res.config, (new_mc, res.config)
        model = build_model(new_mc)
        store.load_weights(model, Path(out) / "ckpt")
        w = store.canonical_state_dict(model)
        assert sorted(w) == sorted(ref_w)
        for k, v in ref_w.items():
            err = (w[k] - v).abs().max().item()
            assert err < 1e-5, f"{out}: pruned weight {k} differs by {err}"
        runtime.print0(f"OK {out}: {len(ref_scores)} score tensors and {len(ref_w)} pruned weights match TP=1")
    runtime.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3])
    else:
        compare(sys.argv[2], sys.argv[3:])
