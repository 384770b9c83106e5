"""Run one Job: a source (or mean) pass, then the clean run and every variant packed as batch rows.

Cost per job: 1 source pass + ceil((V + 1) / G) patched passes, where G = max_batch_rows // B copies
of the B base rows fit in one pass. A variant patching K sites still costs one patched pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mi_spec.data.dataset import Dataset
from mi_spec.data.positions import aligned, resolve_role, source_data
from mi_spec.errors import ExecutionError, MiSpecError
from mi_spec.execute.engine import Engine, Read, Write
from mi_spec.execute.metrics import make_targets, picked_logits, score, source_targets
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
    values, source_logits = source_values(job, plan, table, engine, data, base, keys)
    clean_logp = None
    per_variant: list[torch.Tensor] = []
    todo: list[Variant | None] = [None, *job.variants]  # None = the clean run
    per_pass = max(1, plan.max_batch_rows // len(rows))
    for start in range(0, len(todo), per_pass):
        group = todo[start : start + per_pass]
        logits = _patched_pass(group, plan, table, engine, base, values)
        if clean_logp is None:  # the first group starts with the clean run
            clean_logp = torch.log_softmax(picked_logits(logits[: len(rows)], targets), -1)
        per_variant += list(score(metric.kind, logits, targets, clean_logp).view(len(group), -1))
    source = None
    if source_logits is not None:
        at = source_targets(metric, data, rows, table, *job_source(job, table, data))
        source = score(metric.kind, source_logits, at, clean_logp).tolist()
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
) -> tuple[dict[Key, torch.Tensor], torch.Tensor | None]:
    """The value each (site, role) takes in the source: [B, P, w] (or [1, P, w] for means)."""
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
    logits, got = engine.run(src.ids, src.mask, reads=reads)
    return got, logits


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
        _, got = engine.run(chunk.ids, chunk.mask, reads=reads)
        for k, v in got.items():
            total = v.double().sum(0, keepdim=True)
            sums[k] = total if k not in sums else sums[k] + total
    return {k: (v / len(refs)).float() for k, v in sums.items()}


def _patched_pass(
    group: list[Variant | None],
    plan: Plan,
    table: dict[str, PositionSpec],
    engine: Engine,
    base: Batch,
    values: dict[Key, torch.Tensor],
) -> torch.Tensor:
    """Stack ``len(group)`` copies of the base rows; block g gets variant g's interventions."""
    b = base.ids.shape[0]
    ids = base.ids.repeat(len(group), 1)
    mask = base.mask.repeat(len(group), 1)
    writes = []
    for g, variant in enumerate(group):
        for iv in variant.interventions if variant else ():
            site = plan.sites[iv.site]
            value = values.get((iv.site, iv.pos))
            if value is None:  # zero ablation: a scalar broadcasts over the site's slice
                value = torch.zeros(())
            rows = slice(g * b, (g + 1) * b)
            writes.append(Write(site, rows, base.role(table, iv.pos), value))
    logits, _ = engine.run(ids, mask, writes=writes)
    return logits
