"""Attribution patching: first-order estimates of every site × position effect, checked by real
patching of the highest-ranked ones (Nanda 2023; Syed et al. 2023 for edges).

From one forward + backward on the base input and one forward on the source, the estimate of
patching ``a`` (a site at a position) from source to base is ``(a_src - a_base) . dM/da`` per
example (node level); at edge level, sender ``u`` -> receiver ``r`` gets ``delta(u's write to the
residual stream) . dM/dx_r`` with ``x_r`` the residual stream as read by ``r`` alone (EAP).
Estimates are ranked by ``|mean|``; ``verify.top_k`` of them (plus ``verify.include_bottom`` of
the lowest, a control) are re-run for real, by activation patching (nodes) or path patching
(edges), on the same rows and sources, and the report gives the rank correlation between estimate
and truth and the sites where they disagree most. The estimate is never reported alone.

One ``attribution`` job per experiment holds all its rows (chunked by ``max_batch_rows``).
With ``positions: [all]`` each absolute position ``0..T-1`` is its own item (``site@<int>``);
that needs rows (and sources) of one length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from mi_spec.analysis.figures import scatter_png
from mi_spec.analysis.report import ExperimentReport
from mi_spec.analysis.stats import bootstrap_ci, bootstrap_correlation_ci, pearson, ranks
from mi_spec.experiments.activation_patching import SourceSpec
from mi_spec.experiments.base import (
    CompileContext,
    ExperimentSpec,
    metric_label,
    register,
    resample_sources,
    sample_rows,
)
from mi_spec.experiments.effects import SweepValues, _heatmap, _put
from mi_spec.experiments.path_patching import (
    LOGITS,
    PathPatchingSpec,
    freeze_sites,
    is_head_input,
    is_head_output,
    path_pairs,
    receiver_stage,
    sender_stage,
    site_of,
)
from mi_spec.plan.ir import Job, JobResult
from mi_spec.sites.vocabulary import expand_patterns
from mi_spec.spec.sections import Section

NOT_DIFFERENTIABLE = {
    "accuracy": "accuracy is a step function of the logits: its gradient is 0 almost everywhere",
    "kl": "kl(clean || patched) is minimal at the clean run, so its gradient there is 0 and "
    "every first-order estimate is exactly 0",
}
ZERO_TOL = 1e-6  # |effect| below this share of the largest is float noise: ranked as 0
SIZEABLE = 0.1  # of the largest |effect| among verified items: below it, disagreements are noise
REL_TOL = 0.5  # |estimate - truth| above this share of |truth| is a disagreement


class VerifySpec(Section):
    """Real patching of the estimates' top ranks: mandatory (the estimate is never alone)."""

    top_k: int = Field(
        20, ge=1, description="Verify the N items with the largest |estimate| (clamped to all)"
    )
    include_bottom: int = Field(
        0, ge=0, description="Also verify the N smallest |estimate| (a control: near 0 for real?)"
    )


class AttributionPatchingSpec(ExperimentSpec):
    """Gradient estimates of every site × position effect, verified by real patching."""

    kind: Literal["attribution_patching"]
    level: Literal["node", "edge"] = Field(
        "node", description="node: sites × positions; edge: sender -> receiver (EAP)"
    )
    sites: list[str] = Field(
        default_factory=lambda: ["L*.H*"],
        min_length=1,
        description="Node level: sites or patterns ('L*.H*', 'L*.H*:q', 'L1.mlp_out', ...)",
    )
    senders: list[str] | None = Field(
        None, description="Edge level: head outputs 'L{l}.H{h}', 'L{l}.attn_out|mlp_out', 'embed'"
    )
    receivers: list[str] | None = Field(
        None, description="Edge level: head inputs 'L{l}.H{h}:q|k|v', 'L{l}.mlp_in', 'logits'"
    )
    positions: list[str | int] = Field(
        default_factory=lambda: ["all"],
        description="Named positions or ints (sender positions at edge level); 'all' = each "
        "absolute position 0..T-1 separately",
    )
    source: SourceSpec = Field(default_factory=lambda: SourceSpec(resample=True))
    verify: VerifySpec = Field(default_factory=VerifySpec)

    kind_name = "attribution_patching"

    @model_validator(mode="after")
    def _level_fields(self) -> AttributionPatchingSpec:
        if self.level == "edge":
            if not self.senders or not self.receivers:
                raise ValueError("level: edge needs senders and receivers")
            if "sites" in self.model_fields_set:
                raise ValueError("sites is for level: node; at level: edge give senders/receivers")
        elif self.senders is not None or self.receivers is not None:
            raise ValueError("senders/receivers are for level: edge; at level: node give sites")
        return self


class AttributionPatching:
    spec = AttributionPatchingSpec

    def compile(self, spec: AttributionPatchingSpec, ctx: CompileContext) -> list[Job]:
        if ctx.metric.kind in NOT_DIFFERENTIABLE:
            raise ValueError(
                f"attribution patching needs a differentiable metric (loss, logit_diff, prob); "
                f"{NOT_DIFFERENTIABLE[ctx.metric.kind]}. Use activation_patching for it."
            )
        rows = sample_rows(len(ctx.data), spec.samples, spec.seed)
        sources: list[int] = []
        if spec.source.column is not None:
            if spec.source.column not in ctx.data.columns:
                raise ValueError(f"source.column {spec.source.column!r} is not a dataset column")
        else:
            sources = resample_sources(rows, len(ctx.data), spec.seed)
        positions = _positions(spec, ctx, rows, sources)
        if spec.level == "node":
            sites = expand_patterns(spec.sites, ctx.vocabulary)
            items: list[list[Any]] = [[s, p] for s in sites for p in positions]
            params: dict[str, Any] = {}
            touched = set(sites)
        else:
            items, params = _edges(spec, ctx, positions)
            touched = {s for k in ("points", "through") for s in params[k].values()}
            touched |= {s for it in items for s in (it[0], it[2])}
            touched |= set(params["components"]) | set(params["freeze"])
        for s in sorted(touched):
            ctx.bind(s)
        top_k, bottom = verified_counts(spec, len(items))
        n, k = len(rows), top_k + bottom
        level_rows = [n, n, n]  # source, base (forward), verification's source
        if spec.level == "node":
            level_rows.append((k + 1) * n)  # verification: clean + k variants, packed
        else:
            logits_only = all(it[2] == LOGITS for it in items)
            level_rows += [n, k * n, 0 if logits_only else k * n]  # path patching (upper bound)
        params |= {
            "level": spec.level,
            "items": items,
            "top_k": top_k,
            "bottom": bottom,
            "level_rows": level_rows,
            "backward_rows": [n],
        }
        return [
            Job(
                experiment=spec.label,
                op="attribution",
                rows=tuple(rows),
                source="column" if spec.source.column else "rows",
                source_rows=tuple(sources),
                source_column=spec.source.column,
                params=params,
                extra_sites=tuple(sorted(touched)),
            )
        ]

    def analyse(
        self,
        spec: AttributionPatchingSpec,
        ctx: CompileContext,
        jobs: Sequence[Job],
        results: Sequence[JobResult],
    ) -> ExperimentReport:
        return attribution_report(spec, ctx, jobs[0], results[0])


def verified_counts(spec: AttributionPatchingSpec, n_items: int) -> tuple[int, int]:
    """``top_k`` and ``include_bottom`` clamped to the number of items (the report warns)."""
    top_k = min(spec.verify.top_k, n_items)
    return top_k, min(spec.verify.include_bottom, n_items - top_k)


def _positions(
    spec: AttributionPatchingSpec, ctx: CompileContext, rows: list[int], sources: list[int]
) -> list[str | int]:
    """``all`` -> every absolute position (rows and sources must share one length)."""
    if "all" not in spec.positions:
        return list(spec.positions)
    lengths = {ctx.data.lengths[r] for r in [*rows, *sources]}
    if spec.source.column is not None:
        lengths |= {len(ctx.data.columns[spec.source.column][r]) for r in rows}
    if len(lengths) != 1:
        raise ValueError(
            f"positions: all estimates each absolute position, which needs base and source rows "
            f"of one length (found lengths {sorted(lengths)}); name the positions instead"
        )
    every = list(range(lengths.pop()))
    out: list[str | int] = []
    for p in spec.positions:
        out += [q for q in (every if p == "all" else [p]) if q not in out]
    return out


def _edges(
    spec: AttributionPatchingSpec, ctx: CompileContext, positions: list[str | int]
) -> tuple[list[list[Any]], dict[str, Any]]:
    """Edge items [sender, pos, receiver] (the path patching experiment's pairs and checks) and
    what the op needs: each receiver's residual point, each head's attn_out, the components."""
    as_path = PathPatchingSpec(
        kind="path_patching",
        senders=list(spec.senders or []),
        receivers=list(spec.receivers or []),
        positions=positions,
        receiver_positions=["all"],
    )
    pairs, _ = path_pairs(as_path, ctx)
    n_layers = ctx.dims.n_layers
    have = set(ctx.vocabulary)

    def need(site: str, why: str) -> str:
        if site not in have:
            raise ValueError(
                f"edge attribution: {why} needs the site {site!r}, which this model's adapter "
                "does not offer; use level: node (or path_patching)"
            )
        return site

    points: dict[str, str] = {}
    for r in dict.fromkeys(p.receivers[0] for p in pairs):
        site = site_of(r)
        if r == LOGITS:
            points[r] = need(f"L{n_layers - 1}.resid_post", "receiver 'logits'")
        elif is_head_input(site):
            points[r] = need(f"L{site.layer}.resid_pre", f"receiver {r!r}")
        elif site is not None and site.kind == "mlp_in":
            points[r] = need(f"L{site.layer}.resid_mid", f"receiver {r!r}")
    through = {
        p.sender: need(f"L{site.layer}.attn_out", f"head sender {p.sender!r}")
        for p in pairs
        if is_head_output(site := site_of(p.sender))
    }
    components = [c for c in ctx.vocabulary if c == "embed" or c.endswith(("attn_out", "mlp_out"))]
    before = {
        r: [c for c in components if sender_stage(c) < receiver_stage(r, n_layers)] for r in points
    }
    items = [[p.sender, p.pos, p.receivers[0]] for p in pairs]
    params = {
        "points": points,
        "through": through,
        "components": components,
        "before": before,
        "freeze": freeze_sites(pairs, ctx),
    }
    return items, params


# --- analysis ---------------------------------------------------------------------------------


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
    )
    sites = [f"{it[0]}@{it[1]}" if spec.level == "edge" else it[0] for it in items]
    cols = [str(it[2]) if spec.level == "edge" else str(it[1]) for it in items]
    grid = SweepValues(labels, sites, cols, np.zeros(1), None, est)
    rep.figures["attribution_heatmap.png"] = _heatmap(
        f"{name} (estimates)", grid, est_ci[0], f"estimated Δ {ctx.metric.kind}"
    )
    return rep


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


register(AttributionPatching())
