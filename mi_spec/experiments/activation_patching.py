"""Activation patching: a sweep over sites × positions, each patched alone from a source input.

The source is a counterfactual token column of the dataset, or another dataset row drawn at random
(resampling). All variants of a batch share one source pass and one clean pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from mi_spec.analysis.report import ExperimentReport
from mi_spec.experiments.base import (
    CompileContext,
    ExperimentSpec,
    chunks,
    register,
    resample_sources,
    sample_rows,
)
from mi_spec.experiments.effects import gather, sweep_report
from mi_spec.plan.ir import Intervention, Job, JobResult, Variant
from mi_spec.sites.vocabulary import expand_patterns
from mi_spec.spec.sections import Section


class SourceSpec(Section):
    """Where patched values come from: exactly one of ``column`` or ``resample``."""

    column: str | None = Field(None, description="Column with counterfactual token ids per row")
    resample: bool = Field(False, description="Use another dataset row, drawn at random")

    @model_validator(mode="after")
    def _one(self) -> SourceSpec:
        if (self.column is None) == (not self.resample):
            raise ValueError("expected exactly one of column or resample: true")
        return self


class ActivationPatchingSpec(ExperimentSpec):
    """Patch each site at each position from the source into the base run, one at a time."""

    kind: Literal["activation_patching"]
    sites: list[str] = Field(
        min_length=1, description="Sites or patterns ('L*.H*', 'L1.resid_pre', 'path:...')"
    )
    positions: list[str | int] = Field(
        default_factory=lambda: ["all"], description="Named positions or ints; 'all' = every one"
    )
    source: SourceSpec = Field(default_factory=lambda: SourceSpec(resample=True))

    kind_name = "activation_patching"


def sweep_variants(sites: Sequence[str], positions: Sequence[str | int]) -> list[Variant]:
    """One variant per site × position, labelled ``site@position``."""
    return [
        Variant(
            label=f"{site}@{pos}",
            interventions=(Intervention(site=site, pos=None if pos == "all" else pos),),
        )
        for site in sites
        for pos in positions
    ]


class ActivationPatching:
    spec = ActivationPatchingSpec

    def compile(self, spec: ActivationPatchingSpec, ctx: CompileContext) -> list[Job]:
        sites = expand_patterns(spec.sites, ctx.vocabulary)
        for s in sites:
            ctx.bind(s)
        variants = tuple(sweep_variants(sites, spec.positions))
        rows = sample_rows(len(ctx.data), spec.samples, spec.seed)
        if spec.source.column is not None:
            if spec.source.column not in ctx.data.columns:
                raise ValueError(f"source.column {spec.source.column!r} is not a dataset column")
            sources: list[int] = []
        else:
            sources = resample_sources(rows, len(ctx.data), spec.seed)
        jobs = []
        for i, batch in enumerate(chunks(rows, spec.batch_size)):
            src = sources[i * spec.batch_size : i * spec.batch_size + len(batch)]
            jobs.append(
                Job(
                    experiment=spec.label,
                    rows=tuple(batch),
                    source="column" if spec.source.column else "rows",
                    source_rows=tuple(src),
                    source_column=spec.source.column,
                    variants=variants,
                )
            )
        return jobs

    def analyse(
        self,
        spec: ActivationPatchingSpec,
        ctx: CompileContext,
        jobs: Sequence[Job],
        results: Sequence[JobResult],
    ) -> ExperimentReport:
        name = f"{spec.label}@{ctx.hypothesis}"
        return sweep_report(
            name, spec.kind, "patch", ctx.metric.kind, gather(jobs, results), spec.seed
        )


register(ActivationPatching())
