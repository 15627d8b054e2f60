"""Learning curves (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

from mlpot.fileio import atomic_path

__all__ = ["plot_learning_curve"]


def plot_learning_curve(history: list[dict], path) -> int | None:
    """Loss (log scale) and validation MAEs against epoch, written atomically to ``path``; a dashed
    line labelled "stage two" marks the first stage-two epoch, which is returned (None: none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    ax.semilogy(epochs, [r["train_loss"] for r in history], label="train")
    v = [(r["epoch"], r["valid_loss"]) for r in history if r.get("valid_loss") is not None]
    if v:
        ax.semilogy(*zip(*v), "o-", ms=3, label="valid")
    stage2 = [r["epoch"] for r in history if r.get("stage") == 2]
    for a in axes:
        if stage2:
            a.axvline(stage2[0], color="grey", ls="--", lw=0.8, label="stage two starts")
            a.text(stage2[0], 0.98, " stage two", transform=a.get_xaxis_transform(), va="top", fontsize=8,
                   color="grey")
        a.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    for ax, key, label in ((axes[1], "valid_e_mae", "valid E MAE (meV/atom)"),
                           (axes[2], "valid_f_mae", "valid F MAE (meV/Å)")):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            ax.semilogy(*zip(*pts), "o-", ms=3)
        ax.set_ylabel(label)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return stage2[0] if stage2 else None
