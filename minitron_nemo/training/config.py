"""The training groups' schemas: ``trainer`` (with ``trainer.optim``), ``checkpointing``, ``data`` and
``correction`` (recipes/correct_teacher.py). Each ``check(at)`` runs when the job config is composed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from minitron_nemo.checks import at_least, choice, fail, fraction, positive_number
from minitron_nemo.errors import UserError
from minitron_nemo.training import data as tdata

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")  # Megatron's OptimizerParamScheduler


@dataclass
class DataConfig:
    source: str = "shakespeare"
    train_text: Optional[str] = None
    valid_text: Optional[str] = None
    test_text: Optional[str] = None
    cache_dir: Optional[str] = None
    blend: Optional[Any] = None          # "PREFIX" or "0.7 PREFIX_A 0.3 PREFIX_B" (or a list of those words)
    valid_blend: Optional[Any] = None
    split: str = "969,30,1"
    seq_length: int = 1024
    valid_samples: int = 16
    test_tokens: Optional[int] = None
    answer_only: bool = True             # data.source=chat: the loss on answer tokens only (else all tokens)
    packing: bool = False                # data.source=chat: several conversations per sample (data/chat_samples.py)

    def check(self, at: str) -> None:
        tdata.check(self)  # the source and what it needs (text files, a readable blend)
        at_least(f"{at}.seq_length", self.seq_length, 1)
        at_least(f"{at}.valid_samples", self.valid_samples, 0)
        at_least(f"{at}.test_tokens", self.test_tokens, 1, optional=True)
        if self.packing and self.source != "chat":
            raise UserError(f"{at}.packing=true needs {at}.source=chat (got {self.source}); text sources fill every "
                            f"sample already")


@dataclass
class OptimConfig:
    lr: float = 1.0e-4
    min_lr: float = 1.0e-5
    decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True   # used when DP > 1 (optimizer state sharded over the DP ranks)
    overlap_grad_reduce: bool = False        # gradient reduce(-scatter) per bucket during the backward pass
    overlap_param_gather: bool = False       # distributed optimizer: parameter all-gather during the forward pass

    def check(self, at: str) -> None:
        if self.overlap_param_gather and not (self.use_distributed_optimizer and self.overlap_grad_reduce):
            raise UserError(f"{at}.overlap_param_gather=true needs {at}.use_distributed_optimizer=true and "
                            f"{at}.overlap_grad_reduce=true (Megatron-Core overlaps the gather only with both)")
        positive_number(f"{at}.lr", self.lr)
        positive_number(f"{at}.min_lr", self.min_lr, zero=True)
        if self.min_lr > self.lr:
            fail(f"{at}.min_lr", self.min_lr, f"a number <= {at}.lr={self.lr}")
        choice(f"{at}.decay_style", self.decay_style, DECAY_STYLES)
        positive_number(f"{at}.weight_decay", self.weight_decay, zero=True)
        for k in ("adam_beta1", "adam_beta2"):
            v = getattr(self, k)
            if not (math.isfinite(v) and 0 <= v < 1):
                fail(f"{at}.{k}", v, "a number with 0 <= value < 1")
        positive_number(f"{at}.adam_eps", self.adam_eps)
        positive_number(f"{at}.clip_grad", self.clip_grad, zero=True)


@dataclass
class TrainerConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 1
    train_iters: Optional[int] = None
    train_tokens: Optional[int] = None
    warmup_iters: int = 0
    eval_interval: int = 0               # 0: validate only at the end
    peak_tflops: Optional[float] = None
    tensorboard: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)

    def check(self, at: str) -> None:
        at_least(f"{at}.micro_batch_size", self.micro_batch_size, 1)
        at_least(f"{at}.global_batch_size", self.global_batch_size, 1)
        at_least(f"{at}.train_iters", self.train_iters, 1, optional=True)
        at_least(f"{at}.train_tokens", self.train_tokens, 1, optional=True)
        at_least(f"{at}.warmup_iters", self.warmup_iters, 0)
        at_least(f"{at}.eval_interval", self.eval_interval, 0)
        positive_number(f"{at}.peak_tflops", self.peak_tflops, optional=True)

    def check_batches(self) -> None:
        """The global batch is whole micro-batches (called by the job roots that train, ``schemas.py``)."""
        if self.global_batch_size % self.micro_batch_size:
            raise UserError(f"trainer.global_batch_size={self.global_batch_size} is not a multiple of "
                            f"trainer.micro_batch_size={self.micro_batch_size}")


@dataclass
class CheckpointingConfig:
    save_interval: Optional[int] = 1000  # 0 or null: only the final checkpoint (and one on a stop signal)
    keep_last: int = 2
    save_on_interrupt: bool = True       # Ctrl-C / SIGTERM: finish the step, checkpoint, exit 130 / 143

    def check(self, at: str) -> None:
        at_least(f"{at}.save_interval", self.save_interval, 0, optional=True)
        at_least(f"{at}.keep_last", self.keep_last, 1)


@dataclass
class CorrectionConfig:
    """recipes/correct_teacher.py: the teacher's fine-tuning on the distillation data."""
    original_lr: float = 1.0e-4
    lr_fraction: float = 0.2
    warmup_iters: int = 120
    train_iters: Optional[int] = None
    train_tokens: Optional[int] = None
    workdir: Optional[str] = None

    def check(self, at: str) -> None:
        positive_number(f"{at}.original_lr", self.original_lr)
        fraction(f"{at}.lr_fraction", self.lr_fraction)
        at_least(f"{at}.warmup_iters", self.warmup_iters, 0)
        at_least(f"{at}.train_iters", self.train_iters, 1, optional=True)
        at_least(f"{at}.train_tokens", self.train_tokens, 1, optional=True)
