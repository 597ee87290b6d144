"""Shared recipe setup for training jobs (teacher correction, distillation)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from minitron_nemo.checkpoint import store
from minitron_nemo.config import model_config
from minitron_nemo.errors import UserError
from minitron_nemo.models.config import ModelConfig

SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "vocab_size")


def resolve_source(path) -> str:
    """``smollm2`` names the cached SmolLM2-135M HF dir; anything else is a path."""
    if str(path) == "smollm2":
        from minitron_nemo.data import assets

        return str(assets.smollm2_hf_dir())
    if not Path(path).is_dir():
        raise UserError(f"teacher.checkpoint={path} does not exist; allowed: an HF model dir, a minitron_nemo "
                        f"checkpoint or smollm2")
    return str(path)


def teacher_source(cfg) -> tuple[str, bool]:
    """``(path, corrected)``: the corrected teacher when it exists, else ``teacher.checkpoint``."""
    c = cfg.teacher.corrected_checkpoint
    if c and store.is_checkpoint(c):
        return str(c), True
    return resolve_source(cfg.teacher.checkpoint), False


def check_model_shape(cfg, mc: ModelConfig, what: str) -> None:
    """When the job names a ``model`` shape, the loaded checkpoint must have it."""
    node = cfg.get("model")
    if node is None:
        return
    want = model_config(node)
    diff = [f"{k} {getattr(mc, k)} != {getattr(want, k)}" for k in SHAPE_KEYS if getattr(mc, k) != getattr(want, k)]
    if diff:
        raise UserError(f"{what} does not have the shape of the configured model: {', '.join(diff)}")


def to_dict(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)
