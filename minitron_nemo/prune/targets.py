"""Pruning targets: validation (one-line errors before any compute) and the parameter-budget grid.

Targets (names as in NeMo 2 / modelopt): ``target_hidden_size``, ``target_ffn_hidden_size``,
``target_num_attention_heads``, ``target_num_query_groups``, ``target_num_layers`` or
``drop_layers`` (1-INDEXED layer numbers, as in NeMo), or a budget ``target_params`` /
``target_params_ratio``; MoE models also ``target_num_moe_experts`` (experts kept in every layer),
``target_moe_ffn_hidden_size`` (each expert's FFN width) and ``target_moe_shared_expert_intermediate_size``
(the shared expert's width); hybrid Mamba-Transformer models (Nemotron-H) also
``target_mamba_num_heads`` (Mamba-2 heads kept in every Mamba layer, the same number in each of its groups, as
GQA keeps heads within groups) and ``target_mamba_head_dim`` (the channels kept in every Mamba head, the same
set for every head of a layer). Unset targets keep the source value, except: with only
``target_num_query_groups`` set, the heads per group are kept (heads = groups' x heads/group); with
only ``target_num_attention_heads`` set on an MHA model (groups == heads), groups follow the heads.
``kv_channels`` (head_dim) is always preserved.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from minitron_nemo.errors import UserError
from minitron_nemo.models.builder import count_parameters
from minitron_nemo.models.config import HYBRID_SYMBOLS, ModelConfig

WIDTH_KEYS = {"target_hidden_size": "hidden_size", "target_ffn_hidden_size": "ffn_hidden_size",
              "target_num_attention_heads": "num_attention_heads",
              "target_num_query_groups": "num_query_groups", "target_num_layers": "num_layers",
              "target_num_moe_experts": "num_moe_experts", "target_moe_ffn_hidden_size": "moe_ffn_hidden_size",
              "target_moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
              "target_mamba_num_heads": "mamba_num_heads", "target_mamba_head_dim": "mamba_head_dim"}
MAMBA_KEYS = ("target_mamba_num_heads", "target_mamba_head_dim")
MOE_KEYS = ("target_num_moe_experts", "target_moe_ffn_hidden_size", "target_moe_shared_expert_intermediate_size")


@dataclass
class Targets:
    target_hidden_size: Optional[int] = None
    target_ffn_hidden_size: Optional[int] = None
    target_num_attention_heads: Optional[int] = None
    target_num_query_groups: Optional[int] = None
    target_num_layers: Optional[int] = None
    target_num_moe_experts: Optional[int] = None
    target_moe_ffn_hidden_size: Optional[int] = None
    target_moe_shared_expert_intermediate_size: Optional[int] = None
    target_mamba_num_heads: Optional[int] = None  # hybrid models: Mamba-2 heads per Mamba layer
    target_mamba_head_dim: Optional[int] = None  # hybrid models: channels kept in every Mamba head
    drop_layers: Optional[List[int]] = None  # 1-indexed
    target_params: Optional[float] = None
    target_params_ratio: Optional[float] = None
    target_active_params: Optional[float] = None  # MoE: budget on the parameters one token uses
    grid: int = 64

    @classmethod
    def from_cfg(cls, p) -> "Targets":
        get = (lambda k: p.get(k)) if hasattr(p, "get") else (lambda k: getattr(p, k, None))
        kw = {k: get(k) for k in cls.__dataclass_fields__ if get(k) is not None}
        if kw.get("drop_layers") is not None:
            kw["drop_layers"] = [int(x) for x in kw["drop_layers"]]
        return cls(**kw)

    def explicit(self) -> dict:
        return {k: getattr(self, k) for k in WIDTH_KEYS if getattr(self, k) is not None}

    def is_budget(self) -> bool:
        return (self.target_params is not None or self.target_params_ratio is not None
                or self.target_active_params is not None)

    def counts_active(self) -> bool:
        """The budget counts active parameters (MoE: router and top-k experts per layer)."""
        return self.target_active_params is not None

    def is_empty(self) -> bool:
        return not self.explicit() and not self.drop_layers and not self.is_budget()


def new_config(mc: ModelConfig, t: Targets) -> ModelConfig:
    """The pruned ``ModelConfig`` for explicit targets (no validation beyond the schema). With fewer layers,
    a per-layer window pattern is left unset and a hybrid model's ``hybrid_pattern`` is its first layers' (with
    ``drop_layers``: the kept layers'): both follow the layers depth pruning keeps (``api.prune_to``)."""
    hpg = mc.num_attention_heads // mc.num_query_groups
    heads, groups = t.target_num_attention_heads, t.target_num_query_groups
    if groups is not None and heads is None:
        heads = groups * hpg
    if heads is not None and groups is None:
        groups = heads if mc.num_query_groups == mc.num_attention_heads else mc.num_query_groups
    layers = t.target_num_layers
    if t.drop_layers:
        layers = mc.num_layers - len(set(t.drop_layers))
    pattern = mc.hybrid_pattern
    if mc.is_hybrid and layers not in (None, mc.num_layers):  # the kept layers' pattern characters
        drop = {x - 1 for x in t.drop_layers or []}
        pattern = "".join(c for i, c in enumerate(pattern) if i not in drop)[: max(layers, 0)]
    return ModelConfig(**{**mc.to_dict(),
                          "hidden_size": t.target_hidden_size or mc.hidden_size,
                          "ffn_hidden_size": t.target_ffn_hidden_size or mc.ffn_hidden_size,
                          "num_attention_heads": heads or mc.num_attention_heads,
                          "num_query_groups": groups or mc.num_query_groups,
                          "num_layers": mc.num_layers if layers is None else layers,
                          "num_moe_experts": t.target_num_moe_experts or mc.num_moe_experts,
                          "moe_ffn_hidden_size": t.target_moe_ffn_hidden_size or mc.moe_ffn_hidden_size,
                          "moe_shared_expert_intermediate_size": (t.target_moe_shared_expert_intermediate_size
                                                                  or mc.moe_shared_expert_intermediate_size),
                          "mamba_num_heads": t.target_mamba_num_heads or mc.mamba_num_heads,
                          "mamba_head_dim": t.target_mamba_head_dim or mc.mamba_head_dim,
                          "kv_channels": mc.head_dim,
                          "window_layers": mc.window_layers if layers in (None, mc.num_layers) else None,
                          "hybrid_pattern": pattern})


def validate(mc: ModelConfig, t: Targets, tp: int, pp: int, ep: int = 1) -> ModelConfig:
    """Check explicit targets against the source and the parallel layout; return the pruned config. (Each
    value's own range, e.g. ``grid`` >= 1, is checked when the job config is composed: ``prune/config.py``.)"""
    _check_mamba(mc, t)
    for key in MOE_KEYS:
        if getattr(t, key) is not None and not mc.is_moe:
            raise UserError(f"prune.{key}={getattr(t, key)} but the source model ({mc.family}) has no experts; "
                            f"allowed: unset for a dense model")
    shared = t.target_moe_shared_expert_intermediate_size
    if shared is not None and mc.is_moe and not mc.moe_shared_expert_intermediate_size:
        raise UserError(f"prune.target_moe_shared_expert_intermediate_size={shared} but the source model "
                        f"({mc.family}) has no shared expert; allowed: unset")
    if mc.is_moe and t.target_ffn_hidden_size is not None:
        raise UserError(f"prune.target_ffn_hidden_size={t.target_ffn_hidden_size}: every MLP of this model is a "
                        f"mixture of experts; allowed: prune.target_moe_ffn_hidden_size (each expert's width)")
    for key, attr in WIDTH_KEYS.items():
        v = getattr(t, key)
        if v is not None and v > getattr(mc, attr):
            raise UserError(f"prune.{key}={v} is larger than the source {attr}={getattr(mc, attr)}; "
                            f"allowed: 1..{getattr(mc, attr)}")
    if t.drop_layers is not None:
        if t.target_num_layers is not None:
            raise UserError("prune.drop_layers and prune.target_num_layers are both set; allowed: one of them")
        bad = [x for x in t.drop_layers if not 1 <= x <= mc.num_layers]
        if bad:
            raise UserError(f"prune.drop_layers has {bad} out of range; allowed: 1-indexed layer numbers "
                            f"1..{mc.num_layers}")
        dup = sorted({x for x in t.drop_layers if t.drop_layers.count(x) > 1})
        if dup:
            raise UserError(f"prune.drop_layers lists {dup} more than once; allowed: distinct layer numbers")
    new = new_config(mc, t)
    hpg = mc.num_attention_heads // mc.num_query_groups
    if new.num_layers < 1:
        raise UserError(f"pruning leaves {new.num_layers} layers; allowed: at least 1 layer")
    if new.num_attention_heads % new.num_query_groups:
        raise UserError(f"target num_attention_heads={new.num_attention_heads} is not a multiple of "
                        f"num_query_groups={new.num_query_groups}; allowed: a multiple of {new.num_query_groups}")
    if new.num_attention_heads // new.num_query_groups > hpg:
        raise UserError(f"target heads per query group {new.num_attention_heads // new.num_query_groups} "
                        f"({new.num_attention_heads}/{new.num_query_groups}) exceeds the source's {hpg}; allowed: "
                        f"num_attention_heads <= {hpg} x num_query_groups (heads are ranked within their group)")
    if new.is_moe and new.moe_router_topk > new.num_moe_experts:
        raise UserError(f"prune.target_num_moe_experts={new.num_moe_experts} is fewer than the experts each token "
                        f"uses (moe_router_topk={new.moe_router_topk}); allowed: "
                        f"{new.moe_router_topk}..{mc.num_moe_experts}")
    if new.is_moe and new.num_moe_experts % ep:
        raise UserError(f"target num_moe_experts={new.num_moe_experts} is not divisible by expert_model_parallel_size="
                        f"{ep}; allowed: a multiple of {ep}")
    for attr in ("hidden_size", "ffn_hidden_size", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        v = getattr(new, attr)
        if v is not None and v != getattr(mc, attr) and v % t.grid:
            raise UserError(f"target {attr}={v} is off the grid; allowed: a multiple of prune.grid={t.grid} "
                            f"(e.g. {max(t.grid, v // t.grid * t.grid)}), or set prune.grid")
    for attr in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "moe_ffn_hidden_size",
                 "moe_shared_expert_intermediate_size"):
        v = getattr(new, attr)
        if v is not None and v % tp:
            raise UserError(f"target {attr}={v} is not divisible by tensor_model_parallel_size={tp}; "
                            f"allowed: a multiple of {tp}")
    if new.is_hybrid and new.mamba_num_heads != mc.mamba_num_heads:
        g = mc.mamba_num_groups
        if new.mamba_num_heads % g:
            raise UserError(f"prune.target_mamba_num_heads={new.mamba_num_heads} is not a multiple of "
                            f"mamba_num_groups={g} (every group keeps the same number of heads); allowed: a "
                            f"multiple of {g}")
        if new.mamba_num_heads % tp:
            raise UserError(f"prune.target_mamba_num_heads={new.mamba_num_heads} is not divisible by "
                            f"tensor_model_parallel_size={tp}; allowed: a multiple of {_lcm(g, tp)}")
    if new.num_layers % pp:
        raise UserError(f"target num_layers={new.num_layers} is not divisible by pipeline_model_parallel_size={pp}; "
                        f"allowed: a multiple of {pp}")
    return new.validate()


def _check_mamba(mc: ModelConfig, t: Targets) -> None:
    """Mamba targets need Mamba layers."""
    for key in MAMBA_KEYS:
        v = getattr(t, key)
        if v is not None and not (mc.is_hybrid and "M" in mc.hybrid_pattern):
            raise UserError(f"prune.{key}={v} but the source model ({mc.family}) has no Mamba layers; allowed: "
                            f"unset for a model without Mamba layers")


# ----------------------------------------------------------------------------- budget search grid
# hybrid models: mamba_heads (heads per Mamba layer, kept within groups), mamba_head_dim (channels per head)
AXES = ("hidden", "ffn", "heads", "layers", "experts", "mamba_heads", "mamba_head_dim")
MAMBA_HEAD_DIM_STEP = 8  # the search keeps Mamba heads' channels in multiples of 8 (explicit targets: any count)


@dataclass
class SearchSpace:
    ratios: List[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.625, 0.5])
    axes: List[str] = field(default_factory=lambda: list(AXES))
    tolerance: float = 0.05
    max_candidates: int = 20


def _source_values(mc: ModelConfig) -> dict:
    """Each search axis's source value, None where the model has no such part: on an MoE model ``ffn`` is each
    expert's width and ``experts`` the experts per layer; a hybrid model has ``ffn``, ``heads`` and the Mamba
    axes only if its pattern has MLP, attention and Mamba layers."""
    has = (lambda ch: ch in mc.hybrid_pattern) if mc.is_hybrid else (lambda ch: ch != "M")
    return {"hidden": mc.hidden_size,
            "ffn": (mc.moe_ffn_hidden_size if mc.is_moe else mc.ffn_hidden_size) if has("-") else None,
            "heads": mc.num_attention_heads if has("*") else None, "layers": mc.num_layers,
            "experts": mc.num_moe_experts, "mamba_heads": mc.mamba_num_heads if has("M") else None,
            "mamba_head_dim": mc.mamba_head_dim if has("M") else None}


def _step(mc: ModelConfig, axis: str, grid: int, tp: int, pp: int, ep: int) -> int:
    """The grid step of ``axis``: what the layout and the grouping need (heads within groups and over TP)."""
    if axis == "hidden":
        return grid
    if axis == "ffn":
        return _lcm(grid, tp)
    if axis == "heads":
        return _lcm(mc.num_query_groups, tp)
    if axis == "mamba_heads":
        return _lcm(mc.mamba_num_groups, tp)
    if axis == "mamba_head_dim":
        return min(MAMBA_HEAD_DIM_STEP, mc.mamba_head_dim)
    return {"layers": pp, "experts": ep}[axis]


def _axis_values(mc: ModelConfig, axis: str, ratios, grid: int, tp: int, pp: int, ep: int = 1) -> List:
    src = _source_values(mc)[axis]
    if src is None:
        return [None]
    step = _step(mc, axis, grid, tp, pp, ep)
    least = mc.moe_router_topk if axis == "experts" else step
    vals = {src}
    for r in ratios:
        v = int(src * r) // step * step
        if v >= max(step, least):
            vals.add(v)
    return sorted(vals, reverse=True)


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


def _lcm(a, b):
    return a * b // _gcd(a, b)


def budget(mc: ModelConfig, t: Targets) -> int:
    """The budget in parameters (active parameters with ``target_active_params``)."""
    given = [f"prune.{k}" for k in ("target_params", "target_params_ratio", "target_active_params")
             if getattr(t, k) is not None]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} are {'both' if len(given) == 2 else 'all'} set; allowed: one of them")
    if t.target_active_params is not None and not mc.is_moe:
        raise UserError(f"prune.target_active_params={t.target_active_params:g} but the source model ({mc.family}) "
                        f"has no experts; allowed: prune.target_params for a dense model")
    if t.explicit() or t.drop_layers:
        raise UserError(f"prune.target_params(_ratio) cannot be combined with explicit targets {sorted(t.explicit())}"
                        f"{' and drop_layers' if t.drop_layers else ''}; allowed: a budget or explicit targets")
    full = count_parameters(mc, active=t.counts_active())
    if t.target_active_params is not None:
        n = float(t.target_active_params)
        if not 0 < n <= full:
            raise UserError(f"prune.target_active_params={n:g} is not in (0, {full}] (the source uses {full} "
                            f"parameters per token); allowed: a smaller positive count")
        return int(n)
    if t.target_params_ratio is not None:  # in (0, 1]: prune/config.py
        return int(full * float(t.target_params_ratio))
    n = float(t.target_params)
    if not 0 < n <= full:
        raise UserError(f"prune.target_params={t.target_params:g} is not in (0, {full}] (the source has {full} "
                        f"parameters); allowed: a smaller positive count")
    return int(n)


def _hybrid_count_range(c: ModelConfig, source_pattern: str) -> tuple[int, int]:
    """The fewest and the most parameters a hybrid model of ``c``'s widths and layer count has, over every choice
    of its layers among the source's (``source_pattern``)."""
    from minitron_nemo.models import hybrid

    per_kind = hybrid.layer_parameters(c)
    sizes = sorted(per_kind[HYBRID_SYMBOLS[ch]] for ch in source_pattern)
    rest = count_parameters(c) - sum(per_kind[c.layer_kind(i)] for i in range(c.num_layers))
    return rest + sum(sizes[: c.num_layers]), rest + sum(sizes[len(sizes) - c.num_layers:])


def candidates(mc: ModelConfig, t: Targets, space: SearchSpace, tp: int, pp: int, ep: int = 1,
               pattern_of: Optional[Callable[[int], str]] = None) -> List[ModelConfig]:
    """Grid architectures within ``tolerance`` of the budget, closest first (at most ``max_candidates``).
    On an MoE model ``ffn`` varies each expert's width and ``experts`` the experts per layer (at least the
    router's top-k, a multiple of EP); ``target_active_params`` counts the parameters one token uses.

    A hybrid model's layers differ in size by kind, so a candidate with fewer layers counts the layers depth
    pruning keeps: ``pattern_of(num_layers)`` is their pattern (from the depth scores: ``api.prune_model``).
    Without it (the checks before any compute) a candidate passes when the budget is within tolerance of the
    range its count spans over every choice of kept layers, and its pattern is the first layers' (provisional)."""
    target = budget(mc, t)
    src = _source_values(mc)
    values = {a: (_axis_values(mc, a, space.ratios, t.grid, tp, pp, ep) if a in space.axes else [src[a]])
              for a in AXES}
    found, slack = [], space.tolerance * target
    for h, f, n, L, e, mh, md in itertools.product(*values.values()):
        width = dict(target_moe_ffn_hidden_size=f, target_num_moe_experts=e) if mc.is_moe else \
            dict(target_ffn_hidden_size=f)
        c = new_config(mc, Targets(target_hidden_size=h, target_num_attention_heads=n, target_num_layers=L,
                                   target_mamba_num_heads=mh, target_mamba_head_dim=md, **width))
        if mc.is_hybrid and L != mc.num_layers:
            lo, hi = _hybrid_count_range(c, mc.hybrid_pattern)
            off = max(lo - target, target - hi, 0)
            if off <= slack and pattern_of is not None:
                c = c.replace(hybrid_pattern=pattern_of(L))
                off = abs(count_parameters(c) - target)
        else:
            off = abs(count_parameters(c, active=t.counts_active()) - target)
        if off <= slack:
            found.append((off, -L, c))
    if not found:
        active = "active " if t.counts_active() else ""
        raise UserError(f"no architecture on the search grid has {target} {active}parameters within "
                        f"±{space.tolerance:.0%} (source {count_parameters(mc, active=t.counts_active())}); allowed: "
                        f"another budget, prune.search.ratios or prune.search.tolerance")
    found.sort(key=lambda x: (x[0], x[1]))
    return [c.validate() for _, _, c in found[: space.max_candidates]]
