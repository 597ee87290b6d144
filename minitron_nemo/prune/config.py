"""The ``prune`` group's schema: the targets (``prune/targets.py``), how units are ranked (calibration,
importance, ``layer_criterion``) and the budget search's grid. ``check(at)`` runs when the job config is
composed; the checks against a source model (``targets.validate``, ``targets.candidates``) run once it is
known (``from_config.check_config``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import OmegaConf

from minitron_nemo.checks import at_least, choice, fail, fraction, positive_number
from minitron_nemo.errors import UserError
from minitron_nemo.prune.experts import EXPERT_SCORES
from minitron_nemo.prune.importance import REDUCTIONS
from minitron_nemo.prune.targets import AXES, SearchSpace, Targets

LAYER_CRITERIA = ("bi", "loss", "block")


@dataclass
class CalibrationConfig:
    data: Optional[str] = None
    num_samples: int = 1024
    seq_length: int = 512
    micro_batch_size: int = 1
    seed: int = 1234
    loss_samples: int = 64

    def check(self, at: str) -> None:
        for k in ("num_samples", "seq_length", "micro_batch_size", "loss_samples"):
            at_least(f"{at}.{k}", getattr(self, k), 1)


@dataclass
class ImportanceConfig:
    load: Optional[str] = None
    batch_agg: str = "l2"
    seq_agg: str = "mean"
    expert_score: str = "routed_l2"  # MoE: which expert score ranks the experts (prune/experts.py)

    def check(self, at: str) -> None:
        choice(f"{at}.batch_agg", self.batch_agg, REDUCTIONS)
        choice(f"{at}.seq_agg", self.seq_agg, REDUCTIONS)
        choice(f"{at}.expert_score", self.expert_score, EXPERT_SCORES)


@dataclass
class SearchConfig(SearchSpace):
    """``prune.search``: the budget search's grid (``prune/targets.py``) and its held-out ranking windows;
    ``distill_iters`` > 0 re-ranks the ``top_k`` zero-shot best by a short distillation (``workflows/search.py``)."""
    eval_samples: int = 64
    distill_iters: int = 0               # 0: rank by zero-shot loss only
    top_k: int = 3                       # candidates distilled (the best by zero-shot loss)
    eval_interval: Optional[int] = None  # validation every N iterations of a short run (null: K / 4)
    workdir: Optional[str] = None        # the short runs (null: OUTPUT_search)

    def check(self, at: str) -> None:
        at_least(f"{at}.distill_iters", self.distill_iters, 0)
        at_least(f"{at}.top_k", self.top_k, 1)
        at_least(f"{at}.eval_interval", self.eval_interval, 1, optional=True)
        if self.workdir is not None and not str(self.workdir).strip():
            fail(f"{at}.workdir", self.workdir, "null or a directory path")
        if not self.ratios:
            fail(f"{at}.ratios", [], "a non-empty list of numbers in (0, 1]")
        for r in self.ratios:
            fraction(f"{at}.ratios", r)
        for a in self.axes:
            choice(f"{at}.axes", a, AXES)
        positive_number(f"{at}.tolerance", self.tolerance)
        at_least(f"{at}.max_candidates", self.max_candidates, 1)
        at_least(f"{at}.eval_samples", self.eval_samples, 1)


@dataclass
class PruneGroup(Targets):
    """``prune``: the targets (``prune/targets.py``: target_*, drop_layers 1-indexed, target_params(_ratio),
    grid) and how to rank and search."""
    layer_criterion: str = "block"
    importance_only: bool = False
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def check(self, at: str) -> None:
        for k in ("target_hidden_size", "target_ffn_hidden_size", "target_num_attention_heads",
                  "target_num_query_groups", "target_num_layers", "target_num_moe_experts",
                  "target_moe_ffn_hidden_size", "target_moe_shared_expert_intermediate_size",
                  "target_mamba_num_heads", "target_mamba_head_dim"):
            at_least(f"{at}.{k}", getattr(self, k), 1, optional=True)
        for x in self.drop_layers or []:
            at_least(f"{at}.drop_layers", x, 1)
        positive_number(f"{at}.target_params", self.target_params, optional=True)
        positive_number(f"{at}.target_active_params", self.target_active_params, optional=True)
        if self.target_params_ratio is not None:
            fraction(f"{at}.target_params_ratio", self.target_params_ratio)
        at_least(f"{at}.grid", self.grid, 1)
        choice(f"{at}.layer_criterion", self.layer_criterion, LAYER_CRITERIA)

    def require_targets(self) -> None:
        """A prune job prunes something (or writes only the scores)."""
        if not self.importance_only and self.is_empty():
            raise UserError("nothing to prune; allowed: set a prune.target_*, prune.drop_layers, "
                            "prune.target_params(_ratio) or prune.importance_only=true")

    def targets(self) -> Targets:
        """The targets alone (what a pruned checkpoint records)."""
        return Targets.from_cfg(self)

    def with_calibration_data(self, data) -> "PruneGroup":
        """This group with ``calibration.data`` set (in-job pruning calibrates on the training text)."""
        return dataclasses.replace(self, calibration=dataclasses.replace(self.calibration, data=data))

    @classmethod
    def of(cls, node) -> "PruneGroup":
        """``node`` if it is typed already, else a mapping typed (a chain stage's merged ``prune`` keys, which
        ``workflows/stages.merged_prune`` checked)."""
        if isinstance(node, cls):
            return node
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), node))
