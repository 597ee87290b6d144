"""Pruning artifacts: importance scores (``importance.safetensors`` + ``importance.json``) written and read
back (``prune.importance.load``), the importance plot, and the budget search's candidate table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List

from minitron_nemo import readers, runtime
from minitron_nemo.errors import UserError
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.prune.plot import plot_importance
from minitron_nemo.prune.targets import Targets, budget

SCORES_FILE, META_FILE = "importance.safetensors", "importance.json"


def save_scores(out_dir, scores: dict, meta: dict) -> Path:
    """``importance.safetensors`` (global fp32 scores) and ``importance.json`` (rank 0 only)."""
    from safetensors.torch import save_file

    d = Path(out_dir)
    if runtime.is_rank0():
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().float() for k, v in scores.items()}, str(d / SCORES_FILE))
        (d / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return d


def load_scores(path, mc: ModelConfig) -> tuple[dict, dict]:
    """Scores saved by ``save_scores`` (a directory or the .safetensors file), checked against ``mc``."""
    from safetensors.torch import load_file

    p = Path(path)
    f = p / SCORES_FILE if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"prune.importance.load={path} has no {SCORES_FILE}; allowed: a directory "
                        f"written by a previous prune run (or the .safetensors file)")
    with readers.reading(f, "importance scores"):
        scores = load_file(str(f))
    meta_f = f.parent / META_FILE
    meta = readers.read_json(meta_f, "importance metadata") if meta_f.is_file() else {}
    want = {"hidden": (mc.hidden_size,), "heads": (mc.num_layers, mc.num_attention_heads),
            "groups": (mc.num_layers, mc.num_query_groups), "ffn": (mc.num_layers, mc.ffn_hidden_size),
            "layer_bi": (mc.num_layers,)}
    if mc.is_moe:
        from minitron_nemo.prune.experts import EXPERT_SCORES

        want.update({f"expert_{k}": (mc.num_layers, mc.num_moe_experts) for k in EXPERT_SCORES})
        want["expert_ffn"] = (mc.num_layers, mc.num_moe_experts, mc.moe_ffn_hidden_size)
        if mc.moe_shared_expert_intermediate_size:
            want["shared_ffn"] = (mc.num_layers, mc.moe_shared_expert_intermediate_size)
    if mc.is_hybrid:
        want["mamba_heads"] = (mc.num_layers, mc.mamba_num_heads)
        want["mamba_head_dim"] = (mc.num_layers, mc.mamba_head_dim)
    for k, shape in want.items():
        if k not in scores or tuple(scores[k].shape) != shape:
            got = tuple(scores[k].shape) if k in scores else "missing"
            raise UserError(f"prune.importance.load={path}: score {k!r} has shape {got}, the checkpoint "
                            f"needs {shape}; allowed: scores computed on this checkpoint")
    return scores, meta


def save_artifacts(out_dir, mc: ModelConfig, result, targets: Targets, title: str = "") -> None:
    """importance.safetensors / .json / .png and, for a budget search, candidates.csv / .md (rank 0)."""
    save_scores(out_dir, result.scores, result.meta)
    if result.candidates:
        write_candidates(out_dir, result.candidates, budget(mc, targets), counted_column(targets))
    if runtime.is_rank0():
        plot_importance(result.scores, Path(out_dir) / "importance.png", title)


def counted_column(targets: Targets) -> str:
    """The table column a budget counts: ``active_params`` for ``target_active_params``, else ``params``."""
    return "active_params" if targets.counts_active() else "params"


def write_candidates(out_dir, table: List[dict], budget: int, counted: str = "params", *,
                     ranked_by: str | None = "zero-shot calibration loss", note: str = "") -> None:
    """``candidates.csv`` and ``candidates.md`` (rank 0 only): ``table`` best first, each row with its
    ``counted`` column over the budget last. ``ranked_by`` goes into the title, ``note`` below it."""
    if not runtime.is_rank0() or not table:
        return
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    cols = list(table[0].keys())
    with open(d / "candidates.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(table)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    what = "active params" if counted == "active_params" else "params"
    lines = [f"# Pruning candidates (budget {budget} {what}{f', ranked by {ranked_by}' if ranked_by else ''})", "",
             *([note, ""] if note else []),
             "| " + " | ".join(cols + [f"{counted}/budget"]) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in table:
        lines.append("| " + " | ".join(fmt(r[c]) for c in cols) + f" | {r[counted] / budget:.3f} |")
    (d / "candidates.md").write_text("\n".join(lines) + "\n")
