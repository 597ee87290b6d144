"""Biased experts (gpt-oss) in the local layer spec.

Megatron-Core's expert MLP adds a biased expert's output bias to ``linear_fc2``'s output in place (times the
routing probability). At expert tensor parallelism 1 (what biased experts need) the row-parallel linear's
reduction returns its input unchanged, and autograd forbids modifying such an output in place, so training
stops. ``OwnOutputRowParallelLinear`` is the experts' ``linear_fc2`` with an output tensor of its own.
"""

from __future__ import annotations

import functools

from megatron.core.tensor_parallel.layers import RowParallelLinear


class OwnOutputRowParallelLinear(RowParallelLinear):
    def forward(self, input_, *args, **kwargs):
        out, bias = super().forward(input_, *args, **kwargs)
        return out.clone(), bias


def submodules(spec):
    """A spec's submodules: a ``ModuleSpec``'s, or (Megatron-Core 0.19) a ``functools.partial``'s keyword."""
    return spec.keywords["submodules"] if isinstance(spec, functools.partial) else spec.submodules


def with_biased_experts(layer_spec):
    """``layer_spec`` with the local experts' ``linear_fc2`` owning its output (others are left as they are)."""
    experts = submodules(submodules(layer_spec).mlp).experts
    mlp = submodules(experts)
    if mlp.linear_fc2 is RowParallelLinear:
        mlp.linear_fc2 = OwnOutputRowParallelLinear
    return layer_spec
