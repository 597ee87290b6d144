"""Minitron pruning: activation importance (``importance``), targets and budget search (``targets``),
trimming of the sharded model (``trim``), and the in-job entry point ``prune_model`` (``api``)."""

from minitron_nemo.prune.api import (PruneResult, check_config, load_scores, prune_from_config, prune_model,
                                     save_artifacts, save_scores, select_layers)
from minitron_nemo.prune.importance import Aggregation, estimate
from minitron_nemo.prune.targets import SearchSpace, Targets

__all__ = ["prune_model", "prune_from_config", "check_config", "PruneResult", "estimate", "Aggregation",
           "Targets", "SearchSpace", "save_scores", "load_scores", "save_artifacts", "select_layers"]
