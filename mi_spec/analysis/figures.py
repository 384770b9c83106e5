"""Figures rendered headlessly to PNG bytes (for `ExperimentReport.figures`).

Uses matplotlib's object-oriented `Figure` with the Agg canvas directly: no pyplot, no global
backend switch (so importing this never disturbs a notebook's backend), thread-safe, no display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120
ANNOTATE_MAX = 20  # annotate heatmap cells only when both sides are at most this


def heatmap_png(
    values: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    cbar_label: str,
    ci_halfwidth: Sequence[Sequence[float]] | None = None,
) -> bytes:
    """A diverging heatmap centred at 0 (red positive, blue negative, grey NaN).

    Cells are annotated with their value (and ``±ci`` when `ci_halfwidth` is given) when the grid
    is at most 20×20.
    """
    v = np.asarray(values, dtype=float).reshape(len(row_labels), len(col_labels))
    ci = None if ci_halfwidth is None else np.asarray(ci_halfwidth, dtype=float).reshape(v.shape)
    n_rows, n_cols = v.shape
    fig = _figure(
        width=min(max(2.5 + 0.75 * n_cols, 6.0), 22.0),
        height=min(max(1.5 + 0.5 * n_rows, 4.0), 18.0),
    )
    ax = fig.add_subplot()
    vmax = _symmetric_limit(v)
    cmap = _diverging_cmap()
    image = ax.imshow(v, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label(cbar_label, fontsize=11)
    _set_ticks(ax, row_labels, col_labels)
    ax.set_title(title, fontsize=13, pad=10)
    if n_rows <= ANNOTATE_MAX and n_cols <= ANNOTATE_MAX:
        _annotate(ax, v, ci, vmax)
    return _png(fig)


def bars_png(
    labels: Sequence[str],
    values: Sequence[float],
    ci_low: Sequence[float],
    ci_high: Sequence[float],
    title: str,
    ylabel: str,
    reference_lines: dict[str, float] | None = None,
) -> bytes:
    """Bars with asymmetric CI error bars and optional dashed, labelled horizontal reference lines."""
    if not len(labels) == len(values) == len(ci_low) == len(ci_high):
        raise ValueError("labels, values, ci_low and ci_high must have the same length")
    val = np.asarray(values, dtype=float)
    err = np.vstack([val - np.asarray(ci_low, float), np.asarray(ci_high, float) - val])
    err = np.clip(np.nan_to_num(err, nan=0.0), 0.0, None)  # a CI not around the value: no bar
    fig = _figure(width=min(max(2.0 + 0.6 * len(labels), 6.0), 22.0), height=4.8)
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    ax.bar(x, val, yerr=err, capsize=4, color="#4C72B0", edgecolor="black", linewidth=0.6)
    ax.axhline(0.0, color="black", linewidth=0.8, zorder=1)
    for i, (name, y) in enumerate((reference_lines or {}).items()):
        color = f"C{(i + 1) % 10}"
        ax.axhline(y, linestyle="--", linewidth=1.6, color=color, label=name, zorder=3)
    ax.use_sticky_edges = False  # keep a margin so lines at 0 or at the top stay visible
    ax.margins(x=0.02, y=0.08)
    if reference_lines:
        ax.legend(fontsize=9, loc="best")
    rotate = len(labels) > 8 or max((len(s) for s in labels), default=0) > 10
    ax.set_xticks(x, list(labels), rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.tick_params(labelsize=9)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.set_title(title, fontsize=13)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _png(fig)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _diverging_cmap():
    from matplotlib import colormaps

    return colormaps["RdBu_r"].with_extremes(bad="#bbbbbb")


def _symmetric_limit(v: np.ndarray) -> float:
    finite = np.abs(v[np.isfinite(v)])
    vmax = float(finite.max()) if finite.size else 0.0
    return vmax if vmax > 0 else 1.0


def _set_ticks(ax, row_labels: Sequence[str], col_labels: Sequence[str]) -> None:
    size = max(6, min(10, int(240 / max(len(row_labels), len(col_labels), 1))))
    rotate = len(col_labels) > 10 or max((len(s) for s in col_labels), default=0) > 6
    ax.set_yticks(np.arange(len(row_labels)), list(row_labels), fontsize=size)
    ax.set_xticks(
        np.arange(len(col_labels)),
        list(col_labels),
        fontsize=size,
        rotation=45 if rotate else 0,
        ha="right" if rotate else "center",
    )


def _annotate(ax, v: np.ndarray, ci: np.ndarray | None, vmax: float) -> None:
    n_rows, n_cols = v.shape
    size = max(5, min(10, int(150 / max(n_rows, n_cols))))
    for (r, c), value in np.ndenumerate(v):
        if not math.isfinite(value):
            continue
        text = f"{value:.2g}"
        if ci is not None and math.isfinite(ci[r, c]):
            text += f"\n±{ci[r, c]:.1g}"
        color = "white" if abs(value) > 0.6 * vmax else "black"
        ax.text(c, r, text, ha="center", va="center", fontsize=size, color=color)


def scatter_png(
    x: Sequence[float],
    y: Sequence[float],
    labels: Sequence[str],
    title: str,
    xlabel: str,
    ylabel: str,
    highlight: Sequence[int] = (),
    y_err: tuple[Sequence[float], Sequence[float]] | None = None,
) -> bytes:
    """Points ``(x, y)`` with the ``y = x`` line; points ``highlight`` (indices) are drawn in red
    and labelled (e.g. where an estimate and the truth disagree most). ``y_err``: (low, high)."""
    if not len(x) == len(y) == len(labels):
        raise ValueError("x, y and labels must have the same length")
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    fig = _figure(width=6.4, height=5.6)
    ax = fig.add_subplot()
    finite = np.concatenate([xs[np.isfinite(xs)], ys[np.isfinite(ys)]])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "--", color="grey", lw=1, label="y = x")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.axvline(0.0, color="black", lw=0.5)
    if y_err is not None:
        err = np.vstack([ys - np.asarray(y_err[0], float), np.asarray(y_err[1], float) - ys])
        err = np.clip(np.nan_to_num(err, nan=0.0), 0.0, None)
        ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor="#4C72B0", alpha=0.5, lw=1)
    marked = np.zeros(len(xs), dtype=bool)
    marked[list(highlight)] = True
    ax.scatter(xs[~marked], ys[~marked], s=28, color="#4C72B0", edgecolor="black", lw=0.4)
    if marked.any():
        ax.scatter(
            xs[marked],
            ys[marked],
            s=36,
            color="#C44E52",
            edgecolor="black",
            lw=0.4,
            label="largest disagreements",
        )
    for i in np.flatnonzero(marked):
        ax.annotate(
            labels[i],
            (xs[i], ys[i]),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=8,
            color="#C44E52",
        )
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.set_title(title, fontsize=12)
    ax.legend(fontsize=9, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)
