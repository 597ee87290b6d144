"""The job roots: one structured schema per recipe (``compose(name, schema=...)``) and the keys only a job has.

``config.compose`` merges the composed YAML onto the recipe's schema, so OmegaConf rejects a wrong
type (``trainer.train_iters=abc``, ``prune.drop_layers=[1.5]``) while the config is composed, and
then calls ``check()`` on every group (positive sizes, finite positive learning rates, fractions in
range, choices; ``config.validate``). All of it happens before any model loads and before a Slurm job is
submitted. Each group's schema lives with its package: ``models/parallel.py``, ``prune/config.py``,
``distill/config.py`` (``DistillationConfig`` is the ``distill`` group), ``training/config.py``,
``eval/config.py``; the range helpers are ``checks.py``.

A field without a default (``MISSING``) is required; YAML files may still give it a value.
"""

from __future__ import annotations

import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from minitron_nemo.align.dpo import DPOConfig
from minitron_nemo.checks import at_least, choice, fail, positive_number
from minitron_nemo.distill.config import CacheConfig, DistillationConfig
from minitron_nemo.errors import UserError
from minitron_nemo.eval.config import EvalGroup
from minitron_nemo.models.config import DTYPES, ModelConfig
from minitron_nemo.models.parallel import ParallelConfig
from minitron_nemo.prune.config import PruneGroup
from minitron_nemo.training.config import CheckpointingConfig, CorrectionConfig, DataConfig, TrainerConfig


# ----------------------------------------------------------------------------- keys of the jobs only
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
            fail(f"{at}.master_port", self.master_port, "null or a port number 1..65535")
        if self.container is not None and not self.container.image:
            raise UserError(f"{at}.container.image is required when containers are on; pass "
                            f"{at}.container.image=nvcr.io/nvidia/nemo:YY.MM or launcher=slurm_bare")


@dataclass
class StageConfig:
    """One stage of an iterative compression chain (``stages``; ``minitron_nemo/workflows/stages.py``)."""
    name: str = MISSING
    prune: Dict[str, Any] = field(default_factory=dict)  # merged onto the job's prune group
    teacher: str = "original"        # original | source | a checkpoint path
    overrides: List[str] = field(default_factory=list)   # recipes/distill.py key=value of this stage only

    def check(self, at: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(self.name)):
            fail(f"{at}.name", self.name, "letters, digits, _ and - (it names the stage's folder)")
        if not str(self.teacher).strip():
            fail(f"{at}.teacher", self.teacher, "original, source or a checkpoint path")
        for o in self.overrides:
            if "=" not in str(o):
                fail(f"{at}.overrides", o, "key=value strings, e.g. trainer.train_iters=100")


@dataclass
class AlignStageConfig:
    """One alignment stage after distillation (``align``; ``minitron_nemo/workflows/align_stages.py``)."""
    name: str = MISSING
    recipe: str = MISSING            # sft | dpo
    overrides: List[str] = field(default_factory=list)   # the recipe's key=value (its data, trainer, ...)

    def check(self, at: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(self.name)):
            fail(f"{at}.name", self.name, "letters, digits, _ and - (it names the stage's folder)")
        choice(f"{at}.recipe", self.recipe, ("sft", "dpo"))
        for o in self.overrides:
            if "=" not in str(o):
                fail(f"{at}.overrides", o, "key=value strings, e.g. data.blend=PREFIX")


# ----------------------------------------------------------------------------- recipe roots
def check_training(t: TrainerConfig, data: DataConfig) -> None:
    """What every training job needs of its batches and length (distillation, correction, SFT)."""
    t.check_batches()
    if data.packing and t.micro_batch_size != 1:
        raise UserError(f"data.packing=true needs trainer.micro_batch_size=1 (a packed sequence is the "
                        f"micro-batch), got {t.micro_batch_size}; allowed: 1, with a longer data.seq_length")
    if t.train_iters is None and t.train_tokens is None:
        raise UserError("set trainer.train_iters=N or trainer.train_tokens=N")


@dataclass
class Common:
    dtype: str = "float32"
    seed: int = 1234
    overwrite: bool = False   # replace an existing output that another recipe of this project wrote

    def check(self, at: str) -> None:
        choice("dtype", self.dtype, tuple(DTYPES))


@dataclass
class ImportHFJob(Common):
    source: str = MISSING
    output: str = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class ImportNemoJob(ImportHFJob):
    tokenizer: Optional[str] = None   # an HF tokenizer dir, when the NeMo 2 checkpoint has none under context/


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
    distill: DistillationConfig = field(default_factory=DistillationConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def check(self, at: str) -> None:
        super().check(at)
        if self.prune.search.distill_iters > 0:  # the short runs train
            self.trainer.check_batches()


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
    distill: DistillationConfig = field(default_factory=DistillationConfig)
    prune: PruneGroup = field(default_factory=PruneGroup)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    launcher: Optional[LauncherConfig] = None   # launchers/submit.py adds it
    stages: List[StageConfig] = field(default_factory=list)  # iterative chain: recipes/compress.py
    align: List[AlignStageConfig] = field(default_factory=list)  # SFT / DPO after distillation (compress, submit)

    def check(self, at: str) -> None:
        super().check(at)
        check_training(self.trainer, self.data)



@dataclass
class FineTuneJob(Common):
    """The keys the recipes that train one checkpoint further share (recipes/sft.py, recipes/dpo.py)."""
    checkpoint: str = MISSING
    workdir: str = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)


@dataclass
class SFTJob(FineTuneJob):
    """recipes/sft.py: supervised fine-tuning of a checkpoint on conversations (the answer tokens' LM loss)."""
    data: DataConfig = field(default_factory=DataConfig)

    def check(self, at: str) -> None:
        super().check(at)
        if self.data.source != "chat":
            raise UserError(f"data.source={self.data.source}; allowed: chat (conversations written by "
                            f"recipes/preprocess_data.py format=chat, passed as data.blend=PREFIX)")
        check_training(self.trainer, self.data)


@dataclass
class PreferenceData:
    """recipes/dpo.py's data: preference pairs (``align/preferences.py``)."""
    preference_file: str = MISSING
    valid_file: Optional[str] = None    # held-out pairs for validation (null: the first pairs of the file)
    seq_length: int = 1024
    valid_samples: int = 16

    def check(self, at: str) -> None:
        at_least(f"{at}.seq_length", self.seq_length, 2)
        at_least(f"{at}.valid_samples", self.valid_samples, 0)
        for key in ("preference_file", "valid_file"):
            v = getattr(self, key)
            if v is not None and not Path(v).is_file():
                raise UserError(f"{at}.{key}={v} does not exist; allowed: a JSONL file of preference pairs")


@dataclass
class DPOJob(FineTuneJob):
    """recipes/dpo.py: preference optimization of a checkpoint against itself, frozen, as the reference."""
    data: PreferenceData = field(default_factory=PreferenceData)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def check(self, at: str) -> None:
        super().check(at)
        self.trainer.check_batches()
        if self.trainer.train_iters is None:
            raise UserError("set trainer.train_iters=N")


@dataclass
class AlignJob(Common):
    """recipes/align.py: a chain of SFT and DPO stages from one checkpoint (``workflows/align_stages.py``)."""
    checkpoint: str = MISSING
    workdir: str = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: Dict[str, Any] = field(default_factory=dict)   # named inputs the stages' overrides interpolate
    align: List[AlignStageConfig] = field(default_factory=list)

    def check(self, at: str) -> None:
        super().check(at)
        if not self.align:
            raise UserError("align is empty; allowed: a list of stages {name, recipe: sft|dpo, overrides}, e.g. "
                            "--config-name p2_align")
