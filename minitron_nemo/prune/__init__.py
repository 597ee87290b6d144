"""Minitron pruning: activation importance (``importance``), depth criteria and layer selection
(``depth``), targets and budget search (``targets``), trimming of the sharded model (``trim``), the in-job
entry point ``prune_model`` (``api``), its adapters from the typed ``prune`` config group (``from_config``)
and the score files and plots (``artifacts``)."""

from minitron_nemo.prune.api import PruneResult, prune_model
from minitron_nemo.prune.artifacts import load_scores, save_artifacts, save_scores
from minitron_nemo.prune.depth import select_layers
from minitron_nemo.prune.from_config import check_config, prune_from_config
from minitron_nemo.prune.importance import Aggregation, estimate
from minitron_nemo.prune.targets import SearchSpace, Targets

__all__ = ["prune_model", "prune_from_config", "check_config", "PruneResult", "estimate", "Aggregation",
           "Targets", "SearchSpace", "save_scores", "load_scores", "save_artifacts", "select_layers"]
