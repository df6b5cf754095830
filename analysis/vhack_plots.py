"""v_hack figures (matplotlib Agg): the held-out validation histogram of `rankguard vhack validate`.
Kept out of learner/, which computes the directions and draws nothing."""
from __future__ import annotations

from pathlib import Path

from learner.vhack import ValidationReport


def plot_validation(report: ValidationReport, png_path: str | Path) -> Path:
    """Histogram of per-module held-out cos (healthy: unimodal, positive, median > 0.3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(report.cos, bins=40, range=(-1, 1),
            color="#3b75af", edgecolor="white")
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(report.median, color="#d62728", ls="--", lw=1.2, label=f"median {report.median:+.2f}")
    ax.set_xlabel("cos(held-out grad diff, v_hack) per module")
    ax.set_ylabel("modules")
    ax.set_title(f"v_hack validation: {report.frac_positive:.0%} > 0, mean {report.mean:+.2f} "
                 f"({'pass' if report.passed else 'FAIL'})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
