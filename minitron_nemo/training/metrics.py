"""Training logs: console progress line, JSONL metrics, optional TensorBoard, FLOPs/MFU, loss-curve PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

from minitron_nemo import runtime
from minitron_nemo.errors import UserError
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.readers import read_jsonl


def flops_per_token(mc: ModelConfig, seq_length: int, backward: bool) -> float:
    """Matmul FLOPs per token: 2 x (non-embedding params + output layer) + attention scores/values;
    x3 with the backward pass."""
    h, L = mc.hidden_size, mc.num_layers
    q = mc.num_attention_heads * mc.head_dim
    kv = 2 * mc.num_query_groups * mc.head_dim
    fc1 = (2 if mc.gated else 1) * mc.ffn_hidden_size
    dense = L * (h * (q + kv) + q * h + h * fc1 + mc.ffn_hidden_size * h) + mc.padded_vocab_size * h
    fwd = 2 * dense + 2 * 2 * L * q * seq_length  # QK^T and PV, causal mask not discounted
    return fwd * (3 if backward else 1)


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MetricsLog:
    """Writes ``metrics.jsonl`` (+ TensorBoard when importable) on rank 0 and prints progress lines."""

    def __init__(self, workdir, total_iters: int, peak_flops: float | None, tensorboard: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.total, self.peak = total_iters, peak_flops
        self.tb = None
        self.t_start, self.iters_timed = None, 0
        if runtime.is_rank0():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
                except Exception:
                    self.tb = None

    def write(self, record: dict) -> None:
        if not runtime.is_rank0():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("iteration", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)
            self.tb.flush()

    def train(self, it: int, losses: dict, lr: float, grad_norm, tokens: int, seconds: float,
              flops: float, world: int) -> dict:
        """Log one iteration (``tokens``/``flops`` of the whole step on all ranks)."""
        if self.t_start is None:
            self.t_start = time.time() - seconds
        self.iters_timed += 1
        avg = (time.time() - self.t_start) / self.iters_timed
        tps = tokens / max(seconds, 1e-9)
        mfu = flops / max(seconds, 1e-9) / (self.peak * world) if self.peak else None
        rec = {"kind": "train", "iteration": it, **{k: float(v) for k, v in losses.items()}, "lr": lr,
               "grad_norm": None if grad_norm is None else float(grad_norm), "tokens_per_s": tps,
               "step_s": seconds, "mfu": mfu}
        self.write(rec)
        loss_txt = " ".join(f"{k} {float(v):.4f}" for k, v in losses.items())
        mfu_txt = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        gn = "n/a" if grad_norm is None else f"{float(grad_norm):.3f}"
        runtime.print0(f"[train] iter {it}/{self.total} | {loss_txt} | lr {lr:.3e} | grad {gn} | "
                       f"{tps:.0f} tok/s | {seconds:.2f}s/it | ETA {_fmt_time(avg * (self.total - it))} | "
                       f"MFU {mfu_txt}")
        return rec

    def valid(self, it: int, losses: dict) -> None:
        self.write({"kind": "valid", "iteration": it, **{k: float(v) for k, v in losses.items()}})
        runtime.print0(f"[valid] iter {it} | " + " | ".join(f"{k} {float(v):.4f}" for k, v in losses.items()))


def plot_losses(metrics_file, out_png, title: str = "loss") -> Path | None:
    """Loss curves (train total/components and validation) from ``metrics.jsonl``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    try:  # the plot is a by-product of training: an unreadable log skips it, the run itself stands
        recs = read_jsonl(metrics_file, "training metrics")
    except UserError as e:
        runtime.print0(f"note: {e}; loss plot not drawn")
        return None
    last = {}
    for r in recs:  # a resumed run re-logs iterations: keep the latest record of each
        last[(r["kind"], r["iteration"])] = r
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, style in (("train", "-"), ("valid", "o--")):
        rows = sorted((r for (k, _), r in last.items() if k == kind), key=lambda r: r["iteration"])
        keys = [k for k in ("total", "lm", "logits", "intermediate", "student_lm", "kd", "teacher_lm", "dpo")
                if rows and any(isinstance(r.get(k), float) and r.get(k) for r in rows)]
        for k in keys:
            ax.plot([r["iteration"] for r in rows], [r.get(k) for r in rows], style, label=f"{kind} {k}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
