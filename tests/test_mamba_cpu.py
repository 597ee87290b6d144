"""The torch stand-ins for the Mamba CUDA kernels (minitron_nemo/models/mamba_cpu.py) and Megatron-Core's own
``MambaMixer`` running on them in CPU mode.

Each stand-in equals an independent reference on a tiny random Nemotron-H mixer (hidden 64, 8 heads of 16,
2 groups, state 16, kernel 4, chunks of 8) over 37 tokens (several chunks, the last one partial), in fp32:
transformers' torch path (its convolution, chunk scan, gated RMSNorm and whole mixer) and a step-by-step
recurrence. Megatron-Core's ``MambaMixer`` (TP=1, one gloo rank), built after ``install_cpu_kernels()`` and
given the transformers mixer's weights, gives the same output and gradients on its fused training path and
on its unfused path. None of this has ``mamba_ssm`` or ``causal_conv1d`` installed."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from minitron_nemo.models import mamba_cpu

HIDDEN, HEADS, HEAD_DIM, GROUPS, STATE, KERNEL, CHUNK = 64, 8, 16, 2, 16, 4, 8
SEQ, BATCH = 37, 2
D_INNER = HEADS * HEAD_DIM
CONV_DIM = D_INNER + 2 * GROUPS * STATE


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(ours, ref, rtol=1e-5) -> float:
    """Max abs difference, asserted within ``rtol`` of the reference's largest magnitude."""
    diff = float((ours.double() - ref.double()).abs().max())
    assert diff <= rtol * max(float(ref.abs().max()), 1e-12), (diff, float(ref.abs().max()))
    return diff


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def nemotron_h():
    import transformers.models.nemotron_h.modeling_nemotron_h as hf

    return hf


def hf_mixer(time_step_min: float = 0.0):
    """transformers' Nemotron-H Mamba-2 mixer, tiny, with every parameter random (seed 0). ``time_step_min``
    is the lower clamp transformers applies to dt; Megatron-Core's mixer has none, so 0 for parity."""
    from transformers import NemotronHConfig

    cfg = NemotronHConfig(hidden_size=HIDDEN, mamba_num_heads=HEADS, mamba_head_dim=HEAD_DIM, n_groups=GROUPS,
                          ssm_state_size=STATE, conv_kernel=KERNEL, chunk_size=CHUNK, num_hidden_layers=1,
                          layer_types=["mamba"], time_step_min=time_step_min, layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    mixer = nemotron_h().NemotronHMamba2Mixer(cfg, layer_idx=0)
    g = gen(1)
    with torch.no_grad():
        mixer.A_log.copy_(torch.log(1 + 15 * torch.rand(HEADS, generator=g)))
        mixer.D.copy_(0.5 + torch.rand(HEADS, generator=g))
        dt = torch.exp(torch.rand(HEADS, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                       + torch.log(torch.tensor(1e-3)))
        mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        mixer.conv1d.weight.copy_(0.5 * torch.randn(mixer.conv1d.weight.shape, generator=g))
        mixer.conv1d.bias.copy_(0.1 * torch.randn(CONV_DIM, generator=g))
        mixer.norm.weight.copy_(1 + 0.2 * torch.randn(D_INNER, generator=g))
    return mixer


def scan_inputs(seed: int = 2) -> dict:
    g = gen(seed)
    return dict(x=torch.randn(BATCH, SEQ, HEADS, HEAD_DIM, generator=g),
                dt=torch.randn(BATCH, SEQ, HEADS, generator=g) - 2,
                A=-(1 + 15 * torch.rand(HEADS, generator=g)),
                B=torch.randn(BATCH, SEQ, GROUPS, STATE, generator=g),
                C=torch.randn(BATCH, SEQ, GROUPS, STATE, generator=g))


def recurrence(x, dt, A, B, C, initial=None):
    """The SSM one step at a time: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t (dt already
    biased/activated; B and C per group, group g serving heads g*H/G ..)."""
    per = x.shape[2] // B.shape[2]
    B, C = B.repeat_interleave(per, 2), C.repeat_interleave(per, 2)
    h = torch.zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1]) if initial is None else initial.clone()
    ys = []
    for t in range(x.shape[1]):
        h = h * torch.exp(dt[:, t] * A)[:, :, None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(ys, 1), h


# ----------------------------------------------------------------------------- (a) each stand-in
def test_causal_conv1d_matches_transformers_and_carries_states():
    g = gen(3)
    x = torch.randn(BATCH, CONV_DIM, SEQ, generator=g)
    w, b = torch.randn(CONV_DIM, KERNEL, generator=g), torch.randn(CONV_DIM, generator=g)
    ref = nemotron_h().causal_conv1d_fn(x, w, b, activation="silu")
    close(mamba_cpu.causal_conv1d_fn(x, w, b, activation="silu"), ref)
    close(mamba_cpu.causal_conv1d_fn(x, w, None), nemotron_h().causal_conv1d_fn(x, w, None))
    # the second half of the sequence from the first half's last inputs: the same outputs, the same final states
    out, final = mamba_cpu.causal_conv1d_fn(x[..., 20:], w, b, initial_states=x[..., 17:20], activation="silu",
                                            return_final_states=True)
    close(out, ref[..., 20:])
    assert torch.equal(final, x[..., -(KERNEL - 1):])


def test_gated_rms_norm_matches_transformers():
    g = gen(4)
    x, z = torch.randn(BATCH, SEQ, D_INNER, generator=g), torch.randn(BATCH, SEQ, D_INNER, generator=g)
    ref_norm = nemotron_h().NemotronHRMSNormGated(D_INNER, group_size=D_INNER // GROUPS, eps=1e-5)
    ours = mamba_cpu.GatedRMSNorm(D_INNER, eps=1e-5, group_size=D_INNER // GROUPS, norm_before_gate=False)
    with torch.no_grad():
        ref_norm.weight.copy_(1 + 0.3 * torch.randn(D_INNER, generator=g))
        ours.weight.copy_(ref_norm.weight)
    close(ours(x, z), ref_norm(x, z))
    close(ours(x), ref_norm(x))
    # the gate after the norm (norm_before_gate=True): the ungated norm times silu(z)
    close(mamba_cpu.gated_rms_norm(x, z, ours.weight, eps=1e-5, group_size=D_INNER // GROUPS),
          ref_norm(x) * F.silu(z))


def test_chunk_scan_matches_transformers_and_the_recurrence():
    s = scan_inputs()
    g = gen(5)
    D, dt_bias = torch.rand(HEADS, generator=g) + 0.5, torch.randn(HEADS, generator=g)
    z = torch.randn(BATCH, SEQ, HEADS, HEAD_DIM, generator=g)
    initial = torch.randn(BATCH, HEADS, HEAD_DIM, STATE, generator=g)
    limit = (0.05, 2.0)  # binds for some steps: softplus(dt + bias) spans ~0.01 .. 3
    step = F.softplus(s["dt"] + dt_bias)
    assert (step < limit[0]).any() and (step > limit[1]).any()
    kw = dict(D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=limit, initial_states=initial, return_final_states=True)

    y, final = mamba_cpu.mamba_chunk_scan_combined(*s.values(), CHUNK, **kw)
    y_hf, final_hf = nemotron_h().mamba2_chunk_scan(*s.values(), CHUNK, **kw)
    close(y, y_hf), close(final, final_hf)

    y_rec, final_rec = recurrence(s["x"], step.clamp(*limit), s["A"], s["B"], s["C"], initial)
    close(y, y_rec + D[:, None] * s["x"]), close(final, final_rec)
    # the z gate, D per channel, one chunk for the whole sequence: the same outputs
    D2 = D[:, None] + 0.1 * torch.randn(HEADS, HEAD_DIM, generator=g)
    kw.update(D=D2, z=z, return_final_states=False)
    gated = mamba_cpu.mamba_chunk_scan_combined(*s.values(), CHUNK, **kw)
    close(gated, (y_rec + D2 * s["x"]) * F.silu(z))
    close(mamba_cpu.mamba_chunk_scan_combined(*s.values(), 64, **kw), gated)


def test_fused_step_equals_the_transformers_mixer():
    """The fused training step with the norm and the output projection is the whole mixer after in_proj."""
    mixer = hf_mixer(time_step_min=0.001)  # transformers clamps dt at time_step_min: pass the same limit
    h = torch.randn(BATCH, SEQ, HIDDEN, generator=gen(6))
    with torch.no_grad():
        ref = mixer(h)
        ours = mamba_cpu.mamba_split_conv1d_scan_combined(
            mixer.in_proj(h), mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, mixer.dt_bias,
            -torch.exp(mixer.A_log.float()), mixer.D, CHUNK, dt_limit=mixer.time_step_limit, activation="silu",
            rmsnorm_weight=mixer.norm.weight, rmsnorm_eps=mixer.norm.variance_epsilon,
            outproj_weight=mixer.out_proj.weight, outproj_bias=mixer.out_proj.bias, headdim=HEAD_DIM,
            ngroups=GROUPS, norm_before_gate=False)
    close(ours, ref)


def test_einops_stand_in():
    t = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    r, rep = mamba_cpu._rearrange, mamba_cpu._repeat
    assert torch.equal(r(t, "l b d p -> b l d p"), t.transpose(0, 1))
    assert torch.equal(r(t, "b l (h p) q -> b l h p q", p=2), t.reshape(2, 3, 2, 2, 5))
    assert torch.equal(r(t, "b l h p -> l b (h p)"), t.transpose(0, 1).reshape(3, 2, 20))
    assert torch.equal(r(t[:, :1], "d 1 w p -> d w p"), t[:, 0])
    assert torch.equal(r(t[0, 0, 0], "h -> h 1"), t[0, 0, 0, :, None])
    v = torch.arange(6.0)
    assert torch.equal(rep(v, "h -> (h p)", p=3), v.repeat_interleave(3))
    assert torch.equal(rep(v, "h -> h p n", p=2, n=4), v[:, None, None].expand(6, 2, 4))
    bc = torch.arange(24.0).reshape(2, 12)  # l b (g n) -> l b (g r n), as Megatron's context parallelism repeats groups
    assert torch.equal(rep(bc[None], "l b (g n) -> l b (g r n)", g=2, n=6, r=2)[0],
                       bc.reshape(2, 2, 1, 6).expand(2, 2, 2, 6).reshape(2, 24))
    if importlib.util.find_spec("einops") is not None:
        import einops

        pattern = "b l (h p) q -> q (b l) h p"
        assert torch.equal(r(t, pattern, h=2), einops.rearrange(t, pattern, h=2))


# ----------------------------------------------------------------------------- (b) Megatron-Core's MambaMixer
@pytest.fixture(scope="module")
def megatron_mamba():
    """``megatron.core.ssm.mamba_mixer`` with the stand-ins installed, in a 1-rank gloo parallel state."""
    from minitron_nemo import runtime

    env = dict(os.environ)
    runtime.init_distributed(1, 1)
    try:
        yield mamba_cpu.install_cpu_kernels()
    finally:
        runtime.shutdown()
        os.environ.clear()
        os.environ.update(env)


def megatron_mixer(mm, hf, mem_eff: bool):
    """Megatron-Core's MambaMixer with ``hf``'s weights. The input projection's rows are in the same order in
    both, z | x | B | C | dt (x as heads of head_dim, B and C as groups of state): copied as they are."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, mamba_state_dim=STATE,
                            mamba_head_dim=HEAD_DIM, mamba_num_groups=GROUPS, mamba_num_heads=HEADS,
                            use_mamba_mem_eff_path=mem_eff, use_cpu_initialization=True,
                            gradient_accumulation_fusion=False, params_dtype=torch.float32)
    mixer = mm.MambaMixer(cfg, mm.MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
                          d_model=HIDDEN, d_conv=KERNEL, chunk_size=CHUNK, layer_number=1,
                          pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    assert isinstance(mixer.norm, mamba_cpu.GatedRMSNorm) and mixer.norm.eps == hf.norm.variance_epsilon
    conv_w, conv_b = mamba_cpu.conv1d_parameters(mixer)
    z, x, B, C, dt = hf.in_proj.weight.split([D_INNER, D_INNER, GROUPS * STATE, GROUPS * STATE, HEADS])
    with torch.no_grad():
        mixer.in_proj.weight.copy_(torch.cat([z, x, B, C, dt]))
        for ours, theirs in ((conv_w, hf.conv1d.weight), (conv_b, hf.conv1d.bias), (mixer.A_log, hf.A_log),
                             (mixer.D, hf.D), (mixer.dt_bias, hf.dt_bias), (mixer.norm.weight, hf.norm.weight),
                             (mixer.out_proj.weight, hf.out_proj.weight)):
            assert ours.shape == theirs.shape
            ours.copy_(theirs)
    return mixer


@pytest.mark.parametrize("mem_eff", [True, False], ids=["fused_training_path", "unfused_path"])
def test_megatron_mixer_matches_transformers_forward_and_backward(megatron_mamba, mem_eff):
    hf = hf_mixer()
    mixer = megatron_mixer(megatron_mamba, hf, mem_eff)
    h = torch.randn(BATCH, SEQ, HIDDEN, generator=gen(7))
    probe = torch.randn(BATCH, SEQ, HIDDEN, generator=gen(8))
    ref = hf(h)
    out, bias = mixer(h.transpose(0, 1).contiguous())  # Megatron: (seq, batch, hidden)
    assert bias is None
    out = out.transpose(0, 1)
    close(out, ref)
    (ref * probe).sum().backward()
    (out * probe).sum().backward()
    conv_w, conv_b = mamba_cpu.conv1d_parameters(mixer)
    pairs = {"A_log": (mixer.A_log, hf.A_log), "D": (mixer.D, hf.D), "dt_bias": (mixer.dt_bias, hf.dt_bias),
             "conv1d.weight": (conv_w, hf.conv1d.weight), "conv1d.bias": (conv_b, hf.conv1d.bias),
             "in_proj": (mixer.in_proj.weight, hf.in_proj.weight), "norm": (mixer.norm.weight, hf.norm.weight),
             "out_proj": (mixer.out_proj.weight, hf.out_proj.weight)}
    for name, (ours, theirs) in pairs.items():
        assert ours.grad is not None and torch.isfinite(ours.grad).all() and ours.grad.abs().max() > 0, name
        close(ours.grad, theirs.grad)


def test_runs_without_the_cuda_packages(megatron_mamba):
    mm = megatron_mamba
    if importlib.util.find_spec("mamba_ssm") is None:
        assert mm.mamba_split_conv1d_scan_combined is mamba_cpu.mamba_split_conv1d_scan_combined
        assert mm.mamba_chunk_scan_combined is mamba_cpu.mamba_chunk_scan_combined
        assert mm.ExtendedRMSNorm is mamba_cpu.GatedRMSNorm
    else:  # a machine with the kernels keeps them
        assert mm.mamba_chunk_scan_combined is not mamba_cpu.mamba_chunk_scan_combined
    if importlib.util.find_spec("causal_conv1d") is None:
        assert mm.causal_conv1d_fn is mamba_cpu.causal_conv1d_fn
    # the stand-in norm takes part in distributed checkpoints as Megatron-Core's own norm class does
    sharded = megatron_mixer(mm, hf_mixer(), True).sharded_state_dict(prefix="mixer.")
    assert sharded["mixer.norm.weight"].key == "mixer.norm.weight"
    assert mamba_cpu.install_cpu_kernels() is mm  # idempotent
    with pytest.raises(NotImplementedError, match="seq_idx"):
        mamba_cpu.causal_conv1d_fn(torch.zeros(1, 2, 3), torch.zeros(2, 2), seq_idx=torch.zeros(1, 3))
