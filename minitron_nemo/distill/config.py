"""Distillation config, with the YAML keys of modelopt / Megatron-LM ``DistillationConfig``.

A modelopt YAML such as::

    logit_layers: [output_layer, output_layer]
    intermediate_layer_pairs: [[decoder.final_layernorm, decoder.final_layernorm, cosine]]
    skip_lm_loss: true
    kd_loss_scale: 1.0
    logit_kl_temperature: 1.0

loads unchanged. Our additions: ``logit_kl_topk`` (null = full vocabulary), ``kl_direction``
(``forward`` = KL(teacher || student), the paper's choice; ``reverse`` = KL(student || teacher)) and
``kl_chunk_size`` (tokens per chunk of the memory-bounded KL kernel; null = automatic, about
16M logits per chunk), ``teacher_cache`` (offline distillation from a cache written by
recipes/cache_teacher.py: the teacher is not loaded) and ``teacher_cache_topk`` (use the first K of
the cached tokens; null = all).

``DistillationConfig`` is the Hydra ``distill`` group's schema (``schemas.py`` roots hold it): composing a job
builds and validates it once, and the recipes pass that object on. ``CacheConfig`` is the ``cache`` group
(recipes/cache_teacher.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from minitron_nemo.checks import at_least, choice
from minitron_nemo.errors import UserError, check
from minitron_nemo.models.config import DTYPES

INTERMEDIATE_LOSSES = ("cosine", "mse")
KL_DIRECTIONS = ("forward", "reverse")


@dataclass
class DistillationConfig:
    logit_layers: List[str] = field(default_factory=lambda: ["output_layer", "output_layer"])  # a tuple once validated
    # Entries [student_module, teacher_module] or [student_module, teacher_module, cosine|mse];
    # a two-element entry means cosine (as in modelopt). Normalised to 3-tuples by validate().
    intermediate_layer_pairs: List[List[str]] = field(default_factory=list)
    skip_lm_loss: bool = True
    kd_loss_scale: float = 1.0
    logit_kl_temperature: float = 1.0
    logit_kl_topk: Optional[int] = None
    kl_direction: str = "forward"
    kl_chunk_size: Optional[int] = None
    teacher_cache: Optional[str] = None       # offline: a cache of recipes/cache_teacher.py (no teacher loaded)
    teacher_cache_topk: Optional[int] = None  # use the first K cached tokens (null: all of them)

    def __post_init__(self):
        self.validate()

    def check(self, at: str) -> None:  # the job-config walk (config.validate); validate() already ran
        self.validate()

    def validate(self) -> "DistillationConfig":
        lay = self.logit_layers
        check(isinstance(lay, (list, tuple)) and len(lay) == 2 and all(isinstance(x, str) for x in lay),
              f"distill.logit_layers={lay!r} is invalid; allowed: [student_module, teacher_module]")
        self.logit_layers = tuple(lay)
        check(isinstance(self.intermediate_layer_pairs, (list, tuple)),
              f"distill.intermediate_layer_pairs={self.intermediate_layer_pairs!r} is invalid; "
              "allowed: a list of [student_module, teacher_module, cosine|mse]")
        pairs = []
        for entry in self.intermediate_layer_pairs:
            ok = isinstance(entry, (list, tuple)) and len(entry) in (2, 3) and all(isinstance(x, str) for x in entry)
            check(ok, f"distill.intermediate_layer_pairs entry {entry!r} is invalid; "
                      "allowed: [student_module, teacher_module] or [student_module, teacher_module, cosine|mse]")
            kind = entry[2] if len(entry) == 3 else "cosine"
            check(kind in INTERMEDIATE_LOSSES, f"distill.intermediate_layer_pairs loss {kind!r} in {list(entry)!r} "
                                               f"is not supported; allowed: {', '.join(INTERMEDIATE_LOSSES)}")
            pairs.append((entry[0], entry[1], kind))
        self.intermediate_layer_pairs = pairs
        check(isinstance(self.skip_lm_loss, bool), f"distill.skip_lm_loss={self.skip_lm_loss!r}; allowed: true, false")
        for name in ("kd_loss_scale", "logit_kl_temperature"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                  f"distill.{name}={v!r} is invalid; allowed: a number > 0")
        k = self.logit_kl_topk
        check(k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 1),
              f"distill.logit_kl_topk={k!r} is invalid; allowed: null or an integer >= 1")
        check(self.kl_direction in KL_DIRECTIONS,
              f"distill.kl_direction={self.kl_direction!r} is not supported; allowed: {', '.join(KL_DIRECTIONS)}")
        k = self.teacher_cache_topk
        check(k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 1),
              f"distill.teacher_cache_topk={k!r} is invalid; allowed: null or an integer >= 1")
        if self.teacher_cache is not None:
            check(not self.intermediate_layer_pairs, "distill.intermediate_layer_pairs need the teacher's hidden "
                  "states, which a teacher cache does not hold; allowed: [] with distill.teacher_cache")
            check(self.logit_kl_topk is None, "distill.logit_kl_topk is the online top-k loss; with "
                  "distill.teacher_cache use distill.teacher_cache_topk=K (the first K cached tokens)")
        c = self.kl_chunk_size
        check(c is None or (isinstance(c, int) and not isinstance(c, bool) and c >= 1),
              f"distill.kl_chunk_size={c!r} is invalid; allowed: null or an integer >= 1")
        return self

    @property
    def reverse_kl(self) -> bool:
        return self.kl_direction == "reverse"

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "DistillationConfig":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown distillation config key(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path) -> "DistillationConfig":
        import yaml

        try:
            with open(path) as f:
                d = yaml.safe_load(f)
        except OSError as e:
            raise UserError(f"cannot read distillation config {path}: {e.strerror}") from None
        check(d is None or isinstance(d, dict), f"distillation config {path} must be a YAML mapping")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["logit_layers"] = list(self.logit_layers)
        d["intermediate_layer_pairs"] = [list(p) for p in self.intermediate_layer_pairs]
        return d


@dataclass
class CacheConfig:
    """recipes/cache_teacher.py: where and how the teacher's top-K distribution is cached."""
    dir: Optional[str] = None
    topk: Optional[int] = 64          # null: the whole (padded) vocabulary
    dtype: str = "bfloat16"           # of the cached log-probabilities
    shard_samples: int = 256          # samples per shard file (the unit of atomic writes and of resume)

    def check(self, at: str) -> None:
        at_least(f"{at}.topk", self.topk, 1, optional=True)
        choice(f"{at}.dtype", self.dtype, tuple(sorted(DTYPES)))
        at_least(f"{at}.shard_samples", self.shard_samples, 1)
