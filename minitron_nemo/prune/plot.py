"""One PNG summarising the importance scores: per-layer importance and sorted channel / neuron / head scores."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_importance(scores: dict, path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    L = scores["layer_bi"].numel()
    x = range(1, L + 1)
    a = ax[0, 0]
    a.plot(x, scores["layer_bi"].numpy(), "o-", label="Block Importance 1 - cos")
    a.set_xlabel("layer (1-indexed)")
    a.set_ylabel("BI")
    if "layer_loss" in scores:
        b = a.twinx()
        b.plot(x, scores["layer_loss"].numpy(), "s--", color="C1", label="LM loss increase if removed")
        b.set_ylabel("loss increase")
        b.legend(loc="upper right")
    a.legend(loc="upper left")
    a.set_title("per-layer importance")
    a = ax[0, 1]
    a.plot(torch.sort(scores["hidden"], descending=True).values.numpy())
    a.set_yscale("log")
    a.set_title("hidden channels (sorted)")
    a.set_xlabel("rank")
    a = ax[1, 0]
    if "expert_routed_l2" in scores:  # MoE: the experts (layer x expert) instead of dense MLP neurons
        e = scores["expert_routed_l2"]
        im = a.imshow(e.numpy().T, aspect="auto", origin="lower", cmap="magma",
                      extent=(0.5, L + 0.5, -0.5, e.shape[1] - 0.5))
        fig.colorbar(im, ax=a)
        a.set_title("experts: routed output L2 (layer x expert)")
        a.set_xlabel("layer (1-indexed)")
        a.set_ylabel("expert")
    else:
        ffn = torch.sort(scores["ffn"], dim=1, descending=True).values
        for i in range(ffn.shape[0]):
            a.plot(ffn[i].numpy(), color=matplotlib.cm.viridis(i / max(ffn.shape[0] - 1, 1)), lw=0.8)
        a.set_yscale("log")
        a.set_title("MLP neurons per layer (sorted; colour = layer)")
        a.set_xlabel("rank")
    a = ax[1, 1]
    im = a.imshow(scores["heads"].numpy().T, aspect="auto", origin="lower", cmap="viridis",
                  extent=(0.5, L + 0.5, -0.5, scores["heads"].shape[1] - 0.5))
    fig.colorbar(im, ax=a)
    a.set_title("attention heads (layer x head)")
    a.set_xlabel("layer (1-indexed)")
    a.set_ylabel("head")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
