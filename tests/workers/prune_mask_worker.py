"""Single-process checks of importance and trimming on small random models of each family.

1. Independent check: scores recomputed from captured activations with the SPEC §2 formulas
   (all 9 aggregations) equal the plugin's, for a handful of channels / neurons / heads / groups,
   and Block Importance equals 1 - mean cos(h_in, h_out).
2. Masking equivalence: pruning MLP neurons, heads, query groups (and skipping layers) gives the same
   logits as the unpruned model with the dropped fc2 / proj input columns zeroed (layers skipped).
3. ``count_parameters`` equals the parameter count of the built model (vocab padding excluded).

usage: prune_mask_worker.py   (prints OK lines; any failure raises)
"""

import torch

from minitron_nemo import runtime
from minitron_nemo.models.builder import build_model, count_parameters
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.models.forward import full_logits
from minitron_nemo.prune import importance as imp
from minitron_nemo.prune import depth
from minitron_nemo.prune.targets import Targets, validate
from minitron_nemo.prune.trim import make_plan, proj_cols, trim_model

FAMILIES = {
    "llama": dict(family="llama", share_embeddings_and_output_weights=True),
    "qwen2": dict(family="qwen2", add_qkv_bias=True),
    "nemotron": dict(family="nemotron", normalization="LayerNorm", layernorm_zero_centered_gamma=True,
                     activation="squared_relu", rotary_percent=0.5),
    "qwen3": dict(family="qwen3", qk_layernorm=True),  # head pruning keeps the shared per-head norm weights
    # four norms per layer (the two after attention and MLP join the hidden-channel scores), windows of 8
    # (sequences of 20) on three layers with their own RoPE base, scaled embeddings, GeGLU
    "gemma3": dict(family="gemma3", qk_layernorm=True, layernorm_zero_centered_gamma=True, activation="geglu",
                   post_norms=True, scale_embeddings=True, sliding_window=8, window_layers=[1, 0, 1, 1],
                   local_rotary_base=1e4, rotary_base=1e6, rotary_interpolation_factor=8.0,
                   query_pre_attn_scalar=20.0, share_embeddings_and_output_weights=True),
}
INDEPENDENT = ("llama", "gemma3")  # families whose scores are also recomputed from captured activations


def small_config(family):
    return ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                       num_query_groups=2, kv_channels=24, vocab_size=250, **FAMILIES[family]).validate()


def randomize(model, seed):
    """Random weights large enough that heads / neurons differ (norm gains in [0.6, 1.4])."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(("weight", "layer_norm_weight")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.6)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.15))


def batches_of(mc, n_batches=3, b=2, s=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        w = torch.randint(0, mc.vocab_size, (b, s + 1), generator=g)
        out.append({"tokens": w[:, :-1], "labels": w[:, 1:], "loss_mask": torch.ones(b, s)})
    return out


# ----------------------------------------------------------------------------- 1. independent check
def spec_score(x, batch, seq):
    """SPEC §2 written out directly: x [s, N, c] (all samples) -> [c]."""
    v = {"mean": x.abs().mean(0), "l2": x.pow(2).sum(0).sqrt(), "var": x.var(0, unbiased=False)}[seq]
    v = v.double()
    return {"l2": v.pow(2).sum(0).sqrt(), "mean": v.mean(0), "var": v.var(0, unbiased=False)}[batch]


def capture(model):
    acts, handles = {}, []

    def keep(key, x):
        acts.setdefault(key, []).append(x.detach().clone())
        return None

    for i, layer in enumerate(model.decoder.layers):
        handles.append(layer.input_layernorm.register_forward_hook(lambda m, a, o, i=i: keep(("n0", i), o)))
        handles.append(layer.pre_mlp_layernorm.register_forward_hook(lambda m, a, o, i=i: keep(("n1", i), o)))
        handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(
            lambda m, a, i=i: keep(("proj", i), a[0])))
        handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(lambda m, a, i=i: keep(("fc2", i), a[0])))
        if hasattr(layer.self_attention.linear_proj, "post_norm"):  # sandwich norms (Gemma 3)
            handles.append(layer.self_attention.linear_proj.post_norm.register_forward_hook(
                lambda m, a, o, i=i: keep(("n2", i), o)))
            handles.append(layer.mlp.linear_fc2.post_norm.register_forward_hook(lambda m, a, o, i=i: keep(("n3", i), o)))
        def io(m, a, k, o, i=i):  # returns None: the output stays untouched
            keep(("in", i), k["hidden_states"])
            keep(("out", i), o[0])

        handles.append(layer.register_forward_hook(io, with_kwargs=True))
    return acts, handles


def close(a, b, what, rtol=1e-4):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    assert err < rtol, f"{what}: relative error {err:.2e}\nplugin {a}\nreference {b}"


def check_independent(model, mc, batches):
    d, hpg = mc.head_dim, mc.num_attention_heads // mc.num_query_groups
    for batch in imp.REDUCTIONS:
        for seq in imp.REDUCTIONS:
            acts, handles = capture(model)
            scores = imp.estimate(model, batches, imp.Aggregation(batch, seq), progress=False)
            for h in handles:
                h.remove()
            X = {k: torch.cat(v, dim=1) for k, v in acts.items()}  # [s, N, c]
            hidden_ref = 0
            for i in range(mc.num_layers):
                ffn_ref = spec_score(X[("fc2", i)], batch, seq)
                for c in (0, 7, mc.ffn_hidden_size - 1):
                    close(scores["ffn"][i, c], ffn_ref[c], f"ffn[{i},{c}] ({batch},{seq})")
                ch = spec_score(X[("proj", i)], batch, seq)  # per channel of the concatenated heads
                for h in (0, mc.num_attention_heads - 1):
                    close(scores["heads"][i, h], ch[h * d:(h + 1) * d].norm(), f"head[{i},{h}] ({batch},{seq})")
                for g in range(mc.num_query_groups):
                    close(scores["groups"][i, g], ch[g * hpg * d:(g + 1) * hpg * d].norm(), f"group[{i},{g}]")
                for n in ("n0", "n1", "n2", "n3"):
                    if (n, i) in X:
                        hidden_ref = hidden_ref + spec_score(X[(n, i)], batch, seq)
                a, b = X[("in", i)].double(), X[("out", i)].double()
                cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
                close(scores["layer_bi"][i], 1 - cos.mean(), f"BI[{i}]")
            for c in (0, 13, mc.hidden_size - 1):
                close(scores["hidden"][c], hidden_ref[c], f"hidden[{c}] ({batch},{seq})")
    runtime.print0("OK independent check (9 aggregations)")
    return imp.estimate(model, batches, progress=False)


# ----------------------------------------------------------------------------- 2. masking equivalence
def masked_reference(model, mc, new_mc, plan):
    """The unpruned model with every dropped fc2 / proj input column zeroed (same layer numbering)."""
    ref = build_model(mc)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for j, i in enumerate(plan.layers):
            layer = ref.decoder.layers[i]
            keep_ffn = torch.zeros(mc.ffn_hidden_size, dtype=torch.bool)
            keep_ffn[plan.ffn[j]] = True
            layer.mlp.linear_fc2.weight[:, ~keep_ffn] = 0
            keep_proj = torch.zeros(mc.num_attention_heads * mc.head_dim, dtype=torch.bool)
            keep_proj[proj_cols(mc, plan.groups[j], plan.heads[j])] = True
            layer.self_attention.linear_proj.weight[:, ~keep_proj] = 0
    return ref


def check_masking(model, mc, scores, tokens, family):
    base = full_logits(model, tokens)
    cases = {
        "ffn": Targets(target_ffn_hidden_size=48, grid=16),
        "heads": Targets(target_num_attention_heads=2),
        "groups": Targets(target_num_query_groups=1),
        "ffn+groups+depth": Targets(target_ffn_hidden_size=32, target_num_query_groups=1, target_num_layers=2,
                                    grid=16),
    }
    for name, t in cases.items():
        new_mc = validate(mc, t, 1, 1)
        kept = depth.select_layers(mc, new_mc.num_layers, scores, "bi")
        new_mc = new_mc.replace(**mc.window_of_layers(kept))  # as prune/api.py: each kept layer's attention kind
        plan = make_plan(mc, new_mc, scores, kept)
        pruned = trim_model(model, mc, new_mc, plan)
        ref = masked_reference(model, mc, new_mc, plan)
        dropped = set(range(mc.num_layers)) - set(kept)
        with depth.skip_layers(ref, mc.num_layers, dropped):
            want = full_logits(ref, tokens)
        got = full_logits(pruned, tokens)
        l0 = pruned.decoder.layers[0]
        assert len(pruned.decoder.layers) == new_mc.num_layers
        assert l0.mlp.linear_fc2.weight.shape[1] == new_mc.ffn_hidden_size
        assert l0.self_attention.linear_proj.weight.shape[1] == new_mc.num_attention_heads * mc.head_dim
        diff = (got - want).abs().max().item()
        changed = (want - base).abs().max().item()
        assert diff < 1e-4, f"{family} {name}: pruned vs masked logits differ by {diff}"
        assert changed > 1e-3, f"{family} {name}: masking changed nothing ({changed}); test is vacuous"
        runtime.print0(f"OK masking equivalence {family} {name}: |diff|={diff:.1e} (masking moved logits "
                       f"by {changed:.2f}; kept layers {kept})")


# ----------------------------------------------------------------------------- 3. parameter count
def check_count(mc):
    for t in (Targets(), Targets(target_hidden_size=32, target_ffn_hidden_size=48, target_num_attention_heads=2,
                                 target_num_layers=2, grid=16), Targets(target_num_query_groups=1)):
        c = validate(mc, t, 1, 1)
        model = build_model(c)
        numel = sum(p.numel() for p in model.parameters())
        pad = (c.padded_vocab_size - c.vocab_size) * c.hidden_size
        numel -= pad * (1 if c.share_embeddings_and_output_weights else 2)
        assert numel == count_parameters(c), f"{c}: built {numel} != analytic {count_parameters(c)}"
    runtime.print0(f"OK count_parameters {mc.family}")


def main():
    runtime.init_distributed(1, 1)
    for n, family in enumerate(FAMILIES):
        mc = small_config(family)
        torch.manual_seed(n)
        model = build_model(mc)
        randomize(model, seed=n)
        model.eval()
        batches = batches_of(mc)
        scores = check_independent(model, mc, batches) if family in INDEPENDENT else \
            imp.estimate(model, batches, progress=False)
        check_masking(model, mc, scores, batches[0]["tokens"], family)
        check_count(mc)
    runtime.shutdown()


if __name__ == "__main__":
    main()
