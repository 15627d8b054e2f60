"""Learning curves of several runs on one picture: validation force MAE against wall time.

Each run is a list of ``(seconds since its start, force MAE in meV/Å)`` points, e.g. the
cumulative ``time`` and ``valid_f_mae`` columns of a run's ``log.csv``
(:func:`read_log_curve`). The figure has wall time in minutes on the x axis and the MAE on a
log axis, one line per run; ``marks`` (``{label: seconds}``) draws a dashed vertical line per
run, for instance where its stage two began. The PNG is written atomically (matplotlib, Agg).
"""
from __future__ import annotations

import csv
from pathlib import Path

from mlpot.fileio import atomic_path

__all__ = ["plot_force_mae_vs_time", "read_log_curve"]


def read_log_curve(run_dir) -> tuple[list[tuple[float, float]], float | None]:
    """``(points, stage-two start)`` from ``<run_dir>/log.csv``: cumulative seconds against the
    validation force MAE, and the seconds at which the first stage-two epoch began (None)."""
    pts, t, stage_two = [], 0.0, None
    with open(Path(run_dir) / "log.csv") as fh:
        for row in csv.DictReader(fh):
            if stage_two is None and row.get("stage") == "2":
                stage_two = t
            t += float(row["time"])
            if row.get("valid_f_mae"):
                pts.append((t, float(row["valid_f_mae"])))
    return pts, stage_two


def plot_force_mae_vs_time(curves: dict, path, title: str = "", marks: dict | None = None,
                           ylabel: str = "valid force MAE (meV/Å)") -> Path:
    """One line per ``{label: [(seconds, MAE), ...]}``; writes ``path`` (PNG) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        for label, pts in curves.items():
            if not pts:
                continue
            t, f = zip(*pts)
            (line,) = ax.semilogy([x / 60.0 for x in t], f, "o-", ms=2.5, lw=1.2, label=label)
            at = (marks or {}).get(label)
            if at is not None:
                ax.axvline(at / 60.0, color=line.get_color(), ls="--", lw=0.8)
        if marks:
            ax.plot([], [], color="grey", ls="--", lw=0.8, label="stage two starts")
        ax.set_xlabel("wall time (min)")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path
