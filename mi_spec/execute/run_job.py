"""Run one Job: a source (or mean) pass, the clean run, then every variant packed as batch rows.

Clean-prefix reuse: variants are ordered by their first write in the forward order and packed in
that order; a pass resumes at its first write's module, the modules that finish before it (the
embedding, the blocks below, ...) skipped and returning their outputs from the clean run. So a
pass pays only for the layers at and above its sites. Each resume point is checked once per
process (a resumed pass with no writes must give the clean logits); where it does not, or with
left padding, passes run whole.

Cost per job: 1 source pass + 1 clean pass + ceil(V / G) patched passes (each from its resume
point), where G = max_batch_rows // B copies of the B base rows fit in one pass. A variant
patching K sites still costs one patched pass. Every pass unembeds only the positions its
metric scores (``Engine.run(logits=...)``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mi_spec.data.dataset import Dataset
from mi_spec.data.positions import aligned, resolve_role, source_data
from mi_spec.errors import ExecutionError, MiSpecError
from mi_spec.execute.engine import Engine, Read, Write
from mi_spec.execute.metrics import (
    Targets,
    make_targets,
    picked_logits,
    score,
    scored_at,
    source_targets,
)
from mi_spec.execute.ops import register_op
from mi_spec.plan.ir import Job, JobResult, Plan, Variant
from mi_spec.spec.sections import MetricSection, PositionSpec

Key = tuple[str, str | int | None]  # (site, role)


@dataclass
class Batch:
    ids: torch.Tensor
    mask: torch.Tensor
    data: Dataset
    rows: list[int]

    def role(self, table: dict[str, PositionSpec], name: str | int | None) -> torch.Tensor | None:
        if name is None:
            return None
        return torch.tensor(resolve_role(name, table, self.data, self.rows))


def make_batch(data: Dataset, rows: list[int], device: torch.device) -> Batch:
    ids, mask = data.padded(rows)
    return Batch(torch.tensor(ids, device=device), torch.tensor(mask, device=device), data, rows)


@register_op("patch")
def run_job(job: Job, plan: Plan, engine: Engine, data: Dataset) -> JobResult:
    """Execute ``job`` and return per-row metric values (clean, source, one row per variant)."""
    t0 = time.perf_counter()
    metric = MetricSection.model_validate(plan.metric)
    rows = list(job.rows)
    base = make_batch(data, rows, engine.device)
    table = plan.position_table()
    targets = make_targets(metric, data, rows, table)
    keys = sorted(
        {(i.site, i.pos) for v in job.variants for i in v.interventions}, key=lambda k: str(k)
    )
    values, source_run = source_values(job, plan, table, engine, data, base, keys)
    order = sorted(
        range(len(job.variants)), key=lambda i: _first_write(job.variants[i], plan, engine)
    )
    per_pass = max(1, plan.max_batch_rows // len(rows))
    groups = [order[i : i + per_pass] for i in range(0, len(order), per_pass)]
    resume = {g[0]: _resume_module(job.variants[g[0]], plan, engine) for g in groups}
    at = scored_at(targets)
    clean_logits, cached = _clean_pass(engine, base, {m for m in resume.values() if m}, at)
    clean_logp = torch.log_softmax(picked_logits(clean_logits, targets, picked=True), -1)
    scored: dict[int, torch.Tensor] = {}
    for g in groups:
        skips = _skips(engine, resume[g[0]], cached, base, clean_logits, len(g), at)
        group = [job.variants[i] for i in g]
        logits = _patched_pass(group, plan, table, engine, base, values, skips, targets)
        per_row = score(metric.kind, logits, targets, clean_logp, picked=True).view(len(g), -1)
        scored |= dict(zip(g, per_row, strict=True))
    clean = score(metric.kind, clean_logits, targets, clean_logp, picked=True)
    per_variant = [clean] + [scored[i] for i in range(len(job.variants))]
    source = None
    if source_run is not None:
        source = source_run.score(metric.kind, clean_logp).tolist()
    return JobResult(
        job_id=job.id,
        clean=tuple(per_variant[0].tolist()),
        source=tuple(source) if source is not None else None,
        variants=tuple(tuple(v.tolist()) for v in per_variant[1:]),
        seconds=time.perf_counter() - t0,
    )


def source_values(
    job: Job,
    plan: Plan,
    table: dict[str, PositionSpec],
    engine: Engine,
    data: Dataset,
    base: Batch,
    keys: list[Key],
) -> tuple[dict[Key, torch.Tensor], SourceRun | None]:
    """The value each (site, role) takes in the source: [B, P, w] (or [1, P, w] for means), and
    the source run's logits where its metric is scored (None without source rows)."""
    if job.source == "zero":
        return {}, None
    if job.source == "mean":
        return _means(job, plan, table, engine, data, keys), None
    src = make_batch(*job_source(job, table, data), engine.device)
    try:  # roles line up row by row: the k-th position of a role in the source -> in the base
        for pos in {pos for _, pos in keys}:
            aligned(pos, table, data, list(job.rows), src.data, src.rows)
    except MiSpecError as e:
        raise ExecutionError(f"job {job.id}: {e}") from None
    reads = [Read(k, plan.sites[k[0]], src.role(table, k[1])) for k in keys]
    metric = MetricSection.model_validate(plan.metric)
    at = source_targets(metric, data, list(job.rows), table, src.data, src.rows)
    logits, got = engine.run(src.ids, src.mask, reads=reads, logits=scored_at(at))
    return got, SourceRun(logits, at)


@dataclass(frozen=True)
class SourceRun:
    """The source pass's logits at the positions its metric is scored (``source_targets``)."""

    logits: torch.Tensor  # [B, P, V]
    targets: Targets

    def score(self, kind: str, clean_logp: torch.Tensor | None) -> torch.Tensor:
        return score(kind, self.logits, self.targets, clean_logp, picked=True)


def job_source(
    job: Job, table: dict[str, PositionSpec], data: Dataset
) -> tuple[Dataset, list[int]]:
    """The source input of a job's rows: its counterfactual rows, or other dataset rows."""
    column = job.source_column if job.source == "column" else None
    return source_data(data, table, list(job.rows), column, list(job.source_rows))


def _means(
    job: Job,
    plan: Plan,
    table: dict[str, PositionSpec],
    engine: Engine,
    data: Dataset,
    keys: list[Key],
) -> dict[Key, torch.Tensor]:
    """Mean of each (site, role) over the job's reference rows, in chunks of max_batch_rows."""
    sums: dict[Key, torch.Tensor] = {}
    refs = list(job.source_rows)
    for start in range(0, len(refs), plan.max_batch_rows):
        chunk = make_batch(data, refs[start : start + plan.max_batch_rows], engine.device)
        reads = [Read(k, plan.sites[k[0]], chunk.role(table, k[1])) for k in keys]
        _, got = engine.run(chunk.ids, chunk.mask, reads=reads, logits=False)
        for k, v in got.items():
            total = v.double().sum(0, keepdim=True)
            sums[k] = total if k not in sums else sums[k] + total
    return {k: (v / len(refs)).float() for k, v in sums.items()}


def _first_write(variant: Variant, plan: Plan, engine: Engine) -> tuple[int, str | None]:
    """Where in the forward order the variant's first intervention is, and its module (None for
    a variant that writes nothing)."""
    spots = [(plan.sites[i.site].module, plan.sites[i.site].io) for i in variant.interventions]
    if not spots:
        return -1, None
    first = min(spots, key=lambda s: engine.order[s])
    return engine.order[first], first[0]


def _resume_module(variant: Variant, plan: Plan, engine: Engine) -> str | None:
    """The module a pass of this variant (and of those after it) can resume at: its first write's;
    None with left padding (the engine moves rows' padding, cached outputs do not follow)."""
    return None if engine.padding_side == "left" else _first_write(variant, plan, engine)[1]


def _clean_pass(
    engine: Engine, base: Batch, resume: set[str], at: torch.Tensor
) -> tuple[torch.Tensor, dict[str, object]]:
    """The clean logits at the scored positions ``at``, and the outputs of every module a pass
    resuming at ``resume`` skips."""
    modules = sorted({m for r in resume for m in engine.prefix_modules(r)})
    if not modules:
        logits, _ = engine.run(base.ids, base.mask, logits=at)
        return logits, {}
    return engine.outputs(base.ids, base.mask, modules, logits=at)


def _skips(
    engine: Engine,
    module: str | None,
    cached: dict[str, object],
    base: Batch,
    clean_logits: torch.Tensor,
    copies: int,
    at: torch.Tensor,
) -> list[tuple[str, object]]:
    """(module, cached output repeated for ``copies`` blocks of rows) for a pass resuming at
    ``module``; empty where resuming there was not checked to give the clean logits."""
    if module is None:
        return []
    prefix = engine.prefix_modules(module)
    if not prefix:
        return []
    if module not in engine.resumable:  # once per process and model: resuming changes nothing
        try:
            skips = [(m, cached[m]) for m in prefix]
            got, _ = engine.run(base.ids, base.mask, skips=skips, logits=at)
            scale = max(1.0, float(clean_logits.abs().max()))
            ok = bool(((got - clean_logits).abs().max() <= 1e-5 * scale).item())
        except MiSpecError:
            ok = False
        engine.resumable[module] = ok
    if not engine.resumable[module]:
        return []
    return [(m, _repeat(cached[m], copies, base.ids.shape[0])) for m in prefix]


def _repeat(value: object, copies: int, rows: int) -> object:
    """``value`` with every tensor of ``rows`` rows stacked ``copies`` times along the rows."""
    if torch.is_tensor(value):
        if value.dim() == 0 or value.shape[0] != rows:
            return value
        # always a copy: an in-place site write downstream must not reach the cache
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple | list):
        return type(value)(_repeat(v, copies, rows) for v in value)
    return value


def _patched_pass(
    group: list[Variant],
    plan: Plan,
    table: dict[str, PositionSpec],
    engine: Engine,
    base: Batch,
    values: dict[Key, torch.Tensor],
    skips: list[tuple[str, object]],
    targets: Targets,
) -> torch.Tensor:
    """Stack ``len(group)`` copies of the base rows; block g gets variant g's interventions.
    Returns the logits at the scored positions, [len(group) * B, P, V]."""
    b = base.ids.shape[0]
    ids = base.ids.repeat(len(group), 1)
    mask = base.mask.repeat(len(group), 1)
    writes = []
    for g, variant in enumerate(group):
        for iv in variant.interventions:
            site = plan.sites[iv.site]
            value = values.get((iv.site, iv.pos))
            if value is None:  # zero ablation: a scalar broadcasts over the site's slice
                value = torch.zeros(())
            rows = slice(g * b, (g + 1) * b)
            writes.append(Write(site, rows, base.role(table, iv.pos), value))
    logits, _ = engine.run(
        ids, mask, writes=writes, skips=skips, logits=scored_at(targets, len(group))
    )
    return logits
