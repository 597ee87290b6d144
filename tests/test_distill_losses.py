"""Distillation losses against direct fp64 references (TP=1 in-process, TP=2 under torchrun)."""

import pytest
import torch

from conftest import ROOT, run_torchrun
from kd_reference import reference_kl
from minitron_nemo.distill.config import DistillationConfig
from minitron_nemo.distill.losses import (HiddenProjection, balance, distillation_loss, intermediate_loss,
                                          logits_kl_loss, _VocabParallelKL)
from minitron_nemo.errors import UserError

WORKER = ROOT / "tests" / "workers" / "kd_loss_worker.py"


def _inputs(b=3, s=7, v=53, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    st = torch.randn(b, s, v, generator=g, dtype=torch.float64) * scale
    tt = torch.randn(b, s, v, generator=g, dtype=torch.float64) * scale
    mask = (torch.rand(b, s, generator=g) > 0.3).double()
    mask[0, 0] = 1.0
    return st, tt, mask


def _check(dtype, reverse, tau, top_k, chunk, rtol, atol, seq_first=False, seed=0, grad_rtol=None):
    st, tt, mask = _inputs(seed=seed)
    s_in = st.to(dtype)
    t_in = tt.to(dtype)
    if seq_first:
        s_in, t_in = s_in.transpose(0, 1).contiguous(), t_in.transpose(0, 1).contiguous()
    s_in.requires_grad_()
    out = logits_kl_loss(s_in, t_in, mask, temperature=tau, reverse=reverse, top_k=top_k, chunk_size=chunk,
                         seq_first=seq_first)
    out.loss.backward()
    ref_s = st.to(dtype).double().requires_grad_()
    ref = reference_kl(ref_s, tt.to(dtype), mask, tau, reverse, top_k)
    ref.backward()
    grad = s_in.grad.transpose(0, 1) if seq_first else s_in.grad
    torch.testing.assert_close(out.loss.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), ref_s.grad, rtol=grad_rtol or rtol, atol=atol)
    assert out.num_tokens.item() == mask.sum().item()
    torch.testing.assert_close(out.loss_sum / out.num_tokens, out.loss)
    if top_k != 1:   # top-1 renormalised is always 0; otherwise random logits diverge clearly
        assert out.loss.item() > 0.1


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("top_k", [None, 1, 6])
@pytest.mark.parametrize("chunk", [None, 5])
def test_kl_matches_reference_fp64(reverse, tau, top_k, chunk):
    _check(torch.float64, reverse, tau, top_k, chunk, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("top_k", [None, 6])
def test_kl_matches_reference_fp32_and_bf16(reverse, top_k):
    _check(torch.float32, reverse, 2.0, top_k, 4, rtol=1e-4, atol=1e-6)
    # bf16 inputs, fp32 math: equals the fp64 reference on the same rounded values (the grad is bf16).
    _check(torch.bfloat16, reverse, 1.0, top_k, 4, rtol=1e-4, atol=1e-6, grad_rtol=8e-3)


def test_kl_seq_first_layout():
    _check(torch.float64, False, 1.0, None, 3, rtol=1e-10, atol=1e-12, seq_first=True)


def test_kl_gradcheck():
    """Finite differences, independent of the analytic backward."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 9, generator=g, dtype=torch.float64)
    for reverse in (False, True):
        assert torch.autograd.gradcheck(lambda x: _VocabParallelKL.apply(x, t, 1.7, reverse, 4, None), (s,))


def test_chunked_equals_unchunked():
    st, tt, mask = _inputs(b=2, s=33, v=101, seed=7)
    res = []
    for chunk in (1, 7, 10_000):
        x = st.float().requires_grad_()
        out = logits_kl_loss(x, tt.float(), mask, chunk_size=chunk)
        out.loss.backward()
        res.append((out.per_token, x.grad))
    for per_token, grad in res[1:]:
        torch.testing.assert_close(per_token, res[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, res[0][1], rtol=1e-6, atol=1e-9)


def test_kl_mask_and_teacher_grad():
    st, tt, mask = _inputs()
    t = tt.clone().requires_grad_()
    s = st.clone().requires_grad_()
    out = logits_kl_loss(s, t, mask)
    out.loss.backward()
    assert t.grad is None
    assert (s.grad[mask == 0] == 0).all() and (s.grad[mask == 1].abs().sum(-1) > 0).all()
    assert (out.per_token[mask == 0] == 0).all()
    zero = logits_kl_loss(st, tt, torch.zeros_like(mask))
    assert zero.loss.item() == 0.0 and zero.num_tokens.item() == 0
    same = logits_kl_loss(st, st.clone(), mask)
    assert abs(same.loss.item()) < 1e-12


def test_kl_shape_errors():
    st, tt, mask = _inputs()
    with pytest.raises(UserError, match="differ in shape"):
        logits_kl_loss(st, tt[..., :-1], mask)
    with pytest.raises(UserError, match="loss_mask shape"):
        logits_kl_loss(st, tt, mask.t())
    with pytest.raises(UserError, match="logit_kl_topk=99"):
        logits_kl_loss(st, tt, mask, top_k=99)


def test_kl_tensor_parallel_2():
    p = run_torchrun(WORKER, 2, 2)
    assert p.stdout.count("OK 48 checks") == 2, p.stdout


# ----------------------------------------------------------------------------- intermediate + balancer

def _hidden(s=6, b=3, hs=8, ht=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, hs, generator=g, dtype=torch.float64),
            torch.randn(s, b, ht, generator=g, dtype=torch.float64),
            (torch.rand(b, s, generator=g) > 0.3).double())


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_intermediate_matches_reference(kind):
    hs, ht, mask = _hidden()
    proj = HiddenProjection(8, 12).double()
    out = intermediate_loss(hs, ht, mask, kind, proj)
    p = hs @ proj.fit.weight.t() + proj.fit.bias           # [s, b, 12]
    if kind == "cosine":
        per = 1 - (p * ht).sum(-1) / (p.norm(dim=-1) * ht.norm(dim=-1))
    else:
        per = ((p - ht) ** 2).sum(-1) / ht.shape[-1]
    ref = (per * mask.t()).sum() / mask.sum()
    torch.testing.assert_close(out.loss, ref.float(), rtol=1e-5, atol=1e-6)
    assert out.per_token.shape == mask.shape and (out.per_token[mask == 0] == 0).all()
    out.loss.backward()
    assert proj.fit.weight.grad is not None and proj.fit.weight.grad.abs().sum() > 0
    assert isinstance(HiddenProjection(8, 8).fit, torch.nn.Identity)


def test_intermediate_needs_projection():
    hs, ht, mask = _hidden()
    with pytest.raises(UserError, match="HiddenProjection"):
        intermediate_loss(hs, ht, mask)


def test_balancer():
    lg = torch.tensor(2.0, requires_grad=True)
    li = torch.tensor(0.5, requires_grad=True)
    total = balance(lg, li)
    torch.testing.assert_close(total, torch.tensor(4.0))          # alpha * L_is == L_logits
    total.backward()
    torch.testing.assert_close(li.grad, torch.tensor(4.0))        # alpha = 2 / 0.5, detached
    torch.testing.assert_close(lg.grad, torch.tensor(1.0))
    # LM mixing as modelopt: kd rescaled to the LM value, then lm + scale * kd.
    lg, lm = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    total = balance(lg, None, lm, skip_lm_loss=False, kd_loss_scale=0.5)
    torch.testing.assert_close(total, torch.tensor(3.0 + 0.5 * 3.0))
    total.backward()
    torch.testing.assert_close(lg.grad, torch.tensor(0.5 * 3.0 / 2.0))
    torch.testing.assert_close(lm.grad, torch.tensor(1.0))
    assert balance(torch.tensor(2.0), torch.tensor(0.0)).item() == 2.0
    with pytest.raises(UserError, match="skip_lm_loss"):
        balance(lg, None, None, skip_lm_loss=False)


def test_distillation_loss_components():
    st, tt, mask = _inputs(b=3, s=6, v=40)
    hs, ht, _ = _hidden(s=6, b=3)
    cfg = DistillationConfig.from_dict({"intermediate_layer_pairs": [["decoder.final_layernorm",
                                                                      "decoder.final_layernorm"],
                                                                     ["decoder.layers.0", "decoder.layers.0", "mse"]],
                                        "logit_kl_temperature": 2.0})
    proj = HiddenProjection(8, 12).double()
    s = st.clone().requires_grad_()
    out = distillation_loss(cfg, s, tt, mask, hidden_pairs=[(hs, ht), (hs, ht)], projection=proj)
    ref_logits = reference_kl(st, tt, mask, tau=2.0)
    ref_inter = (intermediate_loss(hs, ht, mask, "cosine", proj).loss
                 + intermediate_loss(hs, ht, mask, "mse", proj).loss) / 2
    torch.testing.assert_close(out["logits"].double(), ref_logits)
    torch.testing.assert_close(out["intermediate"], ref_inter)
    torch.testing.assert_close(out["total"].double(), 2 * ref_logits)
    assert out["lm"].item() == 0.0 and out["num_tokens"].item() == mask.sum().item()
    out["total"].backward()
    assert s.grad is not None and proj.fit.weight.grad is not None
    # With the LM loss (per-token [b, s], masked here).
    cfg = DistillationConfig(skip_lm_loss=False, kd_loss_scale=2.0)
    lm_tok = torch.rand(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 1
    out = distillation_loss(cfg, st, tt, mask, lm_loss=lm_tok)
    lm = (lm_tok * mask).sum() / mask.sum()
    # the reported losses are fp32: compare at fp32 resolution
    torch.testing.assert_close(out["lm"].double(), lm, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["total"].double(), lm + 2.0 * lm, rtol=1e-6, atol=0)
    with pytest.raises(UserError, match="hidden-state pairs"):
        distillation_loss(DistillationConfig(intermediate_layer_pairs=[["a", "b"]]), st, tt, mask)


# ----------------------------------------------------------------------------- config

def test_config_defaults_and_yaml(tmp_path):
    p = tmp_path / "distill.yaml"
    p.write_text("logit_layers: [output_layer, output_layer]\n"
                 "intermediate_layer_pairs:\n  - [decoder.final_layernorm, decoder.final_layernorm, cosine]\n"
                 "  - [decoder.layers.3, decoder.layers.7]\n"
                 "skip_lm_loss: true\nkd_loss_scale: 1.0\nlogit_kl_temperature: 1.0\nlogit_kl_topk: null\n")
    cfg = DistillationConfig.from_yaml(p)
    assert cfg.logit_layers == ("output_layer", "output_layer")
    assert cfg.intermediate_layer_pairs == [("decoder.final_layernorm", "decoder.final_layernorm", "cosine"),
                                            ("decoder.layers.3", "decoder.layers.7", "cosine")]
    assert cfg.kl_direction == "forward" and not cfg.reverse_kl and cfg.logit_kl_topk is None
    assert DistillationConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad, match", [
    ({"kl_direction": "sideways"}, "kl_direction='sideways'.*allowed: forward, reverse"),
    ({"logit_kl_temperature": 0}, "logit_kl_temperature=0"),
    ({"kd_loss_scale": -1.0}, "kd_loss_scale=-1.0"),
    ({"logit_kl_topk": 0}, "logit_kl_topk=0"),
    ({"intermediate_layer_pairs": [["a", "b", "l1"]]}, "'l1'.*allowed: cosine, mse"),
    ({"intermediate_layer_pairs": [["a"]]}, "entry \\['a'\\]"),
    ({"logit_layers": ["output_layer"]}, "logit_layers"),
    ({"skip_lm_loss": "yes"}, "skip_lm_loss"),
    ({"kl_chunk_size": 0}, "kl_chunk_size=0"),
    ({"criterion": {}}, "unknown distillation config key"),
])
def test_config_errors(bad, match):
    with pytest.raises(UserError, match=match) as e:
        DistillationConfig.from_dict(bad)
    assert "\n" not in str(e.value)
