"""Ablation: replace sites by zero, by their dataset mean, or by a resampled input's value.

Each site × position is ablated alone, or all of them together with ``jointly: true``.
Mean ablation averages the site over the experiment's rows at the same role position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from mi_spec.analysis.report import ExperimentReport
from mi_spec.experiments.activation_patching import sweep_variants
from mi_spec.experiments.base import (
    CompileContext,
    ExperimentSpec,
    chunks,
    register,
    resample_sources,
    sample_rows,
)
from mi_spec.experiments.effects import gather, sweep_report
from mi_spec.plan.ir import Job, JobResult, Variant
from mi_spec.sites.vocabulary import expand_patterns


class AblationSpec(ExperimentSpec):
    """Knock out sites and measure the metric's change."""

    kind: Literal["ablation"]
    sites: list[str] = Field(min_length=1, description="Sites or patterns ('L*.H*', ...)")
    positions: list[str | int] = Field(default_factory=lambda: ["all"])
    method: Literal["zero", "mean", "resample"] = "mean"
    jointly: bool = Field(False, description="Ablate all sites × positions in one variant")
    mean_samples: int = Field(
        128, ge=1, description="Rows averaged for mean ablation (each job recomputes the mean)"
    )

    kind_name = "ablation"


class Ablation:
    spec = AblationSpec

    def compile(self, spec: AblationSpec, ctx: CompileContext) -> list[Job]:
        sites = expand_patterns(spec.sites, ctx.vocabulary)
        for s in sites:
            ctx.bind(s)
        variants = sweep_variants(sites, spec.positions)
        if spec.jointly:
            both = tuple(i for v in variants for i in v.interventions)
            variants = [Variant(label="+".join(v.label for v in variants), interventions=both)]
        rows = sample_rows(len(ctx.data), spec.samples, spec.seed)
        # only resampling draws other rows (zero and mean ablation work on a one-row dataset)
        sources = (
            resample_sources(rows, len(ctx.data), spec.seed) if spec.method == "resample" else []
        )
        jobs = []
        for i, batch in enumerate(chunks(rows, spec.batch_size)):
            if spec.method == "resample":
                src = tuple(sources[i * spec.batch_size : i * spec.batch_size + len(batch)])
            else:
                src = tuple(rows[: spec.mean_samples]) if spec.method == "mean" else ()
            jobs.append(
                Job(
                    experiment=spec.label,
                    rows=tuple(batch),
                    source="rows" if spec.method == "resample" else spec.method,
                    source_rows=src,
                    variants=tuple(variants),
                )
            )
        return jobs

    def analyse(
        self,
        spec: AblationSpec,
        ctx: CompileContext,
        jobs: Sequence[Job],
        results: Sequence[JobResult],
    ) -> ExperimentReport:
        name = f"{spec.label}@{ctx.hypothesis}"
        values = gather(jobs, results)
        if spec.method != "resample":
            values.source = None  # zero/mean have no source input to normalise by
        return sweep_report(name, spec.kind, "ablation", ctx.metric.kind, values, spec.seed)


register(Ablation())
