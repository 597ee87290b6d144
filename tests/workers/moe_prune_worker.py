"""Expert and expert-FFN pruning on a small random MoE model, at EP = world size (1 or 2 ranks).

usage: moe_prune_worker.py WORKDIR FAMILY[,FAMILY...] [tp2]  (python: EP=1; torchrun --nproc_per_node 2: EP=2, or
                                                with tp2 TP=2: every expert split over both ranks;
                                                4 ranks with tp2: TP=2 x EP=2)

1. Scores: ``expert_frequency`` of each layer sums to tokens x top-k; each expert score is recomputed
   independently from captured router inputs and expert outputs (EP=1).
2. Masking equivalence: pruning experts (and expert neurons, shared-expert neurons, and layers) gives the
   same logits as the unpruned model whose router logits of the dropped experts are -inf and whose
   dropped neurons' fc2 columns are zero (dropped layers skipped). At EP=2 each rank masks its own experts.
3. Layout invariance: WORKDIR/ep{EP}.pt holds the scores and the pruned logits; the test compares EP=2
   with EP=1.
"""

import os
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state as ps

from minitron_nemo import runtime
from minitron_nemo.models.builder import build_model, count_parameters
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.models.forward import full_logits
from minitron_nemo.prune import experts as ex
from minitron_nemo.prune import importance as imp
from minitron_nemo.prune import depth
from minitron_nemo.prune.targets import Targets, validate
from minitron_nemo.prune.trim import make_plan, trim_model

FAMILIES = {
    "mixtral": dict(family="mixtral", moe_router_pre_softmax=False),
    "qwen3_moe": dict(family="qwen3_moe", moe_router_pre_softmax=True, qk_layernorm=True),
    "qwen2_moe": dict(family="qwen2_moe", moe_router_pre_softmax=False, add_qkv_bias=True,
                      moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True),
}
MC = None
CASES = {
    "experts": Targets(target_num_moe_experts=6),
    "expert_ffn": Targets(target_moe_ffn_hidden_size=16, grid=8),
    "experts+ffn+depth": Targets(target_num_moe_experts=4, target_moe_ffn_hidden_size=24, target_num_layers=2,
                                 grid=8),
}
SHARED_CASES = {  # families with a shared expert
    "shared": Targets(target_moe_shared_expert_intermediate_size=16, grid=8),
    "experts+shared": Targets(target_num_moe_experts=4, target_moe_shared_expert_intermediate_size=24, grid=8),
}


def small_config(family):
    return ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                       kv_channels=16, vocab_size=250, num_moe_experts=8, moe_router_topk=2,
                       moe_ffn_hidden_size=32, **FAMILIES[family]).validate()


def randomize(model, seed):
    """The same random weights at any TP x EP: each tensor is drawn whole (at its TP=1 shape) from a
    generator seeded by its name with the global expert number, then cut to this rank's TP shard; routers
    get a large std so that routing is decisive."""
    from minitron_nemo.models import layout

    mc = MC
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    ep_rank, n_local = ps.get_expert_model_parallel_rank(), mc.num_moe_experts // \
        ps.get_expert_model_parallel_world_size()
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = ex.moe.split_expert_name(name)
            key = name if parts is None else f"{parts[0]}{ep_rank * n_local + parts[1]}{parts[2]}"
            g = torch.Generator().manual_seed(seed * 100003 + sum(map(ord, key)) * 31 + len(key))
            shape = list(p.shape)
            if tp > 1 and name.endswith(layout.COLUMN_PARALLEL):
                shape[0] *= tp
            elif tp > 1 and name.endswith(layout.ROW_PARALLEL):
                shape[1] *= tp
            if "norm" in name:
                full = torch.rand(shape, generator=g) * 0.8 + 0.6
            else:
                std = 0.5 if name.endswith("router.weight") else (0.1 if p.dim() == 1 else 0.15)
                full = torch.randn(shape, generator=g) * std
            p.copy_(layout.shard_tensor(mc, name, full, tp_rank, tp))


def batches_of(mc, n_batches=3, b=2, s=16):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        w = torch.randint(0, mc.vocab_size, (b, s + 1), generator=g)
        out.append({"tokens": w[:, :-1], "labels": w[:, 1:], "loss_mask": torch.ones(b, s)})
    return out


def close(a, b, what, rtol=1e-5):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    assert err < rtol, f"{what}: relative error {err:.2e}\nplugin {a}\nreference {b}"


def check_scores(model, mc, scores, batches):
    tokens = sum(b["tokens"].numel() for b in batches)
    for i in range(mc.num_layers):
        assert scores["expert_frequency"][i].sum().item() == tokens * mc.moe_router_topk, (scores["expert_frequency"][i], tokens)
    if ps.get_expert_model_parallel_world_size() * ps.get_tensor_model_parallel_world_size() > 1:
        return  # the independent recomputation reads whole experts: one process
    # Independent recomputation from captured tensors (router input; each expert's output and probs).
    acts, handles = {}, []
    for i, layer in enumerate(model.decoder.layers):
        handles.append(layer.mlp.router.register_forward_pre_hook(
            lambda m, a, i=i: acts.setdefault(("x", i), []).append(a[0].detach().reshape(-1, a[0].shape[-1]))))
        for e, expert in enumerate(layer.mlp.experts.local_experts):
            handles.append(expert.register_forward_hook(
                lambda m, a, o, i=i, e=e: acts.setdefault(("y", i, e), []).append((o[0].detach(), a[1].detach()))))
            handles.append(expert.linear_fc2.register_forward_pre_hook(
                lambda m, a, i=i, e=e: acts.setdefault(("h", i, e), []).append(a[0].detach())))
        if mc.moe_shared_expert_intermediate_size:
            handles.append(layer.mlp.shared_experts.linear_fc2.register_forward_pre_hook(
                lambda m, a, i=i: acts.setdefault(("s", i), []).append(a[0].detach())))
    imp.run_with_progress(model, batches, progress=False)
    for h in handles:
        h.remove()
    for i, layer in enumerate(model.decoder.layers):
        x = torch.cat(acts[("x", i)])
        probs = torch.softmax(x.double() @ layer.mlp.router.weight.double().T, dim=-1)
        close(scores["expert_router_mass"][i], probs.sum(0), f"router mass layer {i}")
        for e in range(mc.num_moe_experts):
            y = torch.cat([o for o, _ in acts[("y", i, e)]]).double()
            p = torch.cat([q for _, q in acts[("y", i, e)]]).double()
            close(scores["expert_routed_l2"][i, e], y.pow(2).sum().sqrt(), f"routed_l2 [{i},{e}]")
            close(scores["expert_output_l2"][i, e], (y / p[:, None]).pow(2).sum().sqrt(), f"output_l2 [{i},{e}]")
            h = torch.cat(acts[("h", i, e)]).double()
            close(scores["expert_ffn"][i, e], h.pow(2).sum(0).sqrt(), f"expert_ffn [{i},{e}]")
        if mc.moe_shared_expert_intermediate_size:  # l2 over samples of mean_s |x| (the dense MLP's default)
            h = torch.stack(acts[("s", i)]).double()  # [batches, s, b, F]
            want = h.abs().mean(1).pow(2).sum((0, 1)).sqrt()
            close(scores["shared_ffn"][i], want, f"shared_ffn [{i}]")
    runtime.print0("OK expert scores recomputed independently")


def masked_reference(model, mc, plan):
    """The unpruned model (same layout) with dropped experts' router logits -inf, dropped neurons' fc2
    columns zero."""
    ref = build_model(mc)
    ref.load_state_dict(model.state_dict())
    ep_rank = ps.get_expert_model_parallel_rank()
    n_local = mc.num_moe_experts // ps.get_expert_model_parallel_world_size()
    with torch.no_grad():
        for j, i in enumerate(plan.layers):
            mlp = ref.decoder.layers[i].mlp
            keep = torch.zeros(mc.num_moe_experts, dtype=torch.bool)
            keep[plan.experts[j]] = True
            gating = mlp.router.gating
            mlp.router.gating = lambda x, gating=gating, keep=keep: gating(x).masked_fill(~keep, float("-inf"))
            for n, e in enumerate(plan.experts[j].tolist()):
                if e // n_local != ep_rank:
                    continue
                fc2 = mlp.experts.local_experts[e % n_local].linear_fc2.weight
                kept = torch.zeros(mc.moe_ffn_hidden_size, dtype=torch.bool)
                kept[plan.expert_ffn[j][n]] = True
                tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
                fc2[:, ~torch.chunk(kept, tp)[r]] = 0  # this TP rank's columns
            if mc.moe_shared_expert_intermediate_size:
                kept = torch.zeros(mc.moe_shared_expert_intermediate_size, dtype=torch.bool)
                kept[plan.shared_ffn[j]] = True
                tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
                mlp.shared_experts.linear_fc2.weight[:, ~torch.chunk(kept, tp)[r]] = 0
    return ref


def check_masking(model, mc, scores, tokens, family):
    base = full_logits(model, tokens)
    ep = ps.get_expert_model_parallel_world_size()
    out = {}
    for name, t in {**CASES, **(SHARED_CASES if mc.moe_shared_expert_intermediate_size else {})}.items():
        new_mc = validate(mc, t, ps.get_tensor_model_parallel_world_size(), 1, ep)
        kept = depth.select_layers(mc, new_mc.num_layers, scores, "bi")
        plan = make_plan(mc, new_mc, scores, kept)
        pruned = trim_model(model, mc, new_mc, plan)
        ref = masked_reference(model, mc, plan)
        with depth.skip_layers(ref, mc.num_layers, set(range(mc.num_layers)) - set(kept)):
            want = full_logits(ref, tokens)
        got = full_logits(pruned, tokens)
        diff = (got - want).abs().max().item()
        changed = (want - base).abs().max().item()
        assert diff < 1e-4, f"{family} {name} ep={ep}: pruned vs masked logits differ by {diff}"
        assert changed > 1e-3, f"{family} {name}: masking changed nothing ({changed}); test is vacuous"
        numel = sum(p.numel() for p in pruned.parameters())
        if ep * ps.get_tensor_model_parallel_world_size() == 1:  # one process holds every parameter
            pad = (new_mc.padded_vocab_size - new_mc.vocab_size) * new_mc.hidden_size * 2
            assert numel - pad == count_parameters(new_mc), (numel - pad, count_parameters(new_mc))
        runtime.print0(f"OK masking equivalence {family} {name} tp={ps.get_tensor_model_parallel_world_size()} ep={ep}: |diff|={diff:.1e} (masking moved "
                       f"logits by {changed:.2f}; experts {plan.experts[0].tolist()}, layers {kept})")
        out[name] = got
    return out


def main():
    work = Path(sys.argv[1])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = 2 if sys.argv[3:] == ["tp2"] else 1  # 4 ranks with tp2: TP=2 x EP=2
    runtime.init_distributed(tp, 1, expert_model_parallel_size=world // tp)
    for family in sys.argv[2].split(","):  # one launch checks every family
        check_family(work, family, tp)
    runtime.shutdown()


def check_family(work: Path, family: str, tp: int):
    ep = ps.get_expert_model_parallel_world_size()
    global MC
    mc = MC = small_config(family)
    model = build_model(mc)
    randomize(model, seed=1)
    model.eval()
    batches = batches_of(mc, n_batches=4)
    # The EP ranks are data-parallel ranks: each scores its share of the batches.
    scores = imp.estimate(model, batches[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()],
                          progress=False)
    check_scores(model, mc, scores, batches)
    logits = check_masking(model, mc, scores, batches[0]["tokens"], family)
    if runtime.is_rank0():
        tag = f"ep{ep}" if tp == 1 else ("tp2" if ep == 1 else f"tp{tp}ep{ep}")
        torch.save({"scores": scores, "logits": logits}, work / f"{family}_{tag}.pt")


if __name__ == "__main__":
    main()
