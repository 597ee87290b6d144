"""CPU mode for the Mamba mixers of hybrid models (Nemotron-H): torch stand-ins for the CUDA kernels.

Megatron-Core's ``MambaMixer`` (``megatron/core/ssm/mamba_mixer.py``) computes its state-space layer with
the CUDA/Triton kernels of the ``mamba_ssm`` and ``causal_conv1d`` packages, which do not install without a
GPU. This module has small torch versions of the ones the mixer calls, with the same signatures and
tensor layouts, differentiable by autograd:

  * ``causal_conv1d_fn``: the causal depthwise convolution over the x, B, C channels (bias, SiLU);
  * ``mamba_chunk_scan_combined``: the chunked SSD scan of Mamba-2 (dt bias, softplus, dt limits, the D
    skip, B/C shared by groups of heads, optional z gate, initial and final states);
  * ``mamba_split_conv1d_scan_combined``: the fused training step (split of the input projection,
    convolution, scan, optional gated RMSNorm and output projection);
  * ``GatedRMSNorm`` / ``gated_rms_norm``: RMSNorm per group of channels with the SiLU(z) gate.

``install_cpu_kernels()`` makes the mixer use them: it sets the names ``mamba_mixer`` looks up at call
time (the kernels, its norm class, and einops' ``rearrange``/``repeat`` by a small stand-in when einops is
not installed), for the packages that are missing only, so a machine with ``mamba_ssm`` installed keeps its
kernels; where triton is missing (Megatron-Core 0.16 on the CPU torch wheel) it first registers a stand-in
for the Triton helper module the mixer imports for dynamic-batching inference. Everything that depends on
the Megatron-Core version is in that function and in ``conv1d_parameters``. With the stand-ins both of
the mixer's sequence paths run, forward and backward: training with ``use_mamba_mem_eff_path=True`` (the
fused step) and the unfused one (convolution, scan, then the norm). Dynamic-batching inference, packed
sequences (``seq_idx``, ``cu_seqlens``) and the ``d_nonssm`` SwiGLU part of the fused step are not
supported on CPU and raise.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GatedRMSNorm",
    "causal_conv1d_fn",
    "conv1d_parameters",
    "gated_rms_norm",
    "install_cpu_kernels",
    "mamba_chunk_scan_combined",
    "mamba_split_conv1d_scan_combined",
    "ssd_scan",
]

_NO_LIMIT = (0.0, float("inf"))


def _unsupported(name: str, value) -> None:
    if value is not None and value is not False:
        raise NotImplementedError(f"the CPU Mamba kernels do not support {name} (packed or variable-length "
                                  f"sequences); they need the mamba_ssm / causal_conv1d CUDA packages")


# ----------------------------------------------------------------------------- the causal convolution
def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """Causal depthwise convolution: ``out[:, c, t] = act(bias[c] + sum_k weight[c, k] * x[:, c, t - W + 1 + k])``.

    ``x`` is ``(batch, channels, seq)``, ``weight`` ``(channels, W)``; the inputs before the sequence are
    ``initial_states`` ``(batch, channels, W - 1)`` or zeros. ``activation`` is None, ``"silu"`` or
    ``"swish"``. Returns ``out`` (``x``'s shape and dtype), with the last ``W - 1`` inputs as the final
    states when ``return_final_states``."""
    _unsupported("seq_idx", seq_idx)
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError(f"causal_conv1d_fn: activation {activation!r}")
    channels, width = weight.shape
    if initial_states is None:
        history = x.new_zeros(x.shape[0], channels, width - 1)
    else:
        history = initial_states.to(x.dtype)
    padded = torch.cat([history, x], dim=-1)
    out = F.conv1d(padded.to(weight.dtype), weight.unsqueeze(1), bias, groups=channels)
    if activation is not None:
        out = F.silu(out)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    final = padded[..., padded.shape[-1] - (width - 1):]
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


# ----------------------------------------------------------------------------- the gated RMSNorm
def gated_rms_norm(x, z, weight, bias=None, eps: float = 1e-6, group_size: int | None = None,
                   norm_before_gate: bool = True):
    """RMSNorm over groups of ``group_size`` channels (all channels when None), times ``weight``, with the
    gate ``silu(z)`` applied before the norm (``norm_before_gate=False``, as Mamba-2 uses) or after it.
    Computed in fp32; returns ``x``'s dtype."""
    dtype = x.dtype
    x = x.float()
    gate = None if z is None else F.silu(z.float())
    if gate is not None and not norm_before_gate:
        x = x * gate
    groups = x.unflatten(-1, (-1, group_size or x.shape[-1]))
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    out = groups.flatten(-2) * weight.float()
    if bias is not None:
        out = out + bias.float()
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(dtype)


class GatedRMSNorm(nn.Module):
    """The mixer's output norm as a module: ``forward(x, z=None)`` is ``gated_rms_norm`` with this module's
    ``weight`` (constructor as the CUDA norm class's; ``bias`` is None). ``sharded_state_dict`` shards
    ``weight`` along dim 0 over the tensor-parallel ranks, as Megatron-Core's own subclass of that norm does."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        return gated_rms_norm(x, z, self.weight, self.bias, self.eps, self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group,
                                                     make_sharded_tensors_for_checkpoint)

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        if getattr(self, "tp_group", None) is None:
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                   {"weight": 0}, sharded_offsets, tp_group=self.tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])


# ----------------------------------------------------------------------------- the SSD scan
def ssd_scan(x, dt, A, B, C, chunk_size: int, initial_states=None):
    """The state-space recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t . h_t``, per head,
    computed chunk by chunk (SSD): exact within each chunk of ``chunk_size`` steps as a masked
    attention-like product, with the states carried from one chunk to the next.

    Shapes (fp32): ``x`` (b, l, h, p); ``dt`` (b, l, h), the discretisation step already biased and
    activated; ``A`` (h), negative; ``B``, ``C`` (b, l, h, n), one per head; ``initial_states`` (b, h, p, n)
    or None for zeros. Returns ``y`` (b, l, h, p) and the final states (b, h, p, n)."""
    b, length, h, p = x.shape
    n = B.shape[-1]
    pad = -length % chunk_size
    if pad:  # dt = 0 and x = 0 after the sequence: no decay, no input, the final states stay as they are
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    chunks = (length + pad) // chunk_size
    x = x.reshape(b, chunks, chunk_size, h, p)
    B = B.reshape(b, chunks, chunk_size, h, n)
    C = C.reshape(b, chunks, chunk_size, h, n)
    dt = dt.reshape(b, chunks, chunk_size, h)

    xdt = x * dt[..., None]
    log_decay = torch.cumsum(dt * A, dim=2)  # (b, c, t, h): log of the decay from the chunk's start to t

    # 1. within each chunk: y_t = sum_{s <= t} exp(log_decay_t - log_decay_s) (C_t . B_s) xdt_s
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    gaps = log_decay[:, :, :, None, :] - log_decay[:, :, None, :, :]  # (b, c, t, s, h)
    decay = torch.exp(gaps.masked_fill(~causal[:, :, None], -math.inf))
    scores = torch.einsum("bcthn,bcshn->bctsh", C, B) * decay
    y = torch.einsum("bctsh,bcshp->bcthp", scores, xdt)

    # 2. the state each chunk adds by its end, from its own inputs
    to_end = torch.exp(log_decay[:, :, -1:, :] - log_decay)  # (b, c, s, h)
    added = torch.einsum("bcsh,bcshn,bcshp->bchpn", to_end, B, xdt)

    # 3. the states entering each chunk: carried over the chunks in order
    chunk_decay = torch.exp(log_decay[:, :, -1, :])  # (b, c, h)
    state = x.new_zeros(b, h, p, n) if initial_states is None else initial_states.float()
    entering = []
    for c in range(chunks):
        entering.append(state)
        state = state * chunk_decay[:, c, :, None, None] + added[:, c]
    entering = torch.stack(entering, dim=1)  # (b, c, h, p, n)

    # 4. what the entering state contributes at each step of its chunk
    y = y + torch.einsum("bcthn,bchpn->bcthp", C, entering) * torch.exp(log_decay)[..., None]
    return y.reshape(b, chunks * chunk_size, h, p)[:, :length], state


def _time_step(dt, dt_bias, dt_softplus: bool, dt_limit):
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)  # x itself above 20
    if tuple(dt_limit) != _NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=_NO_LIMIT,
                              return_final_states=False, return_varlen_states=False, state_dtype=None):
    """The Mamba-2 scan of the mixer's unfused path.

    ``x`` (b, l, h, p); ``dt`` (b, l, h) raw, then ``+ dt_bias`` (h), softplus when ``dt_softplus``, clamped
    to ``dt_limit``; ``A`` (h); ``B``, ``C`` (b, l, g, n), each group shared by h/g consecutive heads;
    ``D`` (h) or (h, p) adds ``D * x``; ``z`` (b, l, h, p) gates the output by ``silu(z)``. Returns ``y``
    (x's shape and dtype), with the final states (b, h, p, n; fp32 or ``state_dtype``) when
    ``return_final_states``."""
    for name, value in (("seq_idx", seq_idx), ("cu_seqlens", cu_seqlens),
                        ("return_varlen_states", return_varlen_states)):
        _unsupported(name, value)
    heads, groups = x.shape[2], B.shape[2]
    step = _time_step(dt, dt_bias, dt_softplus, dt_limit)
    B = B.float().repeat_interleave(heads // groups, dim=2)
    C = C.float().repeat_interleave(heads // groups, dim=2)
    y, final = ssd_scan(x.float(), step, A.float(), B, C, chunk_size, initial_states)
    if D is not None:
        y = y + x.float() * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    if not return_final_states:
        return y
    return y, final.to(state_dtype or torch.float32)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=_NO_LIMIT,
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True, state_dtype=None):
    """The mixer's fused training step on the input projection ``zxbcdt`` (b, l, z | x B C | dt).

    Splits it into the gate ``z`` (h*p), the convolution input ``xBC`` (h*p + 2*g*n) and ``dt`` (h); runs
    ``causal_conv1d_fn`` on ``xBC`` with ``conv1d_weight`` (channels, W) and ``activation``; scans with
    ``dt_bias``, softplus, ``dt_limit``, ``A``, ``D``; then either gates by ``silu(z)`` (no
    ``rmsnorm_weight``) or applies the gated RMSNorm over groups of h*p/ngroups channels; then the output
    projection when ``outproj_weight`` is given. ``headdim`` p is ``D``'s second dimension when ``D`` is 2-D.
    Returns (b, l, h*p or the projection's size), with the final states when ``return_final_states``."""
    _unsupported("seq_idx", seq_idx)
    heads = A.shape[0]
    headdim = D.shape[-1] if D.dim() == 2 else headdim
    if headdim is None:
        raise ValueError("mamba_split_conv1d_scan_combined: headdim is needed when D has one value per head")
    d_ssm = heads * headdim
    d_state = (conv1d_weight.shape[0] - d_ssm) // ngroups // 2
    if zxbcdt.shape[-1] != 2 * d_ssm + 2 * ngroups * d_state + heads:
        raise NotImplementedError("mamba_split_conv1d_scan_combined on CPU: the input projection has "
                                  f"{zxbcdt.shape[-1]} channels, not z, x, B, C, dt only "
                                  f"({2 * d_ssm + 2 * ngroups * d_state + heads})")
    b, length, _ = zxbcdt.shape
    z, xBC, dt = torch.split(zxbcdt, [d_ssm, d_ssm + 2 * ngroups * d_state, heads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation=activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [d_ssm, ngroups * d_state, ngroups * d_state], dim=-1)
    gate_in_scan = rmsnorm_weight is None
    y, final = mamba_chunk_scan_combined(
        x.reshape(b, length, heads, headdim), dt, A, B.reshape(b, length, ngroups, d_state),
        C.reshape(b, length, ngroups, d_state), chunk_size, D=D,
        z=z.reshape(b, length, heads, headdim) if gate_in_scan else None, dt_bias=dt_bias,
        initial_states=initial_states, dt_softplus=True, dt_limit=dt_limit, return_final_states=True,
        state_dtype=state_dtype)
    y = y.reshape(b, length, d_ssm)
    if not gate_in_scan:
        y = gated_rms_norm(y, z, rmsnorm_weight, None, rmsnorm_eps, d_ssm // ngroups, norm_before_gate)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final) if return_final_states else y


# ----------------------------------------------------------------------------- einops, when it is missing
def _axes(side: str) -> list:
    """``"b (h p) 1"`` -> ``[["b"], ["h", "p"], []]``: each dimension as the axis names it is made of."""
    out, group = [], None
    for token in side.replace("(", " ( ").replace(")", " ) ").split():
        if token == "(":
            group = []
        elif token == ")":
            out.append(group)
            group = None
        else:
            names = [] if token == "1" else [token]
            if group is None:
                out.append(names)
            else:
                group.extend(names)
    return out


def _einops(tensor, pattern: str, sizes: dict, new_axes: bool):
    lhs, rhs = (_axes(side) for side in pattern.split("->"))
    if len(lhs) != tensor.dim():
        raise ValueError(f"{pattern!r}: the tensor has {tensor.dim()} dimensions")
    sizes = dict(sizes)
    for group, dim in zip(lhs, tensor.shape):
        unknown = [a for a in group if a not in sizes]
        known = math.prod(sizes[a] for a in group if a in sizes)
        if len(unknown) > 1 or (not unknown and known != dim):
            raise ValueError(f"{pattern!r}: cannot split a dimension of {dim} into {group} ({sizes})")
        if unknown:
            sizes[unknown[0]] = dim // known
    before = [a for g in lhs for a in g]
    after = [a for g in rhs for a in g]
    added = [a for a in after if a not in before]
    if set(before) - set(after) or (added and not new_axes):
        raise ValueError(f"{pattern!r}: unsupported here (only reordering, splitting, merging, repeating)")
    out = tensor.reshape([sizes[a] for a in before]).permute([before.index(a) for a in after if a in before])
    out = out.reshape([1 if a in added else sizes[a] for a in after]).expand([sizes[a] for a in after])
    return out.reshape([math.prod(sizes[a] for a in g) for g in rhs])


def _rearrange(tensor, pattern: str, **sizes):
    return _einops(tensor, pattern, sizes, new_axes=False)


def _repeat(tensor, pattern: str, **sizes):
    return _einops(tensor, pattern, sizes, new_axes=True)


# ----------------------------------------------------------------------------- the hook
def _tensor_ops_without_triton() -> None:
    """Megatron-Core 0.16's mixer imports Triton helpers of dynamic-batching inference at module level;
    without triton (the CPU torch wheel does not bring it) that import fails. Register a module with the
    same three names that raise when called (dynamic batching is not supported on CPU anyway)."""
    name = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"
    if name in sys.modules or importlib.util.find_spec("triton") is not None:
        return

    def _needs_triton(*args, **kwargs):
        raise NotImplementedError("Mamba dynamic-batching inference needs triton and a GPU")

    stub = types.ModuleType(name, "Stand-in registered by minitron_nemo.models.mamba_cpu (no triton here).")
    stub.tensor_get_slice_after = stub.tensor_merge = stub.tensor_masked_update = _needs_triton
    sys.modules[name] = stub


def install_cpu_kernels():
    """Make Megatron-Core's ``MambaMixer`` run without ``mamba_ssm``/``causal_conv1d``/``einops`` by setting
    the names its module looks up to this module's stand-ins (only those whose package is missing;
    idempotent). Call before building a mixer. Returns the ``megatron.core.ssm.mamba_mixer`` module."""
    _tensor_ops_without_triton()
    from megatron.core.ssm import mamba_context_parallel, mamba_mixer

    if not mamba_mixer.HAVE_MAMBA_SSM:
        mamba_mixer.mamba_chunk_scan_combined = mamba_chunk_scan_combined
        mamba_mixer.mamba_split_conv1d_scan_combined = mamba_split_conv1d_scan_combined
        mamba_mixer.RMSNormGated = mamba_mixer.ExtendedRMSNorm = GatedRMSNorm
        mamba_mixer.HAVE_MAMBA_SSM = True
    if mamba_mixer.causal_conv1d_fn is None:
        mamba_mixer.causal_conv1d_fn = causal_conv1d_fn
    for module in (mamba_mixer, mamba_context_parallel):
        if not module.HAVE_EINOPS:
            module.rearrange, module.repeat, module.HAVE_EINOPS = _rearrange, _repeat, True
    return mamba_mixer


def conv1d_parameters(mixer) -> tuple:
    """``(weight (channels, 1, W), bias)`` of a ``MambaMixer``'s convolution: an ``nn.Conv1d`` named
    ``conv1d`` up to Megatron-Core 0.16, two parameters ``conv1d_weight``/``conv1d_bias`` from 0.19 on
    (so the state-dict keys differ: ``conv1d.weight`` vs ``conv1d_weight``)."""
    if hasattr(mixer, "conv1d_weight"):
        return mixer.conv1d_weight, mixer.conv1d_bias
    return mixer.conv1d.weight, mixer.conv1d.bias
