"""A student's training step, chosen in one place for recipes/distill.py and the ranked search's short runs
(workflows/search.py):

    online KD    the teacher in memory; ``KDStage`` runs teacher and student (distill/online.py)
    offline KD   the teacher's cached distribution (``distill.teacher_cache``, distill/offline.py)
    LM only      the student's LM loss, no teacher (``student.loss=lm``, P1's baseline)

``build`` returns a ``training.setup.Step``, which ``training.setup.build_trainer`` runs.
"""

from __future__ import annotations

from minitron_nemo.distill import online as online
from minitron_nemo.distill import offline
from minitron_nemo.distill.config import DistillationConfig
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.training.loop import lm_forward, lm_loss
from minitron_nemo.training.setup import Step


def student_lm_loss(batch, output):
    """LM-loss training, reported under the same validation key as distillation's student LM loss."""
    value, metrics = lm_loss(batch, output)
    return value, {"student_lm": metrics["lm"]}


def build(kd_cfg: DistillationConfig, student, s_mc: ModelConfig, params_dtype, *, teacher=None,
          t_mc: ModelConfig | None = None, cache=None, kd: bool = True) -> Step:
    """The step of ``student``: with ``kd``, offline KD from ``cache`` (an opened teacher cache) or else
    online KD from ``teacher``, the student's hidden-state projection attached first
    (``attach_projection``, before the optimizer sees the parameters); without, the LM loss alone."""
    if not kd:
        return Step(lm_forward, student_lm_loss, student_lm_loss)
    online.attach_projection(student, s_mc, t_mc, kd_cfg, params_dtype)
    if cache is not None:
        return Step(offline.make_forward(cache), lambda b, o: offline.loss(kd_cfg, b, o),
                    lambda b, o: offline.valid_loss(kd_cfg, b, o))
    return Step(online.kd_forward, lambda b, o: online.kd_loss(kd_cfg, b, o),
                lambda b, o: online.kd_valid_loss(kd_cfg, b, o),
                wrap=lambda ddp: online.KDStage(ddp, teacher, s_mc, t_mc, kd_cfg), teacher_mc=t_mc)
