"""The circuit_discovery report: faithfulness curve, CPR/CMD with bootstrap CIs, the chosen circuit
(smallest evaluated size reaching the target), its minimality, precision/recall against a known
circuit, tables, figures and ``discovered.yaml``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mi_spec.analysis.circuit_figures import circuit_png, edge_heatmap_png, faithfulness_png
from mi_spec.analysis.report import ExperimentReport
from mi_spec.analysis.stats import bootstrap_ci, bootstrap_ratio_ci
from mi_spec.experiments.base import CompileContext
from mi_spec.experiments.discovered_yaml import discovered_yaml
from mi_spec.plan.ir import Job, JobResult

HEADLINE = ("discovery.cpr", "discovery.cmd", "discovery.n_edges", "discovery.faithfulness")


def edge_key(label: str, split_qkv: bool) -> str:
    """``L0.H2->L1.H1:k`` as an edge of this graph (``L0.H2->L1.H1`` without the q/k/v split)."""
    sender, receiver = (x.strip() for x in label.split("->"))
    if not split_qkv and ":" in receiver:
        receiver = receiver.split(":")[0]
    return f"{sender}->{receiver}"


def precision_recall(found: Sequence[str], reference: Sequence[str]) -> tuple[float, float]:
    got, want = set(found), set(reference)
    hit = len(got & want)
    return (hit / len(got) if got else float("nan"), hit / len(want) if want else float("nan"))


def area(fractions: np.ndarray, faith: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CPR (area under the curve) and CMD (area between it and 1) over the fraction of edges;
    ``faith`` is ``[S, ...]`` (sizes first)."""
    x = np.asarray(fractions, dtype=float)
    shape = (-1,) + (1,) * (faith.ndim - 1)
    dx = np.diff(x).reshape(shape)
    mid = (faith[1:] + faith[:-1]) / 2
    gap = (np.abs(1 - faith[1:]) + np.abs(1 - faith[:-1])) / 2
    return (dx * mid).sum(0), (dx * gap).sum(0)


def discovery_report(
    spec: Any, ctx: CompileContext, job: Job, result: JobResult
) -> ExperimentReport:
    x, p = result.extra, job.params
    rep = ExperimentReport(name=f"{spec.label}@{ctx.hypothesis}", kind=spec.kind)
    labels, scores = list(x["labels"]), np.asarray(x["scores"], dtype=float)
    order, sizes = list(x["order"]), list(x["sizes"])
    n_edges = len(labels)
    curve = np.asarray(x["curve"], dtype=float)  # [S, N]
    empty, full = curve[sizes.index(0)], curve[sizes.index(n_edges)]
    seed = spec.seed
    faith = bootstrap_ratio_ci(curve - empty, full - empty, seed=seed)
    fractions = np.asarray(sizes, dtype=float) / max(1, n_edges)
    stacked = np.vstack([curve - empty, (full - empty)[None]])

    def stat(which: int):
        def f(a: np.ndarray, axis: int = -1) -> np.ndarray:
            m = a.mean(axis=-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                return area(fractions, m[:-1] / m[-1])[which]

        return f

    cpr = bootstrap_ci(stacked, stat=stat(0), seed=seed)
    cmd = bootstrap_ci(stacked, stat=stat(1), seed=seed)
    chosen = int(x["chosen"])
    at = sizes.index(chosen)
    _put(rep, "discovery.cpr", cpr, headline=True)
    _put(rep, "discovery.cmd", cmd, headline=True)
    _put(rep, "discovery.faithfulness", (faith[0][at], faith[1][at], faith[2][at]), headline=True)
    rep.metrics["discovery.n_edges"] = rep.headline["discovery.n_edges"] = float(chosen)
    rep.metrics["discovery.n_edges_total"] = float(n_edges)
    clean = np.asarray(result.clean, dtype=float)
    _put(rep, "discovery.metric.clean", bootstrap_ci(clean, seed=seed))
    _put(rep, "discovery.metric.empty", bootstrap_ci(empty, seed=seed))
    if result.source is not None:
        _put(rep, "discovery.metric.source", bootstrap_ci(np.asarray(result.source), seed=seed))
    circuit = [labels[i] for i in order[:chosen]]
    if spec.reference_edges:
        ref = [edge_key(e, spec.split_qkv) for e in spec.reference_edges]
        prec, rec = precision_recall(circuit, ref)
        for key, value in (("discovery.precision", prec), ("discovery.recall", rec)):
            rep.metrics[key] = rep.headline[key] = value
        found = set(circuit)
        rep.params["missed_edges"] = ", ".join(e for e in ref if e not in found) or "-"
    if x.get("acdc_passes"):
        rep.metrics["discovery.acdc.passes"] = float(x["acdc_passes"])
    rank = {e: i + 1 for i, e in enumerate(order)}
    rep.tables["edges.csv"] = [
        {
            "edge": labels[e],
            "score": float(scores[e]),
            "rank": rank[e],
            "in_circuit": rank[e] <= chosen,
            **({"score_std": float(x["score_std"][e])} if x.get("score_std") else {}),
        }
        for e in order
    ]
    rep.tables["faithfulness.csv"] = [
        {
            "n_edges": n,
            "fraction": float(fractions[i]),
            "faithfulness": float(faith[0][i]),
            "ci_low": float(faith[1][i]),
            "ci_high": float(faith[2][i]),
            ctx.metric.kind: float(curve[i].mean()),
        }
        for i, n in enumerate(sizes)
    ]
    rep.series["discovery.faithfulness_curve"] = [float(f) for f in faith[0]]
    drops = np.asarray(x.get("minimality") or [], dtype=float)
    redundant = []
    if drops.size:
        lost = bootstrap_ratio_ci(curve[at] - drops, full - empty, seed=seed)
        rows = []
        for j, e in enumerate(order[:chosen]):
            rows.append(
                {"edge": labels[e], "drop": float(lost[0][j]), "ci_low": float(lost[1][j]),
                 "ci_high": float(lost[2][j])}
            )  # fmt: skip
            if lost[2][j] < 0.01:
                redundant.append(labels[e])
        rep.tables["minimality.csv"] = rows
        rep.metrics["discovery.minimality.min_drop"] = float(np.min(lost[0]))
    rep.params |= {
        "method": spec.method,
        "steps": int(p["steps"]),
        "ablation": spec.ablation,
        "n_examples": len(clean),
        "top_edge": labels[order[0]] if order else "-",
        "circuit": ", ".join(circuit[:40]) + (" ..." if len(circuit) > 40 else ""),
        "seconds_scores": round(float(x.get("seconds_scores", 0.0)), 3),
        "seconds_curve": round(float(x.get("seconds_curve", 0.0)), 3),
    }
    if faith[0][at] < spec.target:
        rep.warnings.append(
            f"no evaluated circuit reaches faithfulness {spec.target}: the chosen one is every "
            "edge; add sizes or check the ablation"
        )
    if redundant:
        rep.warnings.append(
            f"minimality: removing {', '.join(redundant)} costs < 1% of the metric (CI): "
            "those edges may be redundant in the chosen circuit"
        )
    if abs(float(np.mean(full - clean))) > 1e-4 * max(1.0, float(np.abs(clean).mean())):
        rep.warnings.append("the full circuit does not reproduce the clean model: check the graph")
    title = f"{rep.name} ({spec.method})"
    edge_scores = {labels[e]: float(scores[e]) for e in range(n_edges)}
    rep.figures["circuit.png"] = circuit_png(circuit, edge_scores, ctx.dims.n_layers, title)
    rep.figures["faithfulness.png"] = faithfulness_png(
        sizes, faith, chosen, spec.target, n_edges, title
    )
    rep.figures["edge_scores.png"] = edge_heatmap_png(p["senders"], p["receivers"], p["edges"],
                                                      scores, title)  # fmt: skip
    text = discovered_yaml(
        spec, ctx, x["study"], circuit, faith[0][at], (faith[1][at], faith[2][at])
    )
    rep.files["discovered.yaml"] = text.encode()
    return rep


def _put(rep: ExperimentReport, key: str, ci: Sequence[Any], headline: bool = False) -> None:
    est, low, high = (float(v) for v in ci)
    for k, v in ((key, est), (f"{key}.ci_low", low), (f"{key}.ci_high", high)):
        rep.metrics[k] = v
        if headline:
            rep.headline[k] = v
