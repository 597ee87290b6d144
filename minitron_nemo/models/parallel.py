"""The ``parallel`` group's schema: the TP x PP x EP (x DP) layout of a job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from minitron_nemo.checks import at_least


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    data_parallel_size: Optional[int] = None   # optional: launchers/submit.py checks nodes x GPUs against it
    expert_model_parallel_size: int = 1        # experts split over this many ranks (MoE models)
    expert_tensor_parallel_size: Optional[int] = None  # each expert cut over this many; null: TP (gpt-oss: 1)

    def check(self, at: str) -> None:
        at_least(f"{at}.tensor_model_parallel_size", self.tensor_model_parallel_size, 1)
        at_least(f"{at}.pipeline_model_parallel_size", self.pipeline_model_parallel_size, 1)
        at_least(f"{at}.expert_model_parallel_size", self.expert_model_parallel_size, 1)
        at_least(f"{at}.data_parallel_size", self.data_parallel_size, 1, optional=True)
        at_least(f"{at}.expert_tensor_parallel_size", self.expert_tensor_parallel_size, 1, optional=True)
