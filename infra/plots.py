"""Small PNG plots for MLflow artifacts (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def line_plot(values: list[float], path: str | Path, title: str, xlabel: str, ylabel: str, log_y: bool = True) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.5), dpi=100)
    axes.plot(range(len(values)), values, marker="o", markersize=3)
    if log_y and all(v > 0 for v in values):
        axes.set_yscale("log")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
    return Path(path)
