"""The report of an attribution-patching experiment: ``attrib.*`` metrics (rank correlations
between estimate and real patching, with bootstrap CIs), the estimates and verification tables,
the disagreement warnings, the estimate-vs-truth scatter and the estimates heatmap."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mi_spec.analysis.figures import scatter_png
from mi_spec.analysis.report import ExperimentReport
from mi_spec.analysis.stats import bootstrap_ci, bootstrap_correlation_ci, pearson, ranks
from mi_spec.experiments.base import CompileContext, metric_label
from mi_spec.experiments.effects import SweepValues, _heatmap, _put
from mi_spec.plan.ir import Job, JobResult

if TYPE_CHECKING:
    from mi_spec.experiments.attribution_patching import AttributionPatchingSpec

ZERO_TOL = 1e-6  # |effect| below this share of the largest is float noise: ranked as 0
SIZEABLE = 0.1  # of the largest |effect| among verified items: below it, disagreements are noise
REL_TOL = 0.5  # |estimate - truth| above this share of |truth| is a disagreement


def attribution_report(
    spec: AttributionPatchingSpec, ctx: CompileContext, job: Job, result: JobResult
) -> ExperimentReport:
    """Metrics ``attrib.*``, tables, the estimate-vs-truth scatter and the estimates heatmap."""
    name = f"{spec.label}@{ctx.hypothesis}"
    rep = ExperimentReport(name=name, kind=spec.kind)
    x, seed = result.extra, spec.seed
    labels: list[str] = x["labels"]
    items = job.params["items"]
    est = np.asarray(x["estimates"], dtype=float)  # [items, N]
    chosen: list[int] = x["verified"]
    truth = np.asarray(x["truth"], dtype=float).reshape(len(chosen), -1)  # [k, N]
    est_ci = bootstrap_ci(est, seed=seed)
    truth_ci = bootstrap_ci(truth, seed=seed)
    ranked = np.argsort(-np.abs(est_ci[0]), kind="stable")
    rank = np.empty(len(labels), dtype=int)
    rank[ranked] = np.arange(1, len(labels) + 1)

    _put(rep, "attrib.metric.clean", bootstrap_ci(np.asarray(result.clean), seed=seed), True)
    if result.source is not None:
        _put(rep, "attrib.metric.source", bootstrap_ci(np.asarray(result.source), seed=seed), True)
    rho = bootstrap_correlation_ci(est[chosen], truth, "spearman", True, ZERO_TOL, seed=seed)
    _put(rep, "attrib.spearman", rho, headline=True)
    signed = bootstrap_correlation_ci(est[chosen], truth, "spearman", False, ZERO_TOL, seed=seed)
    _put(rep, "attrib.spearman_signed", signed)
    r_pearson = float(pearson(est_ci[0][chosen], truth_ci[0])) if len(chosen) > 1 else np.nan
    rep.metrics["attrib.pearson"] = r_pearson
    top_est = labels[chosen[0]]
    top_true = labels[chosen[int(np.argmax(np.abs(truth_ci[0])))]]
    rep.metrics["attrib.top1_agrees"] = float(top_est == top_true)
    rep.headline["attrib.top1_agrees"] = rep.metrics["attrib.top1_agrees"]
    rep.metrics["attrib.top_k"] = float(job.params["top_k"])
    rep.metrics["attrib.n_sites"] = float(len(labels))
    for j, i in enumerate(chosen):
        seg = metric_label(labels[i].replace("->", ".to."))
        _put(rep, f"attrib.estimate.{seg}", [c[i] for c in est_ci])
        _put(rep, f"attrib.verified.{seg}", [c[j] for c in truth_ci])

    table = _verification_table(labels, chosen, est_ci, truth_ci)
    flagged = [row for row in table if row["disagrees"]]
    rep.params = {
        "top_site_estimate": top_est,
        "top_site_verified": top_true,
        "level": spec.level,
        "n_examples": est.shape[1],
        "n_verified": len(chosen),
    }
    truth_of = {i: j for j, i in enumerate(chosen)}
    rep.tables["estimates.csv"] = [
        {
            "label": labels[i],
            **_item_columns(items[i]),
            "estimate": float(est_ci[0][i]),
            "estimate_ci_low": float(est_ci[1][i]),
            "estimate_ci_high": float(est_ci[2][i]),
            "rank": int(rank[i]),
            "verified": i in truth_of,
            "true_effect": float(truth_ci[0][truth_of[i]]) if i in truth_of else "",
        }
        for i in ranked
    ]
    rep.tables["verification.csv"] = table
    rep.warnings += _warnings(spec, len(labels), job, rho[0], flagged)
    worst = sorted(range(len(table)), key=lambda j: -table[j]["abs_disagreement"])
    highlight = [j for j in worst if table[j]["disagrees"]][:5]
    rep.figures["attribution_vs_patching.png"] = scatter_png(
        [row["estimate"] for row in table],
        [row["true_effect"] for row in table],
        [row["label"] for row in table],
        f"{name}\nSpearman |effect| {rho[0]:.2f} [{rho[1]:.2f}, {rho[2]:.2f}], signed "
        f"{signed[0]:.2f}; {len(chosen)} verified",
        f"attribution estimate (Δ {ctx.metric.kind})",
        f"real {'path' if spec.level == 'edge' else 'activation'} patching (Δ {ctx.metric.kind})",
        highlight=highlight,
        y_err=([row["true_ci_low"] for row in table], [row["true_ci_high"] for row in table]),
        notes=_degenerate_note(rho, est.shape[1], len(chosen)),
    )
    sites = [f"{it[0]}@{it[1]}" if spec.level == "edge" else it[0] for it in items]
    cols = [str(it[2]) if spec.level == "edge" else str(it[1]) for it in items]
    grid = SweepValues(labels, sites, cols, np.zeros(1), None, est)
    rep.figures["attribution_heatmap.png"] = _heatmap(
        f"{name} (estimates)", grid, est_ci[0], f"estimated Δ {ctx.metric.kind}", est_ci[1:],
        names=("sender @ position", "receiver") if spec.level == "edge" else ("site", "position"),
    )  # fmt: skip
    return rep


def _degenerate_note(rho: Sequence[float], n_examples: int, n_items: int) -> list[str]:
    """Why the Spearman CI in the scatter's title has zero width, when it has."""
    if rho[1] != rho[2]:
        return []
    return [
        f"Spearman CI of zero width: degenerate bootstrap, every resample of the {n_examples} "
        f"examples ranks the {n_items} verified items the same way (items with ~0 effect tie)."
    ]


def _item_columns(item: list[Any]) -> dict[str, str]:
    if len(item) == 2:
        return {"site": item[0], "position": str(item[1])}
    return {"sender": item[0], "position": str(item[1]), "receiver": item[2]}


def _verification_table(
    labels: list[str], chosen: list[int], est_ci: tuple, truth_ci: tuple
) -> list[dict[str, Any]]:
    """Per verified item: estimate, truth (CIs), rank by each, disagreement and its flag."""
    e = np.asarray([est_ci[0][i] for i in chosen])
    t = np.asarray(truth_ci[0])
    rank_e = ranks(-np.abs(e)) if len(e) else e
    rank_t = ranks(-np.abs(t)) if len(t) else t
    scale = max(float(np.abs(t).max(initial=0.0)), float(np.abs(e).max(initial=0.0)))
    rows = []
    for j, i in enumerate(chosen):
        gap = abs(e[j] - t[j])
        sizeable = max(abs(e[j]), abs(t[j])) >= SIZEABLE * scale > 0
        flip = e[j] * t[j] < 0
        rows.append(
            {
                "label": labels[i],
                "estimate": float(e[j]),
                "estimate_ci_low": float(est_ci[1][i]),
                "estimate_ci_high": float(est_ci[2][i]),
                "true_effect": float(t[j]),
                "true_ci_low": float(truth_ci[1][j]),
                "true_ci_high": float(truth_ci[2][j]),
                "rank_estimate": float(rank_e[j]),
                "rank_true": float(rank_t[j]),
                "abs_disagreement": float(gap),
                "rank_disagreement": float(abs(rank_e[j] - rank_t[j])),
                "sign_flip": bool(flip and sizeable),
                "disagrees": bool(sizeable and (flip or gap > REL_TOL * abs(t[j]))),
            }
        )
    return rows


def _warnings(
    spec: AttributionPatchingSpec, n: int, job: Job, rho: float, flagged: list[dict[str, Any]]
) -> list[str]:
    out = []
    if spec.verify.top_k > n:
        out.append(f"verify.top_k {spec.verify.top_k} > {n} items: clamped to {n}")
    if spec.verify.include_bottom > job.params["bottom"]:
        out.append(
            f"verify.include_bottom {spec.verify.include_bottom} clamped to "
            f"{job.params['bottom']} (items left after the top {job.params['top_k']})"
        )
    if flagged:
        worst = sorted(flagged, key=lambda r: -r["abs_disagreement"])[:5]
        listed = ", ".join(
            f"{r['label']} (estimate {r['estimate']:.3g}, true {r['true_effect']:.3g}"
            + (", sign flip" if r["sign_flip"] else "")
            + ")"
            for r in worst
        )
        out.append(
            f"estimate and real patching disagree on {len(flagged)} of the verified items "
            f"(sign flip, or |estimate - truth| > {REL_TOL:.0%} of |truth|): {listed}: attention "
            "saturation or another nonlinearity: trust the verified number"
        )
    if not np.isfinite(rho):
        out.append("Spearman is undefined (fewer than 2 verified items, or constant values)")
    elif rho < 0.5:
        out.append(
            f"Spearman {rho:.2f} between estimate and truth: the estimates' ranking is not "
            "reliable here; rank with real patching instead"
        )
    return out
