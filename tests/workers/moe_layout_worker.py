"""Expert layouts: Megatron-Core's ``SequentialMLP`` and its legacy ``GroupedMLP`` share one checkpoint format.

usage: moe_layout_worker.py WORKDIR        (python, 1 process: EP=1; run this first)
       moe_layout_worker.py WORKDIR ep2    (torchrun --nproc_per_node 2: EP=2)

``build_model(mc, grouped_gemm=False)`` gives one MLP per expert (``SequentialMLP``); ``grouped_gemm=True``
without Transformer Engine gives the legacy ``GroupedMLP`` (``weight1``/``weight2`` hold all local experts).
Megatron-Core says both write the same sharded state dict (one logical tensor per global expert); the
project's recipes rely on it (import/prune/export use the sequential layout, GPU training the grouped one).
This worker checks it through ``store.save_checkpoint`` / ``store.load_weights``, fp32:

  a. sequential checkpoint -> grouped model: the same logits; the grouped weights hold each expert exactly
     where ``GroupedMLP.forward`` reads it;
  b. grouped checkpoint -> sequential model: the same logits;
  c. the loads change the target model (every expert tensor and the logits move away from its fresh init);
  c'. both layouts' checkpoints (and EP=2's and EP=1's) hold the same tensors: keys, global shapes, dtypes;
  d. at EP=2 the same, plus the EP=1 checkpoints (both layouts, WORKDIR/ck_*_ep1) load into the EP=2
     models with the EP=1 logits;
  e. a backward pass through the grouped model gives each expert the gradient the sequential model gives it
     (and the same gradients of every other parameter); at EP=2 each expert's gradient is twice its EP=1
     gradient (both ranks feed the same tokens).

Reference grouped GEMM. ``GroupedMLP.forward`` calls ``grouped_gemm.ops.gmm`` (the CUDA-only, bf16-only
``grouped_gemm`` package) through ``megatron.core.transformer.moe.grouped_gemm_util``. This worker installs a
torch stand-in for that CUDA kernel, with the kernel's semantics as defined by the package's own reference
(``gmm`` in grouped_gemm's ``ops_test.py``): ``a`` [tokens, k] is cut into consecutive row blocks of
``batch_sizes`` (a 1-D int64 CPU tensor, as the kernel requires) and block ``i`` is multiplied by ``b[i]``
([k, n]) or ``b[i].T`` with ``trans_b``; the blocks are concatenated. Autograd differentiates it. The kernel
is not under test here; what is under test is Megatron-Core's own code: how ``GroupedMLP`` lays the experts
out in ``weight1``/``weight2`` (its forward's views and its ``sharded_state_dict``) and the dist-checkpoint
format. ``GroupedMLP.forward`` also asserts ``config.bf16`` (the kernel is bf16-only); the worker sets that
flag on a private copy of each ``GroupedMLP``'s config (nothing else there reads it), so the math stays fp32.

Megatron-Core 0.19 removed ``GroupedMLP`` (and ``grouped_gemm_util``); its local spec builds
``SequentialMLP`` even with ``moe_grouped_gemm``. There the worker prints ``SKIP ...`` and exits 0.
TE's ``TEGroupedMLP`` is not exercised (Transformer Engine does not install on CPU).
"""

import copy
import os
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moe_prune_worker as mpw  # noqa: E402  (small_config, randomize, batches_of, close)
from megatron.core import parallel_state as ps  # noqa: E402

from minitron_nemo import runtime  # noqa: E402
from minitron_nemo.checkpoint import store  # noqa: E402
from minitron_nemo.models.builder import build_model  # noqa: E402
from minitron_nemo.models.forward import full_logits, position_ids_like  # noqa: E402

FAMILY = "mixtral"
GMM_CALLS = [0]


def gmm(a, b, batch_sizes, trans_b=False):
    """Torch reference of ``grouped_gemm.ops.gmm`` (stands in for the CUDA kernel; see the module doc)."""
    assert batch_sizes.device.type == "cpu" and batch_sizes.dim() == 1 and batch_sizes.dtype == torch.int64, \
        (batch_sizes.device, batch_sizes.dtype, batch_sizes.shape)
    assert a.dim() == 2 and b.dim() == 3 and b.shape[0] == batch_sizes.numel(), (a.shape, b.shape, batch_sizes)
    assert int(batch_sizes.sum()) == a.shape[0], (batch_sizes, a.shape)
    assert b.shape[2 if trans_b else 1] == a.shape[1], (a.shape, b.shape, trans_b)
    GMM_CALLS[0] += 1
    blocks = torch.split(a, batch_sizes.tolist())
    return torch.cat([x @ (b[i].t() if trans_b else b[i]) for i, x in enumerate(blocks)])


def install_reference_gmm() -> bool:
    """Make ``GroupedMLP`` buildable and runnable on CPU; False where Megatron-Core has no ``GroupedMLP``."""
    try:
        from megatron.core.transformer.moe import experts, grouped_gemm_util as gg
    except ImportError:
        return False
    if not hasattr(experts, "GroupedMLP"):
        return False
    ops = types.SimpleNamespace(gmm=gmm)
    gg.grouped_gemm = types.SimpleNamespace(ops=ops, __name__="reference_grouped_gemm")  # is_available()
    gg.ops = ops  # experts.py calls gg.ops.gmm
    return True


def grouped_modules(model):
    return [layer.mlp.experts for layer in model.decoder.layers]


def build(mc, grouped):
    model = build_model(mc, grouped_gemm=grouped)
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP

    want = GroupedMLP if grouped else SequentialMLP
    for m in grouped_modules(model):
        assert type(m) is want, f"grouped_gemm={grouped} built {type(m).__name__}, expected {want.__name__}"
        if grouped:  # GroupedMLP.forward asserts config.bf16 (a guard for the bf16-only kernel)
            m.config = copy.copy(m.config)
            m.config.bf16 = True
    model.eval()
    return model


def n_local(mc):
    return mc.num_moe_experts // ps.get_expert_model_parallel_world_size()


def first_expert(mc):
    return ps.get_expert_model_parallel_rank() * n_local(mc)


def seq_expert_weights(model, mc, grads=False):
    """``{(layer, global expert, 'fc1'|'fc2'): tensor}`` of a sequential model (the HF-like [out, in])."""
    out = {}
    for i, layer in enumerate(model.decoder.layers):
        for e, ex in enumerate(layer.mlp.experts.local_experts):
            for fc in ("linear_fc1", "linear_fc2"):
                w = getattr(ex, fc).weight
                out[(i, first_expert(mc) + e, fc)] = (w.grad if grads else w).detach().clone()
    return out


def grouped_expert_weights(model, mc, grads=False):
    """The same view of a ``GroupedMLP`` model, read the way ``GroupedMLP.forward`` reads its weights:
    ``weight1.view(E_local, hidden, -1)[e]`` ([hidden, 2 * ffn] for SwiGLU: gate then up columns) and
    ``weight2.view(E_local, -1, hidden)[e]`` ([ffn, hidden]); transposed to the sequential [out, in]."""
    h, out = mc.hidden_size, {}
    for i, m in enumerate(grouped_modules(model)):
        w1 = m.weight1.grad if grads else m.weight1
        w2 = m.weight2.grad if grads else m.weight2
        assert w1.shape == (h, n_local(mc) * mc.moe_ffn_hidden_size * 2), w1.shape
        assert w2.shape == (n_local(mc) * mc.moe_ffn_hidden_size, h), w2.shape
        w1, w2 = w1.detach().view(n_local(mc), h, -1), w2.detach().view(n_local(mc), -1, h)
        for e in range(n_local(mc)):
            out[(i, first_expert(mc) + e, "linear_fc1")] = w1[e].t().clone()
            out[(i, first_expert(mc) + e, "linear_fc2")] = w2[e].t().clone()
    return out


def randomize_grouped(model, mc, seed):
    """Random weights for a grouped model, the same at any EP: the non-expert tensors as
    ``moe_prune_worker.randomize``; each expert's block of ``weight1``/``weight2`` from a generator seeded by
    (seed, layer, global expert)."""
    mpw.randomize(model, seed)
    h, f, n = mc.hidden_size, mc.moe_ffn_hidden_size, n_local(mc)
    with torch.no_grad():
        for i, m in enumerate(grouped_modules(model)):
            w1, w2 = m.weight1.view(n, h, 2 * f), m.weight2.view(n, f, h)
            for e in range(n):
                g = torch.Generator().manual_seed(seed * 7919 + i * 101 + first_expert(mc) + e)
                w1[e].copy_(torch.randn(h, 2 * f, generator=g) * 0.15)
                w2[e].copy_(torch.randn(f, h, generator=g) * 0.15)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item(), (a - b).abs().max().item()


def same_logits(got, want, what):
    r, d = rel(got, want)
    assert r < 1e-5, f"{what}: logits differ, relative {r:.2e} (max |diff| {d:.2e})"
    return f"max|diff|={d:.1e} rel={r:.1e}"


def load_into(model, ckpt, what):
    """``store.load_weights`` and check (c): every expert tensor and the logits changed."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    store.load_weights(model, ckpt)
    after = model.state_dict()
    experts = [k for k in before if ".mlp.experts." in k and not k.endswith("_extra_state")]
    assert experts, sorted(before)[:10]
    unchanged = [k for k in experts if torch.equal(before[k], after[k])]
    assert not unchanged, f"{what}: the load left expert tensors as built: {unchanged[:4]}"
    moved = sum(not torch.equal(before[k], after[k]) for k in before if not k.endswith("_extra_state"))
    return moved, len([k for k in before if not k.endswith("_extra_state")])


def transfer(src, mc, tokens, ck, what):
    """(a) / (b): save ``src``, load the checkpoint into a fresh model of the other layout. Checks the same
    logits, the expert weights bitwise where each layout reads them, and (c) that the load changed the model.
    Returns (loaded model, ``src``'s logits, logits summary, tensors changed, tensors, logits moved)."""
    grouped = not hasattr(src.decoder.layers[0].mlp.experts, "local_experts")
    want = full_logits(src, tokens)
    store.save_checkpoint(src, ck, mc)
    dst = build(mc, grouped=not grouped)
    fresh = full_logits(dst, tokens)
    moved, total = load_into(dst, ck, what)
    GMM_CALLS[0] = 0
    msg = same_logits(full_logits(dst, tokens), want, what)
    if not grouped:
        assert GMM_CALLS[0] == 2 * mc.num_layers, f"grouped GEMM ran {GMM_CALLS[0]} times, expected fc1+fc2 per layer"
    seq, grp = (dst, src) if grouped else (src, dst)
    ws, wg = seq_expert_weights(seq, mc), grouped_expert_weights(grp, mc)
    assert ws.keys() == wg.keys() and all(torch.equal(ws[k], wg[k]) for k in ws), \
        [k for k in ws if not torch.equal(ws[k], wg[k])][:4]
    change = (fresh - want).abs().max().item()
    assert change > 1e-2, f"(c) the fresh model already gave these logits ({change}); test is vacuous"
    return dst, want, msg, moved, total, change


def same_format(cks, what):
    """The checkpoints hold the same tensors: keys, global shapes, dtypes (dist-checkpoint metadata)."""
    from megatron.core import dist_checkpointing

    metas = [dist_checkpointing.load_tensors_metadata(str(c / "weights")) for c in cks]
    for c, m in zip(cks[1:], metas[1:]):
        assert m.keys() == metas[0].keys(), f"{what}: {c.name} keys {sorted(m.keys() ^ metas[0].keys())}"
        for k in m:
            a, b = m[k], metas[0][k]
            assert (a.global_shape, a.dtype) == (b.global_shape, b.dtype), \
                f"{what}: {k} is {a.global_shape} {a.dtype} in {c.name}, {b.global_shape} {b.dtype} in {cks[0].name}"
    key = next(k for k in metas[0] if k.endswith("experts.linear_fc1.weight"))
    runtime.print0(f"OK {what}: {', '.join(c.name for c in cks)} hold the same {len(metas[0])} tensors "
                   f"(keys, global shapes, dtypes), e.g. {key} {tuple(metas[0][key].global_shape)}")


def backward(model, batch):
    model.zero_grad(set_to_none=True)
    tokens = batch["tokens"].to(runtime.device())
    loss = model(tokens, position_ids_like(tokens), None, labels=batch["labels"].to(runtime.device())).mean()
    loss.backward()
    return loss.detach()


def check_grads(seq, grp, mc, batch, tag):
    GMM_CALLS[0] = 0
    l_seq, l_grp = backward(seq, batch), backward(grp, batch)
    assert GMM_CALLS[0] > 0, "the grouped model's backward never ran the grouped GEMM"
    r_loss, _ = rel(l_grp, l_seq)
    assert r_loss < 1e-5, (l_grp, l_seq)
    gs, gg_ = seq_expert_weights(seq, mc, grads=True), grouped_expert_weights(grp, mc, grads=True)
    assert gs.keys() == gg_.keys()
    worst, zero = 0.0, 0
    for k in gs:
        if gs[k].abs().max() == 0:
            zero += 1  # an expert no token chose: zero in both layouts
            assert gg_[k].abs().max() == 0, k
            continue
        r, _ = rel(gg_[k], gs[k])
        assert r < 1e-5, f"{tag}: expert gradient {k} differs between layouts: relative {r:.2e}"
        worst = max(worst, r)
    assert zero < len(gs) // 2, f"{tag}: {zero}/{len(gs)} expert gradients are zero; test is vacuous"
    # Every other parameter (embeddings, attention, norms, routers) gets the same gradient too.
    other = dict(grp.named_parameters())
    worst_other, n_other = 0.0, 0
    for name, p in seq.named_parameters():
        if ".mlp.experts." in name:
            continue
        q = other[name]
        assert p.grad is not None and q.grad is not None, name
        if p.grad.abs().max() > 0:
            r, _ = rel(q.grad, p.grad)
            assert r < 1e-5, f"{tag}: gradient of {name} differs between layouts: relative {r:.2e}"
            worst_other, n_other = max(worst_other, r), n_other + 1
    runtime.print0(f"OK backward {tag}: loss {l_grp.item():.4f} (rel {r_loss:.1e}); {len(gs) - zero} expert "
                   f"gradients (weight1/weight2 blocks) match the sequential experts' within rel {worst:.1e}; "
                   f"{n_other} other parameter gradients within rel {worst_other:.1e}")
    return gs


def main():
    work = Path(sys.argv[1])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    assert (sys.argv[2:] == ["ep2"]) == (world == 2), f"args {sys.argv[2:]} at world size {world}"
    runtime.init_distributed(1, 1, expert_model_parallel_size=world)
    ep = ps.get_expert_model_parallel_world_size()
    if not install_reference_gmm():
        import megatron.core

        runtime.print0(f"SKIP megatron-core {megatron.core.__version__} has no legacy GroupedMLP "
                       f"(megatron.core.transformer.moe.experts.GroupedMLP / grouped_gemm_util); its local spec "
                       f"builds SequentialMLP for moe_grouped_gemm: nothing to compare without Transformer Engine")
        runtime.shutdown()
        return
    mc = mpw.MC = mpw.small_config(FAMILY)
    torch.manual_seed(0)
    batches = mpw.batches_of(mc, n_batches=2)
    tokens = batches[0]["tokens"]
    tag = f"ep={ep}"

    # (a) sequential -> grouped.
    seq = build(mc, grouped=False)
    mpw.randomize(seq, seed=1)
    ck_seq = work / f"ck_seq_ep{ep}"
    grp, want, msg, moved, total, change = transfer(seq, mc, tokens, ck_seq,
                                                    f"{tag} sequential checkpoint -> grouped model")
    runtime.print0(f"OK {tag} sequential checkpoint -> grouped model: logits {msg}; every expert block of "
                   f"weight1/weight2 bitwise equal to the sequential expert it came from")
    runtime.print0(f"OK {tag} the load changed the grouped model: {moved}/{total} tensors (all expert tensors), "
                   f"logits moved by {change:.2f} from the fresh model's")

    # (b) grouped -> sequential (the grouped model has its own random weights, not from a sequential one).
    grp2 = build(mc, grouped=True)
    randomize_grouped(grp2, mc, seed=2)
    ck_grp = work / f"ck_grp_ep{ep}"
    _, want2, msg2, moved2, total2, change2 = transfer(grp2, mc, tokens, ck_grp,
                                                       f"{tag} grouped checkpoint -> sequential model")
    runtime.print0(f"OK {tag} grouped checkpoint -> sequential model: logits {msg2}; expert weights bitwise; "
                   f"the load changed {moved2}/{total2} tensors, logits moved by {change2:.2f}")

    same_format(list(dict.fromkeys([work / "ck_seq_ep1", ck_seq, ck_grp])), f"{tag} checkpoint format")

    # (e) backward through both layouts with the same weights (seq and grp from (a)).
    grads = check_grads(seq, grp, mc, batches[1], tag)

    if ep == 1:
        if runtime.is_rank0():
            torch.save({"seq_logits": want, "grp_logits": want2, "grads": grads}, work / "ep1.pt")
    else:
        # (d) the EP=1 checkpoints of both layouts into the EP=2 models.
        ref = torch.load(work / "ep1.pt")
        out = []
        for ck, key, grouped in ((work / "ck_seq_ep1", "seq_logits", True), (work / "ck_grp_ep1", "grp_logits", True),
                                 (work / "ck_grp_ep1", "grp_logits", False)):
            m = build(mc, grouped=grouped)
            load_into(m, ck, f"{ck.name} -> ep2")
            what = f"{ck.name} -> EP=2 {'grouped' if grouped else 'sequential'}"
            out.append(f"{what}: {same_logits(full_logits(m, tokens), ref[key], what)}")
        same_logits(want, ref["seq_logits"], "EP=2 vs EP=1 sequential")
        runtime.print0("OK ep=2 loads the EP=1 checkpoints with the EP=1 logits: " + "; ".join(out))
        worst = 0.0
        for k, g in grads.items():
            if g.abs().max() > 0:
                r, _ = rel(g, 2 * ref["grads"][k])
                assert r < 1e-5, f"EP=2 gradient of expert {k} is not twice its EP=1 gradient: rel {r:.2e}"
                worst = max(worst, r)
        runtime.print0(f"OK ep=2 expert gradients (global numbering) are twice the EP=1 ones within rel {worst:.1e}")
    runtime.print0(f"OK layouts ep={ep} done")
    runtime.shutdown()


if __name__ == "__main__":
    main()
