"""Plots for run reports: PNG files drawn with matplotlib's Agg canvas, no display and no pyplot
global state, so they work on headless machines and from worker threads.

    histogram_png(values, path, bins=, value_range=, title=, xlabel=)     one histogram
    curves_png({panel: {series: (xs, ys)}}, path, title=, xlabel=)        line panels side by side
    grouped_bars_png(categories, {series: values}, path, title=, ylabel=)  bars per category
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def _figure(width: float = 6, height: float = 4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def histogram_png(values: Sequence[float], path: str | Path, *, bins: int, value_range: tuple[float, float],
                  title: str, xlabel: str, ylabel: str = "count") -> Path:
    """Write a histogram of `values` (bins equal-width bins over value_range) to `path` as PNG."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.hist(list(values), bins=bins, range=value_range, color=COLOURS[0], edgecolor="white")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=value_range)
    return _save(figure, path)


def curves_png(panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], path: str | Path, *,
               title: str, xlabel: str) -> Path:
    """One panel per key of `panels` (its name is the panel's title), one line per series (x, y) in it."""
    from matplotlib.ticker import MaxNLocator

    figure = _figure(4.5 * max(1, len(panels)), 3.6)
    for i, (name, series) in enumerate(panels.items(), 1):
        axes = figure.add_subplot(1, len(panels), i)
        for colour, (label, (xs, ys)) in zip(COLOURS * 4, series.items()):
            axes.plot(list(xs), list(ys), marker="o", markersize=3, color=colour, label=label)
        axes.set(xlabel=xlabel, title=name)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if len(series) > 1:
            axes.legend(fontsize="small")
    figure.suptitle(title)
    return _save(figure, path)


def grouped_bars_png(categories: Sequence[str], series: dict[str, Sequence[float | None]], path: str | Path, *,
                     title: str, ylabel: str, reference: float | None = None, percent: bool = False,
                     ylim: tuple[float, float] | None = None) -> Path:
    """Bars of each series side by side per category, with their values written on top; a missing
    value (None or NaN) leaves a gap. `reference` draws a dashed horizontal line (e.g. ½ or 0);
    `ylim` fixes the value axis (e.g. (0, 1) for probabilities)."""
    figure = _figure(max(5.0, 1.3 * len(categories) * max(1, len(series)) / 2 + 3), 4)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(series))
    for k, (colour, (label, values)) in enumerate(zip(COLOURS * 4, series.items())):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(categories))]
        shown = [(x, v) for x, v in zip(xs, values) if v is not None and not math.isnan(v)]
        bars = axes.bar([x for x, _ in shown], [v for _, v in shown], width, color=colour, label=label)
        axes.bar_label(bars, labels=[f"{v:.0%}" if percent else f"{v:.2f}" for _, v in shown], fontsize="small")
    if reference is not None:
        axes.axhline(reference, color="grey", linestyle="--", linewidth=1)
    axes.set_xticks(range(len(categories)), list(categories))
    axes.set(title=title, ylabel=ylabel)
    if ylim is not None:
        axes.set_ylim(*ylim)
    else:
        axes.margins(y=0.15)
    if len(series) > 1:
        axes.legend(fontsize="small")
    return _save(figure, path)
