"""Small PNG plots for MLflow artifacts (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _figure(path: str | Path, title: str, xlabel: str, ylabel: str, width: float = 7.0) -> Iterator:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(width, 3.8), dpi=100)
    yield axes
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def _log_scale_if_positive(axes, values: list[float]) -> None:
    if values and all(v > 0 for v in values):
        axes.set_yscale("log")


def line_plot(
    series: dict[str, list[float]] | list[float], path: str | Path, title: str, xlabel: str, ylabel: str
) -> Path:
    """One line per named series over its index (e.g. reconstruction error per block), log y when positive."""
    named = series if isinstance(series, dict) else {"": series}
    with _figure(path, title, xlabel, ylabel) as axes:
        for name, values in named.items():
            axes.plot(range(len(values)), values, marker="o", markersize=3, label=name or None)
        _log_scale_if_positive(axes, [v for values in named.values() for v in values])
    return Path(path)


def scatter_plot(
    groups: dict[str, list[tuple[float, float]]], path: str | Path, title: str, xlabel: str, ylabel: str
) -> Path:
    """Points (x, y) per named group, joined in x order (e.g. perplexity vs sparsity per method)."""
    with _figure(path, title, xlabel, ylabel) as axes:
        for name, points in groups.items():
            ordered = sorted(points)
            axes.plot([x for x, _ in ordered], [y for _, y in ordered], marker="o", label=name)
        _log_scale_if_positive(axes, [y for points in groups.values() for _, y in points])
    return Path(path)


def bar_plot(categories: list[str], groups: dict[str, list[float]], path: str | Path, title: str, ylabel: str) -> Path:
    """Grouped bars: one bar per group within each category (e.g. accuracy per task, dense vs pruned)."""
    width = 0.8 / max(len(groups), 1)
    with _figure(path, title, "", ylabel, width=max(7.0, 1.2 * len(categories))) as axes:
        for index, (name, values) in enumerate(groups.items()):
            axes.bar([c + index * width for c in range(len(categories))], values, width, label=name)
        axes.set_xticks([c + 0.4 - width / 2 for c in range(len(categories))], categories)
    return Path(path)
