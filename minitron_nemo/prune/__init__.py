"""Minitron pruning: activation importance (``importance``), targets and budget search (``targets``),
trimming of the sharded model (``trim``), and the in-job entry point ``prune_model`` (``api``)."""

from minitron_nemo.prune.api import (PruneResult, load_scores, prune_model, save_scores, select_layers,
                                     write_candidates)
from minitron_nemo.prune.importance import Aggregation, estimate
from minitron_nemo.prune.targets import SearchSpace, Targets

__all__ = ["prune_model", "PruneResult", "estimate", "Aggregation", "Targets", "SearchSpace",
           "save_scores", "load_scores", "select_layers", "write_candidates"]
