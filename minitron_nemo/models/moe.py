"""Mixture-of-experts support around Megatron-Core's ``MoELayer``.

Megatron-Core builds the layer (``TopKRouter``, the all-to-all token dispatcher, ``SequentialMLP`` or
TE's grouped GEMM); this module holds what the project adds: the canonical weight names of experts and
which expert-parallel rank holds which expert.

Canonical expert names are the ``SequentialMLP`` names with *global* expert numbers:
``decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight``. Expert-parallel rank ``r`` of
``ep`` holds experts ``r * E / ep ... (r + 1) * E / ep - 1`` as its local experts ``0 ... E / ep - 1``
(Megatron-Core's layout); the router (``mlp.router.weight``, one row per expert) is on every rank.
"""

from __future__ import annotations

import re

EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def megatron_without_te() -> None:
    """Megatron-Core 0.16's router reads ``te_general_gemm`` that only its Transformer Engine import
    defines; without TE the name is missing and routing raises ``NameError``. Define it as absent."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def local_experts(num_experts: int, ep_rank: int, ep: int) -> range:
    """Global numbers of the experts that expert-parallel rank ``ep_rank`` holds."""
    n = num_experts // ep
    return range(ep_rank * n, (ep_rank + 1) * n)


def expert_name(prefix: str, e: int, suffix: str) -> str:
    return f"{prefix}mlp.experts.local_experts.{e}.{suffix}"


def split_expert_name(name: str):
    """``(prefix, expert number, suffix)`` of an expert tensor name, or ``None``."""
    m = EXPERT.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None
