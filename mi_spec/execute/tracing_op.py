"""The ``causal_tracing`` op (Meng et al. 2022, ROME): corrupt the token embeddings at a role with
Gaussian noise, then restore clean states one cell at a time.

Per job: the standard deviation of the token embeddings (the ``embed`` site at every real token of
``params["scale_rows"]``, the experiment's rows, so every job measures the same value); one clean
pass reading the embeddings at the corrupted role and every restored site at every position; then
the corrupted run (embeddings + noise of ``noise x std``) and one run per cell, the corrupted run
with the cell's sites at its positions set to their clean values, packed ``max_batch_rows`` rows a
pass. Row r's noise comes from a generator seeded by (seed, r): the same in every job and batching.
"""

from __future__ import annotations

import time

import torch

from mi_spec.data.dataset import Dataset
from mi_spec.execute.engine import Engine, Read
from mi_spec.execute.logit_lens_op import Patch, clean_pass, packed
from mi_spec.execute.metrics import make_targets, picked_logits, score
from mi_spec.execute.ops import register_op
from mi_spec.execute.run_job import make_batch
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.sites.adapter import SiteBinding
from mi_spec.spec.sections import MetricSection


def trace_noise(seed: int, row: int, n_pos: int, width: int) -> torch.Tensor:
    """Standard normal noise ``[n_pos, width]`` (float32, CPU) for dataset row ``row``."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + row) % (2**63))
    return torch.randn(n_pos, width, generator=gen)


def embedding_std(
    engine: Engine, data: Dataset, rows: list[int], embed: SiteBinding, max_rows: int
) -> float:
    """The standard deviation of the token embeddings' entries over every real token of ``rows``."""
    values = []
    for start in range(0, len(rows), max_rows):
        batch = make_batch(data, rows[start : start + max_rows], engine.device)
        reads = [Read("embed", embed, None)]
        _, got = engine.run(batch.ids, batch.mask, reads=reads, logits=False)
        values.append(got["embed"][batch.mask.bool()].double().flatten())
    return float(torch.cat(values).std())


def _at(value: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``value`` [B, T, w] at per-row positions ``pos`` [B, P] -> [B, P, w]."""
    rows = torch.arange(value.shape[0], device=value.device)[:, None]
    return value[rows, pos.to(value.device)]


@register_op("causal_tracing")
def run_causal_tracing(job: Job, plan: Plan, engine: Engine, data: Dataset) -> JobResult:
    """Per row: the clean metric, the corrupted one (``source``) and one per restored cell."""
    t0 = time.perf_counter()
    p = job.params
    metric = MetricSection.model_validate(plan.metric)
    rows = list(job.rows)
    table = plan.position_table()
    base = make_batch(data, rows, engine.device)
    targets = make_targets(metric, data, rows, table)
    embed = plan.sites["embed"]
    std = embedding_std(engine, data, list(p["scale_rows"]), embed, plan.max_batch_rows)
    sigma = float(p["noise"]) * std
    corrupt_at = base.role(table, p["at"]).to(engine.device)
    restored = sorted({s for cell in p["cells"] for s in cell[3]})

    def reads(idx: torch.Tensor) -> list[Read]:
        out = [Read("embed", embed, corrupt_at[idx])]
        return out + [Read(s, plan.sites[s], None) for s in restored]

    clean_logits, got = clean_pass(engine, base, reads, plan.max_batch_rows, targets)
    clean_logp = torch.log_softmax(picked_logits(clean_logits, targets, picked=True), -1)
    width = got["embed"].shape[-1]
    noise = torch.stack([trace_noise(int(p["seed"]), r, corrupt_at.shape[1], width) for r in rows])
    noisy = got["embed"] + (sigma * noise).to(got["embed"])
    corrupted = Patch(embed, corrupt_at, noisy)
    where = {pos: base.role(table, pos).to(engine.device) for pos in {c[2] for c in p["cells"]}}
    blocks = [[corrupted]] + [
        [corrupted] + [Patch(plan.sites[s], where[pos], _at(got[s], where[pos])) for s in sites]
        for _, _, pos, sites in p["cells"]
    ]

    def read(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logp = clean_logp[idx.to(clean_logp.device)]
        return score(metric.kind, logits, targets.rows(idx), logp, picked=True).double()

    runs = packed(engine, base, blocks, plan.max_batch_rows, read, targets).cpu()  # [1 + C, B]
    clean = score(metric.kind, clean_logits, targets, clean_logp, picked=True)
    return JobResult(
        job_id=job.id,
        clean=tuple(clean.tolist()),
        source=tuple(runs[0].tolist()),
        variants=tuple(tuple(v) for v in runs[1:].tolist()),
        extra={"embed_std": std, "noise_sigma": sigma},
        seconds=time.perf_counter() - t0,
    )
