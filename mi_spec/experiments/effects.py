"""Shared analysis for sweeps of single interventions (activation patching, ablation).

Per variant: the metric under the intervention, its effect (intervened − clean, per example) and,
when a source run exists, the normalised effect mean(v − clean) / mean(source − clean): 0 = no
change, 1 = as if the whole input were the source. Bootstrap CIs over examples.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mi_spec.analysis.figures import heatmap_png
from mi_spec.analysis.report import ExperimentReport
from mi_spec.analysis.stats import bootstrap_ci, bootstrap_ratio_ci
from mi_spec.experiments.base import metric_label
from mi_spec.plan.ir import Job, JobResult

_HEAD = re.compile(r"^L(\d+)\.H(\d+)(:[qkv])?$")


@dataclass
class SweepValues:
    labels: list[str]
    sites: list[str]
    positions: list[str]
    clean: np.ndarray  # [N]
    source: np.ndarray | None  # [N]
    variants: np.ndarray  # [V, N]


def gather(jobs: Sequence[Job], results: Sequence[JobResult]) -> SweepValues:
    """Concatenate per-row values over jobs (which split rows, each with the same variants)."""
    first = jobs[0]
    labels = [v.label for v in first.variants]
    for job in jobs:
        if [v.label for v in job.variants] != labels:
            raise ValueError("jobs of one sweep must share their variants")
    clean = np.concatenate([np.asarray(r.clean, dtype=float) for r in results])
    variants = np.concatenate([np.asarray(r.variants, dtype=float) for r in results], axis=1)
    has_source = all(r.source is not None for r in results)
    source = (
        np.concatenate([np.asarray(r.source, dtype=float) for r in results]) if has_source else None
    )
    sites = [" + ".join(i.site for i in v.interventions) for v in first.variants]
    positions = [
        " + ".join(sorted({"all" if i.pos is None else str(i.pos) for i in v.interventions}))
        for v in first.variants
    ]
    return SweepValues(labels, sites, positions, clean, source, variants)


def sweep_report(
    name: str, kind: str, prefix: str, metric_kind: str, values: SweepValues, seed: int
) -> ExperimentReport:
    """Metrics, a table and a heatmap for a sweep; ``prefix`` is ``patch`` or ``ablation``."""
    rep = ExperimentReport(name=name, kind=kind)
    clean = bootstrap_ci(values.clean, seed=seed)
    _put(rep, f"{prefix}.metric.clean", clean, headline=True)
    effects = bootstrap_ci(values.variants - values.clean, seed=seed)
    norm = None
    if values.source is not None:
        _put(rep, f"{prefix}.metric.source", bootstrap_ci(values.source, seed=seed), headline=True)
        norm = bootstrap_ratio_ci(
            values.variants - values.clean, values.source - values.clean, seed=seed
        )
        ratio = f"{prefix}.effect_norm (÷ source − clean)"
        rep.warnings += near_zero_denominator(ratio, values.source, values.clean, seed)
    score = norm if norm is not None else effects
    rows = []
    for i, label in enumerate(values.labels):
        seg = metric_label(label)
        _put(rep, f"{prefix}.effect.{seg}", _at(effects, i))
        if norm is not None:
            _put(rep, f"{prefix}.effect_norm.{seg}", _at(norm, i))
        rows.append(
            {
                "label": label,
                "site": values.sites[i],
                "position": values.positions[i],
                f"{metric_kind}": float(values.variants[i].mean()),
                "effect": float(effects[0][i]),
                "effect_ci_low": float(effects[1][i]),
                "effect_ci_high": float(effects[2][i]),
                "effect_norm": float(norm[0][i]) if norm is not None else "",
                "effect_norm_ci_low": float(norm[1][i]) if norm is not None else "",
                "effect_norm_ci_high": float(norm[2][i]) if norm is not None else "",
            }
        )
    top = int(np.nanargmax(np.abs(score[0])))
    _put(rep, f"{prefix}.max_effect", _at(score, top), headline=True)
    rep.params = {"top_site": values.labels[top], "n_examples": len(values.clean)}
    rep.tables["effects.csv"] = rows
    what = "normalised effect" if norm is not None else f"Δ {metric_kind}"
    vlim = 1.0 if norm is not None else None
    rep.figures["heatmap.png"] = _heatmap(name, values, score[0], what, score[1:], vlim)
    return rep


def _at(ci: tuple[np.ndarray, np.ndarray, np.ndarray], i: int) -> tuple[float, float, float]:
    return float(ci[0][i]), float(ci[1][i]), float(ci[2][i])


def _put(rep: ExperimentReport, key: str, ci, headline: bool = False) -> None:
    est, low, high = (float(x) for x in ci)
    for k, v in ((key, est), (f"{key}.ci_low", low), (f"{key}.ci_high", high)):
        rep.metrics[k] = v
        if headline:
            rep.headline[k] = v


def _heatmap(
    title: str,
    values: SweepValues,
    score: np.ndarray,
    what: str,
    ci: tuple[np.ndarray, np.ndarray] | None = None,
    vlim: float | None = None,
    names: tuple[str, str] = ("site", "position"),
) -> bytes:
    """Layer × head when every variant is one head at one position; else site × position.
    ``ci``: (low, high) per variant; ``vlim``: the colour limit (1 for normalised effects);
    ``names``: what rows and columns are, when not layer × head."""
    bounds = ci if ci is not None else (np.full(len(score), np.nan),) * 2
    heads = [_HEAD.match(s) for s in values.sites]
    if all(heads) and len(set(values.positions)) == 1:
        layers = sorted({int(m[1]) for m in heads if m})
        n_heads = max(int(m[2]) for m in heads if m) + 1
        cell = [(layers.index(int(m[1])), int(m[2])) for m in heads if m]
        part = {m[3] or "" for m in heads if m}
        rows, cols = [f"L{x}" for x in layers], [f"H{h}{''.join(part)}" for h in range(n_heads)]
        axes = {"ylabel": "layer", "xlabel": f"head (position {values.positions[0]})"}
    else:
        rows, cols = list(dict.fromkeys(values.sites)), list(dict.fromkeys(values.positions))
        cell = [
            (rows.index(s), cols.index(p))
            for s, p in zip(values.sites, values.positions, strict=True)
        ]
        axes = {"ylabel": names[0], "xlabel": names[1]}
    grids = [np.full((len(rows), len(cols)), np.nan) for _ in range(3)]
    for i, (r, c) in enumerate(cell):
        for grid, v in zip(grids, (score, *bounds), strict=True):
            grid[r, c] = v[i]
    est, low, high = (g.tolist() for g in grids)
    band = (low, high) if ci is not None else None
    return heatmap_png(est, rows, cols, title, what, band, vlim=vlim, **axes)


NEAR_ZERO = 0.05  # a ratio's denominator below this share of the metric's scale is "near zero"


def near_zero_denominator(what: str, a: np.ndarray, b: np.ndarray, seed: int) -> list[str]:
    """A warning (or none) for a ratio over mean(a − b) (per-example ``a``, ``b``) whose
    denominator is near zero: its bootstrap CI contains 0, or |mean| < NEAR_ZERO × the scale of
    the metric (the larger of |mean| and standard deviation of ``a`` and of ``b``)."""
    est, low, high = (float(x) for x in bootstrap_ci(a - b, seed=seed))
    scale = max(abs(float(np.mean(x))) for x in (a, b))
    scale = max(scale, float(np.std(a)), float(np.std(b)))
    why = [] if low > 0 or high < 0 else ["its CI contains 0"]
    if abs(est) < NEAR_ZERO * scale:
        why.append(f"|{est:.3g}| < {NEAR_ZERO:.0%} of the metric's scale {scale:.3g}")
    if not why:
        return []
    return [
        f"{what}: the denominator {est:.3g} [{low:.3g}, {high:.3g}] is near zero "
        f"({' and '.join(why)}): the ratio and its CI are unreliable; the model barely tells "
        "the two inputs apart on this metric"
    ]
