"""Structured-config schemas: the type of every config key, and one range validator per group.

``config.compose`` merges the composed YAML onto the recipe's schema, so OmegaConf rejects a wrong
type (``trainer.train_iters=abc``, ``prune.drop_layers=[1.5]``) while the config is composed, and
then calls ``check()`` on every group (positive sizes, finite positive learning rates, fractions in
range, choices). All of it happens before any model loads and before a Slurm job is submitted.

A field without a default (``MISSING``) is required; YAML files may still give it a value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from minitron_nemo.errors import UserError
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.prune.targets import SearchSpace, Targets

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")  # Megatron's OptimizerParamScheduler


# ----------------------------------------------------------------------------- range checks
def _fail(key: str, value, allowed: str):
    raise UserError(f"{key}={value!r}; allowed: {allowed}")


def at_least(key: str, value, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or value < low:
        _fail(key, value, f"{'null or ' if optional else ''}an integer >= {low}")


def positive_number(key: str, value, optional: bool = False, zero: bool = False) -> None:
    if value is None and optional:
        return
    ok = value is not None and math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        _fail(key, value, f"{'null or ' if optional else ''}a finite number {'>=' if zero else '>'} 0")


def fraction(key: str, value, *, low_open: bool = True) -> None:
    ok = value is not None and math.isfinite(value) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        _fail(key, value, f"a number with {'0 <' if low_open else '0 <='} value <= 1")


def choice(key: str, value, allowed) -> None:
    if value not in allowed:
        _fail(key, value, ", ".join(map(str, allowed)))


# ----------------------------------------------------------------------------- groups
@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    data_parallel_size: Optional[int] = None   # optional: launchers/submit.py checks nodes x GPUs against it
    expert_model_parallel_size: int = 1        # experts split over this many ranks (MoE models)

    def check(self, at: str) -> None:
        at_least(f"{at}.tensor_model_parallel_size", self.tensor_model_parallel_size, 1)
        at_least(f"{at}.pipeline_model_parallel_size", self.pipeline_model_parallel_size, 1)
        at_least(f"{at}.expert_model_parallel_size", self.expert_model_parallel_size, 1)
        at_least(f"{at}.data_parallel_size", self.data_parallel_size, 1, optional=True)


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

    def check(self, at: str) -> None:
        from minitron_nemo.training import data as tdata

        tdata.check(self)  # the source and what it needs (text files, a readable blend)
        at_least(f"{at}.seq_length", self.seq_length, 1)
        at_least(f"{at}.valid_samples", self.valid_samples, 0)
        at_least(f"{at}.test_tokens", self.test_tokens, 1, optional=True)


@dataclass
class DistillGroup:
    """Keys of modelopt / Megatron-LM ``DistillationConfig`` (see ``distill/config.py``)."""
    logit_layers: List[str] = field(default_factory=lambda: ["output_layer", "output_layer"])
    intermediate_layer_pairs: List[List[str]] = field(default_factory=list)
    skip_lm_loss: bool = True
    kd_loss_scale: float = 1.0
    logit_kl_temperature: float = 1.0
    logit_kl_topk: Optional[int] = None
    kl_direction: str = "forward"
    kl_chunk_size: Optional[int] = None
    teacher_cache: Optional[str] = None       # offline: a cache of recipes/cache_teacher.py (no teacher loaded)
    teacher_cache_topk: Optional[int] = None  # use the first K cached tokens (null: all of them)

    def check(self, at: str) -> None:
        from minitron_nemo.distill.config import DistillationConfig

        DistillationConfig.from_dict(dataclasses.asdict(self))


@dataclass
class CacheConfig:
    """recipes/cache_teacher.py: where and how the teacher's top-K distribution is cached."""
    dir: Optional[str] = None
    topk: Optional[int] = 64          # null: the whole (padded) vocabulary
    dtype: str = "bfloat16"           # of the cached log-probabilities
    shard_samples: int = 256          # samples per shard file (the unit of atomic writes and of resume)

    def check(self, at: str) -> None:
        from minitron_nemo.distill.cache import DTYPES

        at_least(f"{at}.topk", self.topk, 1, optional=True)
        choice(f"{at}.dtype", self.dtype, tuple(DTYPES))
        at_least(f"{at}.shard_samples", self.shard_samples, 1)


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
    use_distributed_optimizer: bool = True

    def check(self, at: str) -> None:
        positive_number(f"{at}.lr", self.lr)
        positive_number(f"{at}.min_lr", self.min_lr, zero=True)
        if self.min_lr > self.lr:
            _fail(f"{at}.min_lr", self.min_lr, f"a number <= {at}.lr={self.lr}")
        choice(f"{at}.decay_style", self.decay_style, DECAY_STYLES)
        positive_number(f"{at}.weight_decay", self.weight_decay, zero=True)
        for k in ("adam_beta1", "adam_beta2"):
            v = getattr(self, k)
            if not (math.isfinite(v) and 0 <= v < 1):
                _fail(f"{at}.{k}", v, "a number with 0 <= value < 1")
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


@dataclass
class CheckpointingConfig:
    save_interval: Optional[int] = 1000  # 0 or null: only the final checkpoint (and one on a stop signal)
    keep_last: int = 2
    save_on_interrupt: bool = True       # Ctrl-C / SIGTERM: finish the step, checkpoint, exit 130 / 143

    def check(self, at: str) -> None:
        at_least(f"{at}.save_interval", self.save_interval, 0, optional=True)
        at_least(f"{at}.keep_last", self.keep_last, 1)


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
        from minitron_nemo.prune.experts import EXPERT_SCORES
        from minitron_nemo.prune.importance import REDUCTIONS

        choice(f"{at}.batch_agg", self.batch_agg, REDUCTIONS)
        choice(f"{at}.seq_agg", self.seq_agg, REDUCTIONS)
        choice(f"{at}.expert_score", self.expert_score, EXPERT_SCORES)


@dataclass
class SearchConfig(SearchSpace):
    """``prune.search``: the budget search's grid (``prune/targets.py``) and its held-out ranking windows;
    ``distill_iters`` > 0 re-ranks the ``top_k`` zero-shot best by a short distillation (``prune/rank.py``)."""
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
            _fail(f"{at}.workdir", self.workdir, "null or a directory path")
        if not self.ratios:
            _fail(f"{at}.ratios", [], "a non-empty list of numbers in (0, 1]")
        for r in self.ratios:
            fraction(f"{at}.ratios", r)
        from minitron_nemo.prune.targets import AXES

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
        from minitron_nemo.prune.api import LAYER_CRITERIA

        for k in ("target_hidden_size", "target_ffn_hidden_size", "target_num_attention_heads",
                  "target_num_query_groups", "target_num_layers", "target_num_moe_experts",
                  "target_moe_ffn_hidden_size", "target_moe_shared_expert_intermediate_size"):
            at_least(f"{at}.{k}", getattr(self, k), 1, optional=True)
        for x in self.drop_layers or []:
            at_least(f"{at}.drop_layers", x, 1)
        positive_number(f"{at}.target_params", self.target_params, optional=True)
        positive_number(f"{at}.target_active_params", self.target_active_params, optional=True)
        if self.target_params_ratio is not None:
            fraction(f"{at}.target_params_ratio", self.target_params_ratio)
        at_least(f"{at}.grid", self.grid, 1)
        choice(f"{at}.layer_criterion", self.layer_criterion, LAYER_CRITERIA)


@dataclass
class TeacherConfig:
    checkpoint: str = MISSING
    corrected_checkpoint: Optional[str] = None
    max_loss_fraction: float = 0.8
    held_out: bool = True

    def check(self, at: str) -> None:
        positive_number(f"{at}.max_loss_fraction", self.max_loss_fraction)  # > 1 disables the sanity check


@dataclass
class StudentConfig:
    checkpoint: Optional[str] = None
    init_checkpoint: Optional[str] = None
    init: str = "pruned"
    loss: str = "kd"

    def check(self, at: str) -> None:
        choice(f"{at}.init", self.init, ("pruned", "random"))
        choice(f"{at}.loss", self.loss, ("kd", "lm"))


@dataclass
class CorrectionConfig:
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


@dataclass
class ContainerConfig:
    image: Optional[str] = None
    mounts: List[str] = field(default_factory=list)


@dataclass
class LauncherConfig:
    mode: str = "srun"
    partition: Optional[str] = None
    account: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 8
    request_gpus: bool = True
    cpus_per_task: Optional[int] = None
    time: str = "04:00:00"
    job_name: Optional[str] = None
    logs: str = "logs"
    signal: str = "USR1@120"
    requeue: bool = True
    max_requeues: int = 20
    master_port: Optional[int] = None
    python: Optional[str] = None
    setup: List[str] = field(default_factory=list)
    container: Optional[ContainerConfig] = None
    env: Dict[str, str] = field(default_factory=dict)
    recipes: Dict[str, str] = field(default_factory=dict)
    single_node: List[str] = field(default_factory=list)

    def check(self, at: str) -> None:
        choice(f"{at}.mode", self.mode, ("srun", "torchrun"))
        at_least(f"{at}.nodes", self.nodes, 1)
        at_least(f"{at}.gpus_per_node", self.gpus_per_node, 1)
        at_least(f"{at}.cpus_per_task", self.cpus_per_task, 1, optional=True)
        at_least(f"{at}.max_requeues", self.max_requeues, 0)
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            _fail(f"{at}.master_port", self.master_port, "null or a port number 1..65535")
        if self.container is not None and not self.container.image:
            raise UserError(f"{at}.container.image is required when containers are on; pass "
                            f"{at}.container.image=nvcr.io/nvidia/nemo:YY.MM or launcher=slurm_bare")


@dataclass
class EvalGenerate:
    prompts: List[str] = field(default_factory=list)
    max_new_tokens: int = 32

    def check(self, at: str) -> None:
        at_least(f"{at}.max_new_tokens", self.max_new_tokens, 1)


@dataclass
class EvalThroughput:
    enabled: bool = False
    batch_size: int = 1
    prompt_length: int = 128
    generation_length: int = 64
    repeats: int = 3

    def check(self, at: str) -> None:
        for k in ("batch_size", "prompt_length", "generation_length", "repeats"):
            at_least(f"{at}.{k}", getattr(self, k), 1)


@dataclass
class EvalGroup:
    text_file: str = MISSING
    seq_length: int = 1024
    micro_batch_size: int = 4
    max_tokens: Optional[int] = None
    backend: str = "megatron"
    output: Optional[str] = None
    perplexity: bool = True
    lm_eval_tasks: List[str] = field(default_factory=list)
    lm_eval_limit: Optional[int] = None
    lm_eval_batch_size: int = 8
    generate: EvalGenerate = field(default_factory=EvalGenerate)
    throughput: EvalThroughput = field(default_factory=EvalThroughput)

    def check(self, at: str) -> None:
        at_least(f"{at}.seq_length", self.seq_length, 2)
        at_least(f"{at}.micro_batch_size", self.micro_batch_size, 1)
        at_least(f"{at}.max_tokens", self.max_tokens, 2, optional=True)
        choice(f"{at}.backend", self.backend, ("megatron", "transformers"))
        at_least(f"{at}.lm_eval_limit", self.lm_eval_limit, 1, optional=True)
        at_least(f"{at}.lm_eval_batch_size", self.lm_eval_batch_size, 1)


@dataclass
class StageConfig:
    """One stage of an iterative compression chain (``stages``; ``minitron_nemo/stages.py``)."""
    name: str = MISSING
    prune: Dict[str, Any] = field(default_factory=dict)  # merged onto the job's prune group
    teacher: str = "original"        # original | source | a checkpoint path
    overrides: List[str] = field(default_factory=list)   # recipes/distill.py key=value of this stage only

    def check(self, at: str) -> None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(self.name)):
            _fail(f"{at}.name", self.name, "letters, digits, _ and - (it names the stage's folder)")
        if not str(self.teacher).strip():
            _fail(f"{at}.teacher", self.teacher, "original, source or a checkpoint path")
        for o in self.overrides:
            if "=" not in str(o):
                _fail(f"{at}.overrides", o, "key=value strings, e.g. trainer.train_iters=100")


# ----------------------------------------------------------------------------- recipe roots
@dataclass
class Common:
    dtype: str = "float32"
    seed: int = 1234
    overwrite: bool = False   # replace an existing output that another recipe of this project wrote

    def check(self, at: str) -> None:
        from minitron_nemo.config import DTYPES

        choice("dtype", self.dtype, tuple(DTYPES))


@dataclass
class ImportHFJob(Common):
    source: str = MISSING
    output: str = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class ExportHFJob(Common):
    checkpoint: str = MISSING
    output: str = MISSING


@dataclass
class PruneJob(Common):
    checkpoint: str = MISSING
    output: str = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    prune: PruneGroup = field(default_factory=PruneGroup)
    # the short distillation runs of prune.search.distill_iters > 0 (as recipes/distill.py uses them)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    distill: DistillGroup = field(default_factory=DistillGroup)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class EvaluateJob(Common):
    checkpoint: str = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalGroup = field(default_factory=EvalGroup)


@dataclass
class TrainingJob(Common):
    """Teacher correction and distillation: every job config under conf/ (defaults: distill)."""
    workdir: str = MISSING
    model: Optional[ModelConfig] = None
    # groups before the keys that interpolate them (correction.original_lr = ${trainer.optim.lr}): a bad
    # value is reported under the key the user typed
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    distill: DistillGroup = field(default_factory=DistillGroup)
    prune: PruneGroup = field(default_factory=PruneGroup)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    launcher: Optional[LauncherConfig] = None   # launchers/submit.py adds it
    stages: List[StageConfig] = field(default_factory=list)  # iterative chain: recipes/compress.py

    def check(self, at: str) -> None:
        super().check(at)
        t = self.trainer
        if t.global_batch_size % t.micro_batch_size:
            raise UserError(f"trainer.global_batch_size={t.global_batch_size} is not a multiple of "
                            f"trainer.micro_batch_size={t.micro_batch_size}")
        if t.train_iters is None and t.train_tokens is None:
            raise UserError("set trainer.train_iters=N or trainer.train_tokens=N")


def validate(obj, at: str = "") -> None:
    """Call ``check(path)`` on ``obj`` and every nested schema object (depth first, parents last)."""
    if isinstance(obj, list):  # e.g. the stages of a chain
        for i, x in enumerate(obj):
            validate(x, f"{at}[{i}]")
        return
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        validate(getattr(obj, f.name), f"{at}.{f.name}" if at else f.name)
    if isinstance(obj, ModelConfig):
        obj.validate()
    elif hasattr(obj, "check"):
        obj.check(at)
