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

from pydantic import Field, model_validator

from mi_spec.analysis.report import ExperimentReport
from mi_spec.experiments.activation_patching import SourceSpec
from mi_spec.experiments.attribution_report import attribution_report
from mi_spec.experiments.base import (
    CompileContext,
    ExperimentSpec,
    register,
    resample_sources,
    sample_rows,
)
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


register(AttributionPatching())
