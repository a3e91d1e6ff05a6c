"""Matplotlib charts of the reports, returned as PNG bytes.

Figures are built on the Agg canvas directly (no pyplot): no global state, no display needed.

Every chart gets a title and axis labels with units from the caller; the reading aid is set as
text under the chart by the renderers. Text uses the embedded Japanese-capable font
(:mod:`report.fonts`) in both languages, so client data in Japanese (channel or
category names) never turns into boxes.
"""
from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from report.fonts import matplotlib_font

WIDTH, HEIGHT, DPI = 7.6, 3.3, 150
PALETTE = ("#1f4e79", "#e07b39", "#7f9c3a", "#a23b72", "#4f9fd6", "#c9a227", "#6b6b6b", "#3a8f85")
GREY = "#9aa5b1"
Formatter = Callable[[float], str]


@contextmanager
def figure(width: float = WIDTH, height: float = HEIGHT) -> Iterator[Figure]:
    rc = {"font.family": matplotlib_font(), "font.size": 9.5, "axes.titlesize": 11.5,
          "axes.titleweight": "normal", "axes.labelsize": 9.5, "axes.unicode_minus": False,
          "axes.spines.top": False, "axes.spines.right": False, "legend.fontsize": 8.5,
          "legend.frameon": False}
    with rc_context(rc):
        fig = Figure(figsize=(width, height), dpi=DPI)
        FigureCanvasAgg(fig)
        yield fig


def to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout(pad=0.6)
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def _money_axis(axis, fmt: Formatter) -> None:
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))


def _finish(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", color="#e5e8ec", linewidth=0.8)
    ax.set_axisbelow(True)


def histogram(edges: np.ndarray, counts: np.ndarray, *, title: str, xlabel: str, ylabel: str,
              x_fmt: Formatter, marker: float | None = None, marker_label: str | None = None,
              open_ended: bool = True) -> bytes:
    with figure() as fig:
        ax = fig.add_subplot()
        widths = np.diff(edges)
        colors = [PALETTE[0]] * len(counts)
        if open_ended:
            colors[-1] = PALETTE[1]       # the overflow bin, explained by the reading aid
        ax.bar(edges[:-1], counts, width=widths, align="edge", color=colors, edgecolor="white", linewidth=0.5)
        if marker is not None:
            ax.axvline(marker, color=PALETTE[3], linestyle="--", linewidth=1.2, label=marker_label)
            if marker_label:
                ax.legend(loc="upper right")
        _money_axis(ax.xaxis, x_fmt)
        ax.set_xlim(edges[0], edges[-1])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_major_locator(MaxNLocator(8))
        _finish(ax, title, xlabel, ylabel)
        return to_png(fig)


def bars(labels: Sequence[str], series: dict[str, Sequence[float]], *, title: str, xlabel: str, ylabel: str,
         y_fmt: Formatter, annotations: Sequence[str] | None = None, percent: bool = False) -> bytes:
    """Vertical bars; several series side by side."""
    with figure() as fig:
        ax = fig.add_subplot()
        x = np.arange(len(labels))
        n = max(len(series), 1)
        width = 0.8 / n
        for i, (name, values) in enumerate(series.items()):
            ax.bar(x + (i - (n - 1) / 2) * width, values, width=width * 0.95, label=name,
                   color=PALETTE[i % len(PALETTE)])
        if annotations is not None:
            tops = np.nanmax(np.array([list(v) for v in series.values()], dtype=float), axis=0)
            for xi, top, text in zip(x, tops, annotations):
                ax.annotate(text, (xi, top), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=8, color="#333333")
            ax.margins(y=0.15)
        ax.set_xticks(x, labels, rotation=0 if len(labels) <= 8 else 45, ha="center" if len(labels) <= 8 else "right")
        if percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        else:
            _money_axis(ax.yaxis, y_fmt)
        if len(series) > 3:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))   # many series: keep the bars clear
        elif len(series) > 1:
            ax.legend(loc="upper right", ncols=len(series))
        _finish(ax, title, xlabel, ylabel)
        return to_png(fig)


def hbars(labels: Sequence[str], values: Sequence[float], annotations: Sequence[str], *, title: str,
          xlabel: str, ylabel: str, x_fmt: Formatter,
          ranges: tuple[Sequence[float], Sequence[float]] | None = None) -> bytes:
    """Horizontal bars; ``ranges`` (lows, highs): a whisker per bar (NaN: none), the annotation after it."""
    height = max(2.4, 0.9 + 0.32 * len(labels))
    with figure(height=height) as fig:
        ax = fig.add_subplot()
        y = np.arange(len(labels))[::-1]
        ax.barh(y, values, color=PALETTE[0], height=0.65)
        ends = list(values)
        if ranges is not None:
            low, high = (np.asarray(r, dtype=float) for r in ranges)
            value = np.asarray(values, dtype=float)
            shown = np.isfinite(low) & np.isfinite(high)
            # a total likely to be 0 may have P90 below its mean (models/intervals.py): no negative whisker
            ax.errorbar(value[shown], y[shown], xerr=[np.maximum(value - low, 0)[shown],
                                                      np.maximum(high - value, 0)[shown]],
                        fmt="none", ecolor=GREY, elinewidth=1.2, capsize=3)
            ends = np.where(shown, np.fmax(high, value), value).tolist()
        for yi, value, text in zip(y, ends, annotations):
            ax.annotate(text, (value, yi), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_yticks(y, labels)
        ax.margins(x=0.18)
        _money_axis(ax.xaxis, x_fmt)
        ax.xaxis.set_major_locator(MaxNLocator(6))
        _finish(ax, title, xlabel, ylabel)
        ax.grid(axis="y", visible=False)
        ax.grid(axis="x", color="#e5e8ec", linewidth=0.8)
        return to_png(fig)


def pareto(labels: Sequence[str], customer_share: Sequence[float], value_share: Sequence[float], *,
           title: str, xlabel: str, ylabel: str, names: tuple[str, str, str]) -> bytes:
    with figure() as fig:
        ax = fig.add_subplot()
        x = np.arange(len(labels))
        ax.bar(x - 0.2, customer_share, width=0.38, color=GREY, label=names[0])
        ax.bar(x + 0.2, value_share, width=0.38, color=PALETTE[0], label=names[1])
        ax.plot(x, np.cumsum(value_share), color=PALETTE[1], marker="o", markersize=3.5, linewidth=1.6,
                label=names[2])
        ax.set_ylim(0, 1.05)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_xticks(x, labels)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))   # outside: the bars fill the plot
        _finish(ax, title, xlabel, ylabel)
        return to_png(fig)


def stacked(labels: Sequence[str], series: dict[str, Sequence[float]], *, title: str, xlabel: str, ylabel: str,
            y_fmt: Formatter, hatched: Sequence[bool] = ()) -> bytes:
    with figure() as fig:
        ax = fig.add_subplot()
        x = np.arange(len(labels))
        bottom = np.zeros(len(labels))
        for i, (name, values) in enumerate(series.items()):
            values = np.asarray(values, dtype=float)
            bars_ = ax.bar(x, values, bottom=bottom, width=0.6, label=name, color=PALETTE[i % len(PALETTE)])
            for bar, hatch in zip(bars_, hatched):
                if hatch:
                    bar.set_hatch("///")
                    bar.set_edgecolor("white")
            bottom += values
        ax.set_xticks(x, labels)
        _money_axis(ax.yaxis, y_fmt)
        ax.legend(loc="upper left", ncols=min(len(series), 4))
        ax.margins(y=0.12)
        _finish(ax, title, xlabel, ylabel)
        return to_png(fig)


def lines(x: Sequence, series: dict[str, Sequence[float]], *, title: str, xlabel: str, ylabel: str,
          y_fmt: Formatter, x_labels: Sequence[str]) -> bytes:
    with figure() as fig:
        ax = fig.add_subplot()
        positions = np.arange(len(x))
        for i, (name, values) in enumerate(series.items()):
            ax.plot(positions, values, label=name, color=PALETTE[i % len(PALETTE)], linewidth=1.6)
        step = max(1, -(-len(x) // 7))    # at most 7 labels: dates need the room
        ax.set_xticks(positions[::step], [x_labels[i] for i in range(0, len(x), step)])
        _money_axis(ax.yaxis, y_fmt)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))   # outside: lines cross the whole plot
        ax.margins(y=0.08)
        _finish(ax, title, xlabel, ylabel)
        return to_png(fig)


def heatmap(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], *, title: str,
            xlabel: str, ylabel: str, cell_fmt: Formatter, percent: bool = False) -> bytes:
    rows, cols = matrix.shape
    height = max(2.6, 1.0 + 0.26 * rows)
    with figure(height=height) as fig:
        ax = fig.add_subplot()
        masked = np.ma.masked_invalid(matrix.astype(float))
        image = ax.imshow(masked, aspect="auto", cmap="Blues", vmin=0)
        finite = matrix[np.isfinite(matrix)]
        threshold = (finite.max() if finite.size else 1) * 0.55
        for r in range(rows):
            for c in range(cols):
                value = matrix[r, c]
                if np.isfinite(value):
                    ax.text(c, r, cell_fmt(value), ha="center", va="center", fontsize=7 if cols > 8 else 8,
                            color="white" if value > threshold else "#222222")
        ax.set_xticks(range(cols), col_labels)
        ax.set_yticks(range(rows), row_labels)
        ax.spines[:].set_visible(False)
        colorbar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
        if percent:
            colorbar.formatter = PercentFormatter(1.0, decimals=0)
            colorbar.update_ticks()
        ax.set_title(title, loc="left")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        return to_png(fig)


def calibration(deciles: Sequence[int], actual: Sequence[float], models: dict[str, Sequence[float]], *,
                title: str, xlabel: str, ylabel: str, y_fmt: Formatter, actual_label: str,
                champion: str | None = None) -> bytes:
    with figure() as fig:
        ax = fig.add_subplot()
        x = np.arange(len(deciles))
        ax.bar(x, actual, width=0.6, color="#d9dee4", label=actual_label)
        markers = "osD^v<>p"
        for i, (name, values) in enumerate(models.items()):
            ax.plot(x, values, marker=markers[i % len(markers)], linestyle="-" if name == champion else ":",
                    linewidth=1.8 if name == champion else 1.0, markersize=4,
                    color=PALETTE[i % len(PALETTE)], label=name + (" ★" if name == champion else ""))
        ax.set_xticks(x, [str(d) for d in deciles])
        _money_axis(ax.yaxis, y_fmt)
        ax.legend(loc="upper right", ncols=2)
        _finish(ax, title, xlabel, ylabel)
        return to_png(fig)
