"""Direct preference optimization on Megatron-Core: the policy trains, the reference (the starting
checkpoint, frozen) runs beside it in the same job, as the teacher does in distillation (``KDStage``:
any TP x PP x DP).

A micro-batch holds pairs, ``[b, 2, s]`` (chosen, rejected); the forward flattens it to ``[2b, s]``. Per
side, ``log pi(y|x)`` is the sum of the response tokens' log-probabilities (vocab-parallel under TP):

    dpo = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

Metrics: ``dpo``; ``reward_chosen`` / ``reward_rejected`` (beta times each side's log-ratio), their
``margin`` and ``reward_accuracy`` (the share of pairs whose chosen reward is higher). At the first step
the policy is the reference, so ``dpo`` is ln 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minitron_nemo.checks import positive_number
from minitron_nemo.distill import online
from minitron_nemo.distill.config import DistillationConfig
from minitron_nemo.training.setup import Step


@dataclass
class DPOConfig:
    beta: float = 0.1

    def check(self, at: str) -> None:
        positive_number(f"{at}.beta", self.beta)


def flatten(batch: dict) -> dict:
    """Pairs ``[b, 2, s]`` -> rows ``[2b, s]`` (chosen, rejected, chosen, ...)."""
    return {k: (v.reshape(-1, *v.shape[2:]) if torch.is_tensor(v) and v.dim() == 3 else v) for k, v in batch.items()}


def forward(model, batch):
    return online.kd_forward(model, flatten(batch))


def sequence_logps(logits, batch) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities per row ``[2b]``."""
    rows = flatten(batch)
    mask = rows["loss_mask"].to(logits.device).float()
    return -(online.token_nll(logits, rows["labels"].to(logits.device)) * mask).sum(-1)


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict:
    """The DPO loss and rewards from per-row log-probabilities ``[2b]`` (chosen rows even, rejected odd)."""
    ratio = policy - reference.detach()
    chosen, rejected = beta * ratio[0::2], beta * ratio[1::2]
    margin = chosen - rejected
    return {"dpo": -F.logsigmoid(margin).mean(), "reward_chosen": chosen.detach().mean(),
            "reward_rejected": rejected.detach().mean(), "margin": margin.detach().mean(),
            "reward_accuracy": (chosen > rejected).float().mean().detach()}


def loss(cfg: DPOConfig, batch, output):
    terms = dpo_terms(sequence_logps(output["student"], batch), sequence_logps(output["teacher"], batch), cfg.beta)
    return terms["dpo"], {k: v.detach().float() for k, v in terms.items()}


def build(cfg: DPOConfig, policy, reference, mc) -> Step:
    """The training step: the frozen ``reference`` beside ``policy`` (both of shape ``mc``)."""
    return Step(forward, lambda b, o: loss(cfg, b, o), lambda b, o: loss(cfg, b, o),
                wrap=lambda ddp: online.KDStage(ddp, reference, mc, mc, DistillationConfig()), teacher_mc=mc)
