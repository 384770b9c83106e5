"""The ``logit_lens`` op: the residual stream at every layer read through the model's own final
norm and unembedding, and the ``packed`` helpers that ``tracing_op`` shares.

The lens of a residual state ``r`` is the model's output when the last block's output (the final
``resid_post``, which the final norm and the unembedding read) is replaced by ``r`` at the scored
positions: ``unembed(norm(r))`` for any family, with no per-family knowledge of the norm. The last
lens point (the final ``resid_post`` patched with its own value) is the model's actual output.

Cost per job: ceil(B / M) clean passes (reading every layer's residual stream at the positions) and
ceil(B * (L + 1) / M) lens passes, M = the plan's ``max_batch_rows``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mi_spec.data.dataset import Dataset
from mi_spec.errors import ExecutionError
from mi_spec.execute.engine import Engine, Read, Write
from mi_spec.execute.metrics import Targets, make_targets, picked_logits, score, scored_at
from mi_spec.execute.ops import register_op
from mi_spec.execute.run_job import Batch, make_batch
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.sites.adapter import SiteBinding
from mi_spec.spec.sections import MetricSection

RowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, base row idx) -> [n, ...]


@dataclass(frozen=True)
class Patch:
    """Set ``site`` at per-base-row positions ``pos`` ([B, P], None: all) to ``value`` ([B, P, w])."""

    site: SiteBinding
    pos: torch.Tensor | None
    value: torch.Tensor


def clean_pass(
    engine: Engine,
    base: Batch,
    reads: Callable[[torch.Tensor], list[Read]],
    max_rows: int,
    targets: Targets,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The unpatched base rows in passes of ``max_rows``; returns (the logits of all rows at
    their scored positions, [B, P, V], the values read), rows in base order."""
    logits, values = [], {}
    for start in range(0, len(base.rows), max_rows):
        idx = torch.arange(start, min(start + max_rows, len(base.rows)))
        at = scored_at(targets.rows(idx))
        out, got = engine.run(base.ids[idx], base.mask[idx], reads=reads(idx), logits=at)
        logits.append(out)
        for k, v in got.items():
            values.setdefault(k, []).append(v)
    return torch.cat(logits), {k: torch.cat(v) for k, v in values.items()}


def packed(
    engine: Engine,
    base: Batch,
    blocks: Sequence[Sequence[Patch]],
    max_rows: int,
    read: RowFn,
    targets: Targets,
) -> torch.Tensor:
    """Run a copy of the base rows per block, copy k patched by ``blocks[k]``, packing at most
    ``max_rows`` rows per pass (a block may span passes); ``read`` turns a pass's logits at the
    scored positions ([n, P, V]) into per-row values. Returns ``[len(blocks), B, ...]``."""
    b = len(base.rows)
    items = [(k, i) for k in range(len(blocks)) for i in range(b)]
    outs = []
    for start in range(0, len(items), max_rows):
        chunk = items[start : start + max_rows]
        idx = torch.tensor([i for _, i in chunk])
        writes, offset = [], 0
        for k, group in itertools.groupby(chunk, key=lambda item: item[0]):
            rows = idx[offset : offset + len(list(group))]
            rows_slice = slice(offset, offset + len(rows))
            for p in blocks[k]:
                pos = None if p.pos is None else p.pos[rows]
                writes.append(Write(p.site, rows_slice, pos, p.value[rows.to(p.value.device)]))
            offset += len(rows)
        at = scored_at(targets.rows(idx))
        logits, _ = engine.run(base.ids[idx], base.mask[idx], writes=writes, logits=at)
        outs.append(read(logits, idx))
    out = torch.cat(outs)
    return out.view(len(blocks), b, *out.shape[1:])


def target_rank(logits: torch.Tensor, t: Targets) -> torch.Tensor:
    """Per row: the mean over scored positions of the target's rank (1 = the top token; ties
    count in the target's favour); ``logits`` at the scored positions, [n, P, V]."""
    picked = picked_logits(logits, t, picked=True)
    reps = picked.shape[0] // t.pos.shape[0]
    own = picked.gather(-1, t.target.to(picked.device).repeat(reps, 1)[..., None])
    ranks = ((picked > own).sum(-1) + 1).double()
    if t.valid is None:
        return ranks.mean(-1)
    valid = t.valid.to(ranks.device).repeat(reps, 1).double()  # ragged roles: own positions only
    return (ranks * valid).sum(-1) / valid.sum(-1)


def lens_metric(plan: Plan, at: str | int | None) -> MetricSection:
    """The study's metric, read at role ``at`` instead of its own ``at`` when one is given."""
    metric = MetricSection.model_validate(plan.metric)
    return metric if at is None else metric.model_copy(update={"at": at})


@register_op("logit_lens")
def run_logit_lens(job: Job, plan: Plan, engine: Engine, data: Dataset) -> JobResult:
    """Per lens point (``params["layers"]``: each layer's resid_pre, then the final resid_post):
    the metric and the target's rank through the final norm and unembedding, per row."""
    t0 = time.perf_counter()
    metric = lens_metric(plan, job.params.get("at"))
    rows = list(job.rows)
    base = make_batch(data, rows, engine.device)
    targets = make_targets(metric, data, rows, plan.position_table())
    pos = targets.pos.to(engine.device)
    points = [plan.sites[s] for s in job.params["layers"]]
    final = plan.sites[job.params["final"]]
    m = plan.max_batch_rows

    def reads(idx: torch.Tensor) -> list[Read]:
        return [Read(s.name, s, pos[idx]) for s in points]

    clean_logits, got = clean_pass(engine, base, reads, m, targets)
    clean_logp = torch.log_softmax(picked_logits(clean_logits, targets, picked=True), -1)
    for s in points:
        if got[s.name].shape[-1] != got[final.name].shape[-1]:
            raise ExecutionError(
                f"logit lens: {s.name} has width {got[s.name].shape[-1]} but {final.name} (what "
                f"the final norm and unembedding read) has {got[final.name].shape[-1]}; the lens "
                "needs a residual stream of one width"
            )
    blocks = [[Patch(final, pos, got[s.name])] for s in points]

    def read(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t = targets.rows(idx)
        logp = clean_logp[idx.to(clean_logp.device)]
        value = score(metric.kind, logits, t, logp, picked=True).double()
        rank = torch.zeros_like(value) if metric.numeric else target_rank(logits, t).to(value)
        return torch.stack([value, rank], -1)

    lens = packed(engine, base, blocks, m, read, targets).cpu()  # [L + 1, B, 2]
    clean = score(metric.kind, clean_logits, targets, clean_logp, picked=True)
    extra = {"rank": [] if metric.numeric else lens[..., 1].tolist()}
    if not metric.numeric:
        extra["clean_rank"] = target_rank(clean_logits, targets).tolist()
    return JobResult(
        job_id=job.id,
        clean=tuple(clean.tolist()),
        variants=tuple(tuple(v) for v in lens[..., 0].tolist()),
        extra=extra,
        seconds=time.perf_counter() - t0,
    )
