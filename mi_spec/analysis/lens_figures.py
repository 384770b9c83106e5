"""Figures of the layer-wise methods: the logit lens (metric and target rank vs layer, CI bands)
and causal tracing (indirect effects, positions x layers, one panel per restored kind, as in Meng et
al.). PNG bytes, drawn with the helpers of `figures` (matplotlib is imported only when drawing)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mi_spec.analysis.figures import MIN_PT, _diverging_cmap, _figure, _png

FONT = 10.0  # tick text (never below MIN_PT)


Band = tuple[Sequence[float], Sequence[float], Sequence[float]]  # estimate, low, high


def lens_png(
    layers: Sequence[str],
    metric: Band,
    metric_name: str,
    rank: Band | None,
    model_metric: float,
    title: str,
) -> bytes:
    """Two panels against layer: the metric (with the model's own output as a dashed line) and
    the target's rank (log scale); lines with their bootstrap CIs as bands."""
    panels = [(metric, metric_name, False)] + (
        [(rank, "rank of the target (1 = top)", True)] if rank else []
    )
    fig = _figure(width=5.2 * len(panels) + 0.6, height=4.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    x = np.arange(len(layers))
    for ax, (band, ylabel, log) in zip(axes, panels, strict=True):
        est, low, high = (np.asarray(v, dtype=float) for v in band)
        ax.fill_between(x, low, high, color="#4C72B0", alpha=0.25, lw=0, label="95% CI")
        ax.plot(x, est, "o-", color="#4C72B0", lw=1.8, ms=4, label="lens")
        if ylabel == metric_name:
            ax.axhline(model_metric, ls="--", color="#C44E52", lw=1.2, label="model output")
        if log and np.nanmax(high) > 10 * max(np.nanmin(low), 1.0):  # ranks spanning decades
            from matplotlib.ticker import ScalarFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xticks(x, list(layers), rotation=45 if len(layers) > 6 else 0, fontsize=FONT)
        ax.tick_params(labelsize=FONT)
        ax.set_xlabel("residual stream read (layer)", fontsize=11)
        ax.set_ylabel(ylabel, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=MIN_PT, loc="best")
    fig.suptitle(title, fontsize=12)
    return _png(fig)


def tracing_png(
    panels: Sequence[tuple[str, np.ndarray]],
    layers: Sequence[str],
    positions: Sequence[str],
    title: str,
    cbar_label: str,
) -> bytes:
    """One heatmap per restored kind (``[(name, [positions, layers] values)]``): positions down,
    layers across, a colour scale centred at 0 shared by all panels."""
    values = [np.asarray(v, dtype=float) for _, v in panels]
    finite = np.concatenate([np.abs(v[np.isfinite(v)]) for v in values] + [np.zeros(1)])
    vmax = float(finite.max()) or 1.0
    cmap = _diverging_cmap()
    height = min(max(2.2 + 0.26 * len(positions), 3.6), 20.0)
    width = min(1.6 + len(panels) * (1.4 + 0.38 * len(layers)), 24.0)
    fig = _figure(width=max(width, 5.0), height=height)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    image = None
    for ax, (name, _), v in zip(axes, panels, values, strict=True):
        image = ax.imshow(
            v, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest"
        )
        ax.set_xticks(np.arange(len(layers)), list(layers), fontsize=FONT)
        ax.set_yticks(np.arange(len(positions)), list(positions), fontsize=MIN_PT)
        ax.set_xlabel("layer", fontsize=11)
        ax.set_title(f"restore {name}", fontsize=11)
    axes[0].set_ylabel("restored position", fontsize=11)
    cbar = fig.colorbar(image, ax=list(axes), fraction=0.05, pad=0.02)
    cbar.set_label(cbar_label, fontsize=10)
    cbar.ax.tick_params(labelsize=MIN_PT)
    fig.suptitle(title, fontsize=12)
    return _png(fig)
