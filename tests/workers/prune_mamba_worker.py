"""Pruning a hybrid model (Nemotron-H): Mamba heads and head channels, FFN, attention heads, hidden and depth, at
TP=1 and TP=2.

    prune_mamba_worker.py tp CKPT OUT       (torchrun, 2 ranks: TP=2) scores (checked identical on both ranks)
                                            and the pruned model's logits of every case, saved to OUT
    prune_mamba_worker.py check CKPT OUT [PRUNED HF]
                                            (one process, TP=1) the same cases at TP=1: scores and pruned logits
                                            equal TP=2's; masking equivalence; the parameter count; then the
                                            pruned checkpoint PRUNED's logits equal transformers' on its export HF

Masking equivalence: the pruned model's logits equal the unpruned model's with the dropped units' contributions
zeroed: Mamba heads and head channels (``target_mamba_head_dim``: the SSM scan keeps a head's channels apart) by
zeroing their z rows of ``in_proj`` (the gated output x * silu(z) is then 0) and their ``out_proj`` columns; MLP
neurons and attention heads by zeroing their ``linear_fc2`` / ``linear_proj`` columns; dropped layers skipped. The
gated RMSNorm averages over a group's channels, and the pruned group has fewer: the masked model's norm takes
eps x r and weight x sqrt(r), r = kept / source channels per group, which makes the two equal exactly.
"""

import hashlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from minitron_nemo import runtime
from minitron_nemo.checkpoint import store
from minitron_nemo.models.builder import build_model, count_parameters
from minitron_nemo.models.forward import full_logits
from minitron_nemo.prune import importance as imp
from minitron_nemo.prune.api import prune_to
from minitron_nemo.prune.depth import skip_layers
from minitron_nemo.prune.targets import Targets, validate
from minitron_nemo.prune.trim import make_plan, mamba_channels, proj_cols

# the tiny Nemotron-H of tests/hf_models.py: "M-M*-M", hidden 64, 8 Mamba heads of 16 in 2 groups, FFN 96, 4 heads
CASES = {
    "mamba_heads": Targets(target_mamba_num_heads=4),
    "mamba_heads+ffn+heads": Targets(target_mamba_num_heads=6, target_ffn_hidden_size=64,
                                     target_num_attention_heads=2, grid=16),
    "mamba_head_dim": Targets(target_mamba_head_dim=12),
    "mamba_heads+head_dim": Targets(target_mamba_num_heads=4, target_mamba_head_dim=8),
    "hidden+mamba_heads": Targets(target_hidden_size=48, target_mamba_num_heads=4, grid=16),
    # depth (Block Importance): the kept layers' pattern characters; the masked model skips the dropped layers
    "depth+mamba_heads": Targets(target_num_layers=4, target_mamba_num_heads=4),
    "drop_layers": Targets(drop_layers=[1, 4]),
}
MASKED = ("mamba_heads", "mamba_heads+ffn+heads", "mamba_head_dim", "mamba_heads+head_dim", "depth+mamba_heads",
          "drop_layers")  # hidden pruning has no masked equivalent (the norms' RMS)


def load(ckpt):
    mc = store.load_model_config(ckpt)
    model = build_model(mc)
    store.load_weights(model, ckpt)
    return mc, model.eval()


def batches_of(mc, n=3, b=2, s=32):
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, mc.vocab_size, (n, b, s + 1), generator=g)
    return [{"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(b, s)} for x in w]


def digest(scores) -> str:
    h = hashlib.sha256()
    for k in sorted(scores):
        h.update(k.encode() + scores[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def pruned_logits(model, mc, scores, tokens):
    out = {}
    for name, t in CASES.items():
        pruned, new_mc, kept = prune_to(model, mc, validate(mc, t, _tp(), 1), scores, layer_criterion="bi",
                                        drop_layers=t.drop_layers, progress=False)
        plan = make_plan(mc, new_mc, scores, kept)
        out[name] = (new_mc, plan, pruned.eval(), full_logits(pruned, tokens)[..., : mc.vocab_size])
    return out


def _tp():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def run_tp(ckpt, out):
    runtime.init_distributed(2, 1)
    mc, model = load(ckpt)
    batches = batches_of(mc)
    scores = imp.estimate(model, batches, progress=False)
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest(scores))
    assert len(set(digests)) == 1, f"scores differ between the TP ranks: {digests}"
    runtime.print0(f"OK scores identical on the {len(digests)} TP ranks ({len(scores)} tensors, sha256 "
                   f"{digests[0][:12]})")
    res = pruned_logits(model, mc, scores, batches[0]["tokens"])
    if runtime.is_rank0():
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save({"scores": scores, "logits": {k: v[3] for k, v in res.items()}}, Path(out) / "tp2.pt")
    runtime.shutdown()


def masked_reference(model, mc, new_mc, plan):
    """The unpruned model with the dropped units zeroed (see the module docstring)."""
    ref = build_model(mc)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    inner = mc.mamba_num_heads * mc.mamba_head_dim
    r = new_mc.mamba_num_heads * new_mc.mamba_head_dim / inner  # kept / source channels of every group
    with torch.no_grad():
        for j, i in enumerate(plan.layers):
            layer, kind = ref.decoder.layers[i], mc.layer_kind(i)
            if kind == "mamba":
                drop = torch.ones(inner, dtype=torch.bool)
                drop[mamba_channels(mc, plan.mamba_heads[j], plan.mamba_dims[j])] = False
                mixer = layer.mixer
                mixer.in_proj.weight[:inner][drop] = 0  # z rows
                mixer.out_proj.weight[:, drop] = 0
                mixer.norm.eps = mixer.norm.eps * r
                mixer.norm.weight.mul_(r ** 0.5)
            elif kind == "mlp":
                keep = torch.zeros(mc.ffn_hidden_size, dtype=torch.bool)
                keep[plan.ffn[j]] = True
                layer.mlp.linear_fc2.weight[:, ~keep] = 0
            else:
                keep = torch.zeros(mc.num_attention_heads * mc.head_dim, dtype=torch.bool)
                keep[proj_cols(mc, plan.groups[j], plan.heads[j])] = True
                layer.self_attention.linear_proj.weight[:, ~keep] = 0
    return ref


def check(ckpt, out, pruned_ckpt=None, hf=None):
    runtime.init_distributed(1, 1)
    mc, model = load(ckpt)
    batches = batches_of(mc)
    tokens = batches[0]["tokens"]
    scores = imp.estimate(model, batches, progress=False)
    assert scores["mamba_heads"].shape == (mc.num_layers, mc.mamba_num_heads)
    kinds = [mc.layer_kind(i) for i in range(mc.num_layers)]
    for i, k in enumerate(kinds):  # each kind's rows are scored, the others' are zero
        assert (scores["mamba_heads"][i].abs().sum() > 0) == (k == "mamba"), (i, k)
        assert (scores["ffn"][i].abs().sum() > 0) == (k == "mlp"), (i, k)
        assert (scores["heads"][i].abs().sum() > 0) == (k == "attention"), (i, k)
    base = full_logits(model, tokens)[..., : mc.vocab_size]
    tp2 = torch.load(Path(out) / "tp2.pt")
    for k, v in scores.items():
        err = ((tp2["scores"][k] - v).abs().max() / v.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-5, f"score {k}: TP=2 differs from TP=1 by {err:.2e} (relative)"
    runtime.print0(f"OK scores at TP=2 equal TP=1 ({len(scores)} tensors)")
    for name, (new_mc, plan, pruned, got) in pruned_logits(model, mc, scores, tokens).items():
        hpg = new_mc.mamba_num_heads // mc.mamba_num_groups
        for heads in plan.mamba_heads:  # the same number of heads in every group, each within its group
            groups = heads // (mc.mamba_num_heads // mc.mamba_num_groups)
            assert torch.equal(torch.bincount(groups, minlength=mc.mamba_num_groups),
                               torch.full((mc.mamba_num_groups,), hpg)), heads
        numel = sum(p.numel() for p in pruned.parameters())
        numel -= (new_mc.padded_vocab_size - new_mc.vocab_size) * new_mc.hidden_size * 2
        assert numel == count_parameters(new_mc), (name, numel, count_parameters(new_mc))
        tp_diff = (tp2["logits"][name] - got).abs().max().item()
        assert tp_diff < 1e-4, f"{name}: the model pruned at TP=2 differs from TP=1's by {tp_diff}"
        msg = f"OK {name}: pattern {new_mc.hybrid_pattern} mamba_num_heads={new_mc.mamba_num_heads} mamba_head_dim={new_mc.mamba_head_dim} " \
              f"hidden={new_mc.hidden_size}; TP=2 vs TP=1 " \
              f"pruned logits |diff|={tp_diff:.1e}"
        if name in MASKED:
            ref = masked_reference(model, mc, new_mc, plan)
            dropped = set(range(mc.num_layers)) - set(plan.layers)
            assert new_mc.hybrid_pattern == "".join(mc.hybrid_pattern[i] for i in plan.layers)
            with skip_layers(ref, mc.num_layers, dropped):
                want = full_logits(ref, tokens)[..., : mc.vocab_size]
            diff = (got - want).abs().max().item()
            changed = (want - base).abs().max().item()
            assert diff < 1e-4, f"{name}: pruned vs masked logits differ by {diff}"
            assert changed > 1e-3, f"{name}: masking changed nothing ({changed}); the test is vacuous"
            msg += f"; masking equivalence |diff|={diff:.1e} (masking moved logits by {changed:.2f})"
        runtime.print0(msg)
    if pruned_ckpt is not None:
        import transformers

        mc, model = load(pruned_ckpt)
        ours = full_logits(model, tokens)[..., : mc.vocab_size]
        ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = ref(tokens).logits.float()
        diff = (ours - theirs).abs().max().item()
        assert diff < 1e-4, f"the pruned export's logits differ from ours by {diff}"
        runtime.print0(f"OK the pruned export in transformers: max|logits diff| = {diff:.1e} "
                       f"(pattern {mc.hybrid_pattern}, hidden {mc.hidden_size})")
    runtime.shutdown()


if __name__ == "__main__":
    {"tp": run_tp, "check": check}[sys.argv[1]](*sys.argv[2:])
