"""Pieces of experiment reports: loss curves from ``metrics.jsonl``, Markdown tables, the hardware line."""

from __future__ import annotations

import platform
from pathlib import Path

from minitron_nemo.readers import read_jsonl


def valid_curve(metrics_file, key: str = "student_lm", tokens_per_iter: int = 1) -> tuple[list, list]:
    """(tokens seen, validation ``key``) of one run; a resumed run's repeated points keep the latest."""
    last = {}
    for r in read_jsonl(metrics_file, "training metrics"):
        if r.get("kind") == "valid" and key in r:
            last[r["iteration"]] = r[key]
    its = sorted(last)
    return [i * tokens_per_iter for i in its], [last[i] for i in its]


def plot_curves(curves: dict, path, title: str, ylabel: str = "held-out loss (nats)") -> Path:
    """``curves``: {label: (x, y)} drawn on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, (x, y) in curves.items():
        ax.plot(x, y, "o-", label=label, markersize=3)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_bars(values: dict, path, title: str, ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    v = list(values.values())
    bars = ax.bar(range(len(values)), v, color="C0")
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    lo, hi = min(v), max(v)
    ax.set_ylim(lo - 0.5 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))  # the differences, not the zero
    ax.set_xticks(range(len(values)), list(values), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def md_table(header: list, rows: list) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def hardware() -> str:
    import torch

    from minitron_nemo.eval.generate import device_name

    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:
        mcore = "?"
    return (f"{device_name()}; torch {torch.__version__}, megatron-core {mcore}, Python {platform.python_version()}")


def replace_block(path, begin: str, end: str, text: str) -> bool:
    """Replace the text between the ``begin`` and ``end`` marker lines of ``path`` (False if absent)."""
    p = Path(path)
    s = p.read_text()
    if begin not in s or end not in s:
        return False
    head, rest = s.split(begin, 1)
    _, tail = rest.split(end, 1)
    p.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    return True
