"""Teacher/student wiring for distillation in one job (same TP/PP/DP, same data order).

``KDStage`` wraps this rank's pipeline stage of both models in one module, which is what Megatron's
schedule drives. Pipeline design: on a stage that is not the last, ``forward`` returns
``cat([student_hidden, teacher_hidden], -1)``, one activation of width ``h_s + h_t`` (the wrapper's
``config.hidden_size``, so the schedule's p2p shapes match); ``set_input_tensor`` splits what the
previous stage sent and gives each model its half. The teacher half is detached and computed under
``no_grad``, so the backward pass only reaches the student. On the last stage ``forward`` returns the
student's and the teacher's vocab-parallel logits (and the hidden states named by
``intermediate_layer_pairs``) for ``kd_loss``. The teacher runs per micro-batch, on the same
micro-batch as the student. Virtual (interleaved) pipeline is not supported.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from megatron.core import parallel_state, tensor_parallel
from torch import nn

from minitron_nemo import runtime
from minitron_nemo.distill.config import DistillationConfig
from minitron_nemo.distill.losses import HiddenProjection, distillation_loss
from minitron_nemo.errors import UserError
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.models.packing import model_inputs


def _unwrap(m):
    while hasattr(m, "module") and not hasattr(m, "set_input_tensor"):
        m = m.module
    return m


class KDStage(nn.Module):
    """One pipeline stage of student (DDP-wrapped, trained) and teacher (frozen)."""

    def __init__(self, student, teacher, student_mc: ModelConfig, teacher_mc: ModelConfig,
                 kd_cfg: DistillationConfig):
        super().__init__()
        self.student, self.h_s = student, student_mc.hidden_size
        self.teacher = [teacher]  # a list: not a registered submodule (no grads, not in state dicts)
        freeze(teacher)
        self.config = copy.copy(_unwrap(student).config)
        self.config.hidden_size = student_mc.hidden_size + teacher_mc.hidden_size
        self.model_type = _unwrap(student).model_type
        self.kd_cfg = kd_cfg
        self.post_process = parallel_state.is_pipeline_last_stage()
        self._captured = {}
        self.projection = getattr(_unwrap(student), "kd_projection", None)
        self._hooks = self._capture_hidden(kd_cfg, student_mc, teacher_mc) if self.post_process else []

    def _capture_hidden(self, cfg, smc, tmc):
        if not cfg.intermediate_layer_pairs:
            return []
        if smc.hidden_size != tmc.hidden_size and self.projection is None:
            raise UserError("distill.intermediate_layer_pairs with different hidden sizes need the student's "
                            "projection: call attach_projection(student, ...) before wrapping it in DDP")
        hooks = []
        for i, (s_name, t_name, _) in enumerate(cfg.intermediate_layer_pairs):
            for side, model, name in (("s", _unwrap(self.student), s_name), ("t", self.teacher[0], t_name)):
                try:
                    mod = model.get_submodule(name)
                except AttributeError:
                    raise UserError(f"distill.intermediate_layer_pairs: module {name!r} is not in the last "
                                    f"pipeline stage of the {'student' if side == 's' else 'teacher'}; allowed: "
                                    f"e.g. decoder.final_layernorm or decoder.layers.<local index>") from None
                hooks.append(mod.register_forward_hook(self._hook(side, i)))
        return hooks

    def _hook(self, side, i):
        def fn(_module, _inputs, output):
            self._captured[(side, i)] = output[0] if isinstance(output, (tuple, list)) else output
        return fn

    def train(self, mode: bool = True):
        self.student.train(mode)
        self.teacher[0].eval()
        self.training = mode
        return self

    def set_input_tensor(self, input_tensor):
        t = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        if t is None:
            s_in = t_in = None
        else:
            s_in, t_in = t[..., : self.h_s], t[..., self.h_s:]
        _unwrap(self.student).set_input_tensor(s_in)
        self.teacher[0].set_input_tensor(t_in.detach() if t_in is not None else None)

    def forward(self, tokens, position_ids, attention_mask, labels=None, packed_seq_params=None):
        self._captured.clear()
        with torch.no_grad():
            t_out = self.teacher[0](tokens, position_ids, attention_mask, packed_seq_params=packed_seq_params)
        s_out = self.student(tokens, position_ids, attention_mask, packed_seq_params=packed_seq_params)
        if not self.post_process:
            return torch.cat([s_out, t_out.detach().to(s_out.dtype)], dim=-1)
        n = len(self.kd_cfg.intermediate_layer_pairs)
        pairs = [(self._captured[("s", i)], self._captured[("t", i)].detach()) for i in range(n)]
        return {"student": s_out, "teacher": t_out.detach(), "pairs": pairs, "projection": self.projection}


def attach_projection(student, student_mc: ModelConfig, teacher_mc: ModelConfig, kd_cfg: DistillationConfig,
                      params_dtype: torch.dtype) -> None:
    """Give the student (last pipeline stage) the one shared learned projection student hidden -> teacher
    hidden used by every intermediate-state loss when the hidden sizes differ. It is a submodule of the
    student, so DDP reduces its gradients, the optimizer trains it and training checkpoints hold it; a
    plain ``GPTModel`` (export, evaluation) ignores it when loading."""
    if (kd_cfg.intermediate_layer_pairs and student_mc.hidden_size != teacher_mc.hidden_size
            and parallel_state.is_pipeline_last_stage()):
        student.kd_projection = HiddenProjection(student_mc.hidden_size, teacher_mc.hidden_size).to(
            device=runtime.device(), dtype=params_dtype)


def freeze(model) -> None:
    """Teacher: eval mode, no gradients (so no optimizer state, never in checkpoints)."""
    model.eval()
    model.requires_grad_(False)


def token_nll(logits, labels):
    """Per-token next-token NLL ``[b, s]`` of vocab-parallel logits ``[b, s, V/TP]``. Megatron's
    cross entropy works in place on the tensor it is given, so it gets a copy: ``logits`` (an fp32 model
    output the KD loss reads next) stay as they were."""
    x = logits.transpose(0, 1).contiguous().float()
    if x.data_ptr() == logits.data_ptr():
        x = x.clone()
    return tensor_parallel.vocab_parallel_cross_entropy(x, labels.transpose(0, 1).contiguous()).transpose(0, 1)


def kd_forward(model, batch):
    args, kwargs = model_inputs(batch, runtime.device())
    return model(*args, **kwargs)


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kd_loss(kd_cfg: DistillationConfig, batch, output):
    """Training loss of one micro-batch; logs LM, logits, intermediate and total separately."""
    s, t = output["student"], output["teacher"]
    mask = batch["loss_mask"].to(s.device).float()
    # With skip_lm_loss the LM loss is only logged: no graph, so the cross entropy's fp32 copy of the logits is
    # freed now instead of living through the backward
    with torch.no_grad() if kd_cfg.skip_lm_loss else contextlib.nullcontext():
        lm = token_nll(s, batch["labels"].to(s.device))
    out = distillation_loss(kd_cfg, s, t, mask, hidden_pairs=output["pairs"], lm_loss=lm,
                            projection=output.get("projection"))
    keys = ("lm", "logits", "intermediate", "total") if kd_cfg.intermediate_layer_pairs else ("lm", "logits", "total")
    return out["total"], {k: out[k].detach().float() for k in keys}


def kd_valid_loss(kd_cfg: DistillationConfig, batch, output):
    """Validation: student LM loss, KD (logits KL) loss, teacher LM loss."""
    s, t = output["student"], output["teacher"]
    mask = batch["loss_mask"].to(s.device).float()
    labels = batch["labels"].to(s.device)
    out = distillation_loss(kd_cfg, s, t, mask, hidden_pairs=output["pairs"], projection=output.get("projection"))
    metrics = {"student_lm": _masked_mean(token_nll(s, labels), mask), "kd": out["logits"].detach(),
               "teacher_lm": _masked_mean(token_nll(t, labels), mask)}
    return metrics["kd"], metrics


# ----------------------------------------------------------------------------- checks before compute
def check_virtual_pipeline(parallel_cfg) -> None:
    v = parallel_cfg.get("virtual_pipeline_model_parallel_size", None) if hasattr(parallel_cfg, "get") else None
    if v not in (None, 1):
        raise UserError(f"parallel.virtual_pipeline_model_parallel_size={v}: interleaved (virtual) pipeline is "
                        f"not supported for distillation; allowed: null")


def check_vocab(teacher_mc: ModelConfig, student_mc: ModelConfig) -> None:
    if teacher_mc.vocab_size != student_mc.vocab_size or teacher_mc.padded_vocab_size != student_mc.padded_vocab_size:
        raise UserError(f"teacher vocab {teacher_mc.vocab_size} (padded {teacher_mc.padded_vocab_size}) != student "
                        f"vocab {student_mc.vocab_size} (padded {student_mc.padded_vocab_size}); allowed: the same "
                        f"tokenizer and make_vocab_size_divisible_by for both")


def check_tokenizers(teacher_path, student_path) -> None:
    from minitron_nemo.checkpoint.store import tokenizer_digest

    a, b = tokenizer_digest(teacher_path), tokenizer_digest(student_path)
    if a is not None and b is not None and a != b:
        raise UserError(f"the tokenizers of teacher {teacher_path} and student {student_path} differ; "
                        f"allowed: a student pruned from this teacher (same tokenizer)")


def check_teacher_sane(teacher_loss: float, teacher_mc: ModelConfig, max_fraction: float, where: str) -> None:
    """A teacher whose weights did not load (zeros, random) scores about ln(vocab) or worse."""
    limit = max_fraction * math.log(teacher_mc.vocab_size)
    if not math.isfinite(teacher_loss) or teacher_loss > limit:
        raise UserError(f"teacher {where} looks broken: validation loss {teacher_loss:.3f} nats is not below "
                        f"{max_fraction} x ln(vocab {teacher_mc.vocab_size}) = {limit:.3f} (zero or random "
                        f"weights?); allowed: a trained teacher checkpoint")
