"""Figures rendered headlessly to PNG bytes (for `ExperimentReport.figures`).

Uses matplotlib's object-oriented `Figure` with the Agg canvas directly: no pyplot, no global
backend switch (so drawing never disturbs a notebook's backend), thread-safe, no display.
matplotlib is imported only when a figure is drawn (importing it costs ~0.5 s), so commands that
draw nothing (``mi-spec validate``) never pay for it.

Every figure follows the same rules, checked by `mi_spec.analysis.figure_check`: a title, labelled
axes (or none, for graphs), no text below `MIN_PT` points at the saved size, no two texts
overlapping, and the same PNG bytes for the same inputs (no date or version in the metadata,
deterministic layout).
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

DPI = 120
MIN_PT = 9.0  # smallest text, in points at the saved size
ANNOTATE_MAX = 20  # annotate heatmap cells only when both sides are at most this
ZERO_MARK = "·"  # a heatmap cell whose 95% CI contains 0
_CHAR_IN = 0.085  # width of one 9-10 pt character, in inches (for sizing figures to their text)


def heatmap_png(
    values: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    cbar_label: str,
    ci: tuple[Sequence[Sequence[float]], Sequence[Sequence[float]]] | None = None,
    *,
    xlabel: str,
    ylabel: str,
    vlim: float | None = None,
    nan_means: str = "not measured",
) -> bytes:
    """A diverging heatmap centred at 0 (red positive, blue negative, grey NaN) as PNG bytes.

    ``ci``: (low, high) grids of 95% CIs. Cells are annotated (grids up to 20×20) with their value
    rounded to what its CI supports (`cell_text`), ``·`` where the CI contains 0. ``vlim``: the
    colour scale is [-vlim, vlim] (1 for normalised effects, so that figures of two hypotheses
    compare); None: symmetric around 0 by the largest |value|. ``nan_means``: what a grey (NaN)
    cell stands for, in the caption.
    """
    v = np.asarray(values, dtype=float).reshape(len(row_labels), len(col_labels))
    low = high = None
    if ci is not None:
        low, high = (np.asarray(g, dtype=float).reshape(v.shape) for g in ci)
    n_rows, n_cols = v.shape
    limit = vlim if vlim is not None else _symmetric_limit(v)
    annotate = n_rows <= ANNOTATE_MAX and n_cols <= ANNOTATE_MAX
    texts = (
        [[cell_text(v[r, c], *_ci_at(low, high, r, c), limit) for c in range(n_cols)]
         for r in range(n_rows)]
        if annotate else [[""] * n_cols for _ in range(n_rows)]
    )  # fmt: skip
    widest = max((len(t) for row in texts for t in row), default=0)
    cell_w = max(0.55, _CHAR_IN * widest + 0.25) if annotate else 0.22
    cell_h = 0.45 if annotate else 0.22
    rotate = n_cols > 6 or max((len(s) for s in col_labels), default=0) > 6
    left = 0.9 + _CHAR_IN * max((len(s) for s in row_labels), default=0)
    below = 0.9 + (_CHAR_IN * max((len(s) for s in col_labels), default=0) if rotate else 0)
    fig = _figure(
        width=min(max(left + n_cols * cell_w + 1.6, 6.5), 22.0),
        height=min(max(1.6 + below + n_rows * cell_h, 4.0), 18.0),
    )
    ax = fig.add_subplot()
    extend = "both" if vlim is not None and np.nanmax(np.abs(v), initial=0) > vlim else "neither"
    image = ax.imshow(
        v, cmap=_diverging_cmap(), vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest"
    )
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, extend=extend)
    cbar.set_label(cbar_label, fontsize=11)
    cbar.ax.tick_params(labelsize=MIN_PT)
    _set_ticks(ax, row_labels, col_labels, rotate, fig.get_size_inches())
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    fig.suptitle(title, fontsize=13)
    notes = []
    if annotate:
        notes.append("cells: estimate rounded to its 95% CI" if ci is not None else "cells: value")
        if any(ZERO_MARK in t for row in texts for t in row):
            notes.append(f"{ZERO_MARK} = CI contains 0")
    if not np.isfinite(v).all():
        notes.append(f"grey = {nan_means}")
    notes.append(
        f"colour scale fixed: ±{limit:g}" if vlim is not None else "colour scale: ±max |value|"
    )
    ax.set_title(_wrap("; ".join(notes), fig), fontsize=MIN_PT, pad=8)
    for (r, c), text in np.ndenumerate(np.asarray(texts, dtype=object)):
        if text:
            dark = math.isfinite(v[r, c]) and abs(v[r, c]) > 0.6 * limit
            size = 2 * MIN_PT if text == ZERO_MARK else MIN_PT
            ax.text(c, r, text, ha="center", va="center", fontsize=size,
                    color="white" if dark else "black")  # fmt: skip
    return _png(fig)


def cell_text(value: float, low: float, high: float, scale: float) -> str:
    """A heatmap cell: ``value`` rounded to its CI (to one significant digit of the half-width,
    never finer than 1% of ``scale``); ``·`` when the CI [low, high] contains 0; ``0`` for a value
    without CI below that resolution (float noise); ``""`` for NaN."""
    if not math.isfinite(value):
        return ""
    has_ci = math.isfinite(low) and math.isfinite(high)
    if has_ci and low <= 0.0 <= high:
        return ZERO_MARK
    half = (high - low) / 2 if has_ci else 0.0
    resolution = max(half, 0.01 * scale, 1e-300)
    decimals = -math.floor(math.log10(resolution))
    rounded = round(value, decimals)
    if rounded == 0:
        return "≈0" if has_ci else "0"
    return f"{rounded:.{max(decimals, 0)}f}"


def _ci_at(low: np.ndarray | None, high: np.ndarray | None, r: int, c: int) -> tuple[float, float]:
    if low is None or high is None:
        return math.nan, math.nan
    return float(low[r, c]), float(high[r, c])


def bars_png(
    labels: Sequence[str],
    values: Sequence[float],
    ci_low: Sequence[float],
    ci_high: Sequence[float],
    title: str,
    ylabel: str,
    reference_lines: dict[str, float] | None = None,
    xlabel: str = "",
) -> bytes:
    """Bars with asymmetric CI error bars and optional dashed, labelled horizontal reference lines."""
    if not len(labels) == len(values) == len(ci_low) == len(ci_high):
        raise ValueError("labels, values, ci_low and ci_high must have the same length")
    val = np.asarray(values, dtype=float)
    err = np.vstack([val - np.asarray(ci_low, float), np.asarray(ci_high, float) - val])
    err = np.clip(np.nan_to_num(err, nan=0.0), 0.0, None)  # a CI not around the value: no bar
    names = [textwrap.fill(s, 11, break_long_words=False) for s in labels]
    rotate = max((len(line) for s in names for line in s.splitlines()), default=0) > 11
    fig = _figure(width=min(max(2.0 + 0.95 * len(labels), 6.5), 22.0), height=5.0)
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
        ax.legend(fontsize=MIN_PT, loc="best")
    ax.set_xticks(x, labels if rotate else names, rotation=90 if rotate else 0)  # never overlap
    ax.tick_params(labelsize=MIN_PT)
    ax.set_xlabel(xlabel or "variant", fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.set_title(title, fontsize=12)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _png(fig)


def scatter_png(
    x: Sequence[float],
    y: Sequence[float],
    labels: Sequence[str],
    title: str,
    xlabel: str,
    ylabel: str,
    highlight: Sequence[int] = (),
    y_err: tuple[Sequence[float], Sequence[float]] | None = None,
    *,
    notes: Sequence[str] = (),
    linthresh: float | None = None,
) -> bytes:
    """Points ``(x, y)`` with the ``y = x`` line on symmetric-log axes (linear within
    ``±linthresh``, by default the smallest |value| above 1e-6 of the largest, to a power of 10).

    Every point is labelled by name in a column beside the axes, with a leader line; points that
    coincide at the drawn scale share one label. Points ``highlight`` (indices) are drawn in red
    (e.g. where an estimate and the truth disagree most). ``y_err``: (low, high). ``notes``: lines
    of caption under the title (e.g. why a CI has zero width).
    """
    if not len(x) == len(y) == len(labels):
        raise ValueError("x, y and labels must have the same length")
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    finite = np.abs(np.concatenate([xs[np.isfinite(xs)], ys[np.isfinite(ys)]]))
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    thresh = linthresh or _linthresh(finite, top)
    lim = 10 ** math.ceil(math.log10(top * 1.5))
    fig = _figure(width=9.5, height=6.4)
    ax = fig.add_subplot()
    for axis in ("x", "y"):
        getattr(ax, f"set_{axis}scale")("symlog", linthresh=thresh, linscale=0.6)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.plot([-lim, lim], [-lim, lim], "--", color="grey", lw=1, label="y = x")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.axvline(0.0, color="black", lw=0.5)
    ax.axvspan(-thresh, thresh, color="#eeeeee", lw=0, zorder=0,
               label=f"linear within ±{thresh:.0e}")  # fmt: skip
    if y_err is not None:
        lo, hi = (np.asarray(e, dtype=float) for e in y_err)
        err = np.clip(np.nan_to_num(np.vstack([ys - lo, hi - ys]), nan=0.0), 0.0, None)
        ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor="#4C72B0", alpha=0.6, lw=1.2,
                    label="95% CI of y")  # fmt: skip
        zero = int(np.sum((hi - lo) == 0))
        if zero:
            notes = [*notes, f"{zero} of {len(ys)} points have a CI of zero width: every example "
                     "gives the same value (e.g. exactly 0), so the bootstrap cannot vary"]  # fmt: skip
    marked = np.zeros(len(xs), dtype=bool)
    marked[list(highlight)] = True
    ax.scatter(xs[~marked], ys[~marked], s=30, color="#4C72B0", edgecolor="black", lw=0.4,
               zorder=3, label="item")  # fmt: skip
    if marked.any():
        ax.scatter(xs[marked], ys[marked], s=40, color="#C44E52", edgecolor="black", lw=0.4,
                   zorder=4, label="largest disagreements")  # fmt: skip
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.tick_params(labelsize=MIN_PT)
    fig.suptitle(title, fontsize=12)
    if notes:
        ax.set_title(_wrap(" ".join(notes), fig, 0.55), fontsize=MIN_PT, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=MIN_PT, loc="upper left")
    _label_points(ax, xs, ys, labels, marked)
    return _png(fig)


def _linthresh(magnitudes: np.ndarray, top: float) -> float:
    """The smallest |value| above float noise (1e-6 of the largest), down to a power of 10."""
    real = magnitudes[magnitudes > 1e-6 * top]
    smallest = float(real.min()) if real.size else top
    return 10.0 ** math.floor(math.log10(smallest))


def _label_points(ax: Axes, xs: np.ndarray, ys: np.ndarray, labels: Sequence[str],
                  marked: np.ndarray) -> None:  # fmt: skip
    """Name every point in a column right of the axes, in the order of the points' heights,
    spaced so that no two labels overlap; points within 6 px of each other share a label."""
    fig = ax.get_figure()
    fig.canvas.draw()  # settle the layout: display positions are final
    ok = np.isfinite(xs) & np.isfinite(ys)
    disp = ax.transData.transform(np.column_stack([np.where(ok, xs, 0), np.where(ok, ys, 0)]))
    groups: list[list[int]] = []
    for i in sorted(np.flatnonzero(ok), key=lambda i: (-disp[i][1], disp[i][0], labels[i])):
        near = next((g for g in groups if np.hypot(*(disp[g[0]] - disp[i])) < 6), None)
        near.append(i) if near is not None else groups.append([i])
    texts = []
    for g in groups:
        names = ", ".join(labels[i] for i in g)
        head = f"{len(g)} items: " if len(g) > 1 else ""
        texts.append(textwrap.fill(head + names, 34))
    lines = [t.count("\n") + 1 for t in texts]
    line_px = MIN_PT * 1.35 * fig.dpi / 72
    box = ax.get_window_extent()
    wanted = [float(disp[g[0]][1]) for g in groups]  # top to bottom
    placed: list[float] = []  # each label's top edge: at its point, pushed below the one above
    for i, (want, n) in enumerate(zip(wanted, lines, strict=True)):
        ceiling = placed[-1] - line_px * lines[i - 1] - 4 if placed else box.y1
        placed.append(min(want + line_px * n / 2, ceiling))
    overflow = box.y0 - (placed[-1] - line_px * lines[-1]) if placed else 0
    if overflow > 0:  # ran off the bottom: shift everything up, keeping the spacing
        placed = [p + overflow for p in placed]
    to_axes = ax.transAxes.inverted()
    for g, text, top in zip(groups, texts, placed, strict=True):
        _, ty = to_axes.transform((0, top))
        red = bool(marked[g].any())
        ax.annotate(
            text, xy=(xs[g[0]], ys[g[0]]), xytext=(1.03, ty), textcoords="axes fraction",
            ha="left", va="top", fontsize=MIN_PT, color="#C44E52" if red else "#222222",
            arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "#888888", "shrinkA": 0,
                        "shrinkB": 3, "relpos": (0.0, 1.0)},
            annotation_clip=False,
        )  # fmt: skip


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    """The figure as PNG bytes at `DPI`, without metadata (same inputs: same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _wrap(text: str, fig: Figure, share: float = 0.8) -> str:
    """``text`` wrapped to ``share`` of the figure's width at 9 pt."""
    width = int(share * fig.get_size_inches()[0] / (_CHAR_IN * 0.85))
    return textwrap.fill(text, max(width, 30))


def _diverging_cmap() -> Colormap:
    from matplotlib import colormaps

    return colormaps["RdBu_r"].with_extremes(bad="#bbbbbb")


def _symmetric_limit(v: np.ndarray) -> float:
    finite = np.abs(v[np.isfinite(v)])
    vmax = float(finite.max()) if finite.size else 0.0
    return vmax if vmax > 0 else 1.0


def _set_ticks(ax: Axes, row_labels: Sequence[str], col_labels: Sequence[str], rotate: bool,
               size_in: Sequence[float]) -> None:  # fmt: skip
    """Every label at 9 pt; when they cannot all fit, every k-th."""
    room = MIN_PT * 1.6 / 72  # inches per label along the axis
    step_r = max(1, math.ceil(len(row_labels) * room / (0.7 * size_in[1])))
    step_c = max(1, math.ceil(len(col_labels) * room / (0.7 * size_in[0])))
    rows = np.arange(0, len(row_labels), step_r)
    cols = np.arange(0, len(col_labels), step_c)
    ax.set_yticks(rows, [row_labels[i] for i in rows], fontsize=MIN_PT)
    ax.set_xticks(
        cols,
        [col_labels[i] for i in cols],
        fontsize=MIN_PT,
        rotation=90 if rotate else 0,  # upright: neighbouring labels' boxes never overlap
    )
