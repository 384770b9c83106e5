"""Logit lens (nostalgebraist 2020; guide Resource 29): the residual stream entering every layer,
and leaving the last, read through the model's final norm and unembedding.

Per lens point: the study's metric (at the metric's role, or ``at``) and the rank of the target
token, with bootstrap CIs over examples, and the usual figure. A readout, not an intervention: it is
correlational evidence, for generating hypotheses to test causally (patching, causal tracing,
scrubbing); the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from mi_spec.analysis.lens_figures import lens_png
from mi_spec.analysis.report import ExperimentReport
from mi_spec.analysis.stats import bootstrap_ci
from mi_spec.data.positions import resolve_role
from mi_spec.experiments.base import CompileContext, ExperimentSpec, chunks, register, sample_rows
from mi_spec.experiments.effects import _at, _put
from mi_spec.plan.ir import Job, JobResult

NOTE = (
    "Correlational: the logit lens is a readout of the residual stream, not an intervention. "
    "A layer where the target becomes decodable is a hypothesis; validate it causally "
    "(activation patching, causal tracing, causal scrubbing)."
)


class LogitLensSpec(ExperimentSpec):
    """Read every layer's residual stream through the final norm and unembedding."""

    kind: Literal["logit_lens"]
    at: str | int | None = Field(
        None, description="Position role to read and score (default: the metric's `at`)"
    )

    kind_name = "logit_lens"


def lens_points(n_layers: int) -> list[str]:
    """Each layer's resid_pre, then the last layer's resid_post (the model's own output)."""
    return [f"L{layer}.resid_pre" for layer in range(n_layers)] + [f"L{n_layers - 1}.resid_post"]


class LogitLens:
    spec = LogitLensSpec

    def compile(self, spec: LogitLensSpec, ctx: CompileContext) -> list[Job]:
        points = lens_points(ctx.dims.n_layers)
        for site in points:
            ctx.bind(site)
        rows = sample_rows(len(ctx.data), spec.samples, spec.seed)
        at = spec.at if spec.at is not None else ctx.metric.at
        resolve_role(at, ctx.positions, ctx.data, rows)  # an unknown role fails here, located
        return [
            Job(
                experiment=spec.label,
                op="logit_lens",
                rows=tuple(batch),
                params={
                    "at": spec.at,
                    "layers": points,
                    "final": points[-1],
                    "level_rows": [len(batch), len(batch) * len(points)],  # clean, readouts
                    "variants": points,  # what `mi-spec plan` lists per job
                },
                extra_sites=tuple(points),
            )
            for batch in chunks(rows, spec.batch_size)
        ]

    def analyse(
        self,
        spec: LogitLensSpec,
        ctx: CompileContext,
        jobs: Sequence[Job],
        results: Sequence[JobResult],
    ) -> ExperimentReport:
        points = list(jobs[0].params["layers"])
        kind = ctx.metric.kind
        numeric = ctx.metric.numeric
        clean = np.concatenate([np.asarray(r.clean, dtype=float) for r in results])
        lens = np.concatenate([np.asarray(r.variants, dtype=float) for r in results], axis=1)
        rep = ExperimentReport(name=f"{spec.label}@{ctx.hypothesis}", kind=spec.kind)
        model = bootstrap_ci(clean, seed=spec.seed)
        _put(rep, f"lens.{kind}.model", model, headline=True)
        metric_ci = bootstrap_ci(lens, seed=spec.seed)
        rank_ci = None
        if not numeric:
            rank = np.concatenate([np.asarray(r.extra["rank"], dtype=float) for r in results], 1)
            rank_ci = bootstrap_ci(rank, seed=spec.seed)
        rows = []
        for i, point in enumerate(points):
            _put(rep, f"lens.{kind}.{point}", _at(metric_ci, i))
            row = {"layer": point, kind: float(metric_ci[0][i]),
                   "ci_low": float(metric_ci[1][i]), "ci_high": float(metric_ci[2][i])}  # fmt: skip
            if rank_ci is not None:
                _put(rep, f"lens.rank.{point}", _at(rank_ci, i))
                row |= {"rank": float(rank_ci[0][i]), "rank_ci_low": float(rank_ci[1][i]),
                        "rank_ci_high": float(rank_ci[2][i])}  # fmt: skip
            rows.append(row)
        if rank_ci is not None:
            top = [i for i in range(len(points)) if rank_ci[0][i] < 1.5]
            rep.params["first_top1_layer"] = points[top[0]] if top else "none"
        gap = float(np.abs(lens[-1] - clean).max())
        if gap > 1e-4 * max(1.0, float(np.abs(clean).max())):
            rep.warnings.append(
                f"the last lens point differs from the model's output by {gap:.3g}: the final "
                "resid_post is not what the final norm and unembedding read in this model"
            )
        rep.params |= {"at": str(spec.at if spec.at is not None else ctx.metric.at),
                       "metric": kind, "n_examples": len(clean), "evidence": "correlational"}  # fmt: skip
        rep.tables["lens.csv"] = rows
        rep.files["notes.md"] = f"# {rep.name}\n\n{NOTE}\n".encode()
        rep.figures["logit_lens.png"] = lens_png(
            points,
            metric_ci,
            kind,
            rank_ci,
            float(model[0]),
            f"Logit lens at {rep.params['at']!r}, {ctx.hypothesis} (correlational readout)",
        )
        return rep


register(LogitLens())
