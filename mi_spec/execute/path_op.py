"""The ``path_patch`` job op: path patching (Wang et al. 2022), sender -> receiver, three passes.

Job contract (``experiments/path_patching.py`` builds these; other code may build them too)::

    Job(op="path_patch", rows=..., source="rows" | "column", source_rows=..., source_column=...,
        variants=tuple(Variant(label=f"{sender}@{pos}->{receiver_label}",
                               interventions=(Intervention(site=sender, pos=sender_pos),))
                       for each pair),
        params={"receivers": [[receiver sites of pair i], ...],
                "receiver_pos": [receiver role (or int) or None = every position, per pair],
                "freeze": [sites frozen to their clean value in pass 2],
                "level_rows": Pairs.of(job).level_rows(job)},  # [B, B, groups*B, pairs*B]
        extra_sites=(every receiver and freeze site,))

A pair is one variant: its one intervention names the sender and the sender's position; pairs
with the same (sender, position) form a group and share one pass 2. With B base rows and
R = ``plan.max_batch_rows``:

1. source pass: the source input, reading every sender at its position (B rows);
2. clean pass: the base input, reading every freeze site (whole modules) and the clean metric;
3. pass 2, one block of B rows per group: the base input, every freeze site written with its clean
   value, then the sender with its source value; every receiver read at its position;
4. pass 3, one block of B rows per pair: the base input with only the pair's receivers written
   with their pass-2 values (at the receiver position); the metric.

Every stage runs in passes of at most R rows: blocks may straddle two passes, and the source and
clean passes run in chunks when B > R. So the stages cost ceil(B / R), ceil(B / R),
ceil(groups * B / R) and ceil(pairs * B / R) passes, as ``level_rows`` declares. Pass 3 runs
as soon as the groups it needs are complete, so only a few groups' pass-2 values are kept.
A pair whose receivers are all ``logits`` needs no pass 3: its metric is read off its group's
pass 2 (logits at the receiver positions, clean logits elsewhere); it is left out of the last
``level_rows`` entry.

Sources ``zero`` and ``mean`` also work (the sender is then ablated along the path only).
The result holds per-row metric values like the ``patch`` op: clean, source, one row per pair.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from mi_spec.data.dataset import Dataset
from mi_spec.errors import ExecutionError
from mi_spec.execute.engine import Engine, Read, Write
from mi_spec.execute.metrics import Targets, make_targets, picked_logits, score, scored_at
from mi_spec.execute.ops import register_op
from mi_spec.execute.run_job import Batch, make_batch, source_values
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.plan.path_pairs import Pairs, Role, source_stage_rows
from mi_spec.sites.adapter import SiteBinding
from mi_spec.spec.sections import MetricSection

_PICKED = "__picked__"  # pass-2 logits at the metric positions (for logits-only pairs)
Segment = tuple[int, int, int, int]  # (block, first row, stop row, offset of the first row)


def merged_bindings(sites: list[SiteBinding]) -> list[SiteBinding]:
    """Per module input/output, each contiguous run of the sites' columns as one binding.

    A site covering the whole activation (``start is None``) makes the whole module one binding.
    """
    by_module: dict[tuple[str, str], list[SiteBinding]] = defaultdict(list)
    for s in sites:
        by_module[(s.module, s.io)].append(s)
    out = []
    for (module, io), group in by_module.items():
        if any(s.start is None for s in group):
            out.append(SiteBinding(name=f"{module}.{io}", module=module, io=io))  # type: ignore[arg-type]
            continue
        runs: list[list[int]] = []
        for s in sorted(group, key=lambda s: s.start or 0):
            if runs and (s.start or 0) <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], s.stop or 0)
            else:
                runs.append([s.start or 0, s.stop or 0])
        out += [
            SiteBinding(name=f"{module}.{io}[{a}:{b}]", module=module, io=io, start=a, stop=b)  # type: ignore[arg-type]
            for a, b in runs
        ]
    return out


def segments(lo: int, hi: int, b: int) -> list[Segment]:
    """The blocks of ``b`` rows that flat rows [lo, hi) touch: (block, start, stop, offset)."""
    return [
        (k, max(lo, k * b) - k * b, min(hi, (k + 1) * b) - k * b, max(lo, k * b) - lo)
        for k in range(lo // b, (hi - 1) // b + 1)
    ]


@register_op("path_patch")
def run_path_patch(job: Job, plan: Plan, engine: Engine, data: Dataset) -> JobResult:
    """Execute a path_patch ``job``: per-row metric values (clean, source, one row per pair)."""
    t0 = time.perf_counter()
    run = _PathRun.start(job, plan, engine, data)
    variants = run.pairs_metric()
    return JobResult(
        job_id=job.id,
        clean=tuple(run.clean.tolist()),
        source=None if run.source is None else tuple(run.source.tolist()),
        variants=tuple(tuple(v.tolist()) for v in variants),
        extra={"passes": run.passes, "groups": len(run.pairs.groups)},
        seconds=time.perf_counter() - t0,
    )


@dataclass
class _PathRun:
    """State of one job: the shared passes' results and the pass-2 values awaiting pass 3."""

    job: Job
    plan: Plan
    engine: Engine
    pairs: Pairs
    base: Batch
    kind: str
    targets: Targets
    roles: dict[Role, torch.Tensor]
    sender_values: dict[tuple[str, Role], torch.Tensor]
    freeze: list[SiteBinding]
    frozen: dict[str, torch.Tensor]
    clean_picked: torch.Tensor
    clean_logp: torch.Tensor
    clean: torch.Tensor
    source: torch.Tensor | None
    passes: int = 0
    reads: dict[Any, tuple[SiteBinding, Role]] = field(default_factory=dict)
    read_at: dict[tuple[str, Role], tuple[Any, slice]] = field(default_factory=dict)
    partial: dict[int, dict[Any, list[torch.Tensor]]] = field(default_factory=dict)
    store: dict[int, dict[Any, torch.Tensor]] = field(default_factory=dict)
    out: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def start(cls, job: Job, plan: Plan, engine: Engine, data: Dataset) -> _PathRun:
        """Check the job, then run the source pass and the clean pass."""
        pairs = Pairs.of(job)
        if job.source == "none":
            raise ExecutionError(f"path_patch job {job.id}: needs a source (rows or column)")
        metric = MetricSection.model_validate(plan.metric)
        rows = list(job.rows)
        base = make_batch(data, rows, engine.device)
        table = plan.position_table()
        targets = make_targets(metric, data, rows, table)
        names = {p for _, p in pairs.groups} | set(pairs.receiver_pos)
        roles = {p: base.role(table, p) for p in names if p is not None}
        freeze = merged_bindings([plan.sites[s] for s in job.params.get("freeze", [])])
        chunks = [
            (a, min(len(rows), a + plan.max_batch_rows))
            for a in range(0, len(rows), plan.max_batch_rows)
        ]
        clean, clean_picked, frozen = _clean_pass(
            engine, base, targets, metric.kind, freeze, chunks
        )
        logp = torch.log_softmax(clean_picked, -1)
        values, source = _source_pass(job, plan, engine, data, base, pairs.groups, chunks, logp)
        run = cls(
            job=job,
            plan=plan,
            engine=engine,
            pairs=pairs,
            base=base,
            kind=metric.kind,
            targets=targets,
            roles=roles,
            sender_values=values,
            freeze=freeze,
            frozen=frozen,
            clean_picked=clean_picked,
            clean_logp=logp,
            clean=clean,
            source=source,
            passes=len(chunks) + _source_passes(job, plan.max_batch_rows),
        )
        run._plan_reads()
        return run

    def _plan_reads(self) -> None:
        """One read per receiver module and position, covering the columns pass 3 needs."""
        by_key: dict[Any, list[SiteBinding]] = defaultdict(list)
        only = self.pairs.logits_only
        for p, sites in enumerate(self.pairs.receivers):
            rp = self.pairs.receiver_pos[p]
            for s in sites if not only[p] else ():
                b = self.plan.sites[s]
                if b not in by_key[(b.module, b.io, rp)]:
                    by_key[(b.module, b.io, rp)].append(b)
        for key, sites in by_key.items():
            whole = any(s.start is None for s in sites)
            a = None if whole else min(s.start or 0 for s in sites)
            z = None if whole else max(s.stop or 0 for s in sites)
            module, io, rp = key
            cover = SiteBinding(name=f"{module}.{io}", module=module, io=io, start=a, stop=z)
            self.reads[key] = (cover, rp)
            for s in sites:
                cols = (
                    slice(None) if s.start is None else slice(s.start - (a or 0), s.stop - (a or 0))
                )
                self.read_at[(s.name, rp)] = (key, cols)

    def pairs_metric(self) -> list[torch.Tensor]:
        """Run pass 2 for every group and pass 3 for every pair; per-pair per-row metric."""
        b, r = len(self.job.rows), self.plan.max_batch_rows
        order3 = sorted(
            (p for p, only in enumerate(self.pairs.logits_only) if not only),
            key=lambda p: self.pairs.group_of[p],
        )
        last3 = {self.pairs.group_of[p]: (j + 1) * b for j, p in enumerate(order3)}
        n2, n3, done3 = len(self.pairs.groups) * b, len(order3) * b, 0
        for lo in range(0, n2, r):
            self._pass2(lo, min(n2, lo + r), b, last3)
            ready = min(n2, lo + r) // b  # groups whose pass 2 is complete
            while done3 < n3:
                stop = min(n3, done3 + r)
                if self.pairs.group_of[order3[(stop - 1) // b]] >= ready:
                    break
                self._pass3(done3, stop, b, order3)
                done3 = stop
                for g in [g for g in self.store if last3[g] <= done3]:
                    del self.store[g]
        return [torch.cat(self.out[p]) for p in range(len(self.job.variants))]

    def _pass2(self, lo: int, hi: int, b: int, last3: dict[int, int]) -> None:
        segs = segments(lo, hi, b)
        idx = torch.arange(lo, hi) % b
        writes = []
        for g, a, z, off in segs:
            rows = slice(off, off + z - a)
            writes += [Write(f, rows, None, self.frozen[f.name][a:z]) for f in self.freeze]
            sender, pos = self.pairs.groups[g]
            value = self.sender_values.get((sender, pos))
            if value is None:  # zero ablation along the path
                value = torch.zeros(())
            elif value.shape[0] != 1:  # a mean broadcasts over rows
                value = value[a:z]
            at = None if pos is None else self.roles[pos][a:z]
            writes.append(Write(self.plan.sites[sender], rows, at, value))
        reads = [
            Read(key, site, None if rp is None else self.roles[rp][idx])
            for key, (site, rp) in self.reads.items()
        ]
        dev = self.base.ids.device
        only = any(self.pairs.logits_only)
        at = _rows_of(self.targets, idx)
        logits, got = self.engine.run(
            self.base.ids[idx.to(dev)],
            self.base.mask[idx.to(dev)],
            reads=reads,
            writes=writes,
            logits=scored_at(at) if only else False,
        )
        self.passes += 1
        if only:
            got[_PICKED] = picked_logits(logits, at, picked=True)
        for g, a, z, off in segs:
            parts = self.partial.setdefault(g, defaultdict(list))
            for key, v in got.items():
                parts[key].append(v[off : off + z - a])
            if z == b:
                values = {k: torch.cat(v) for k, v in self.partial.pop(g).items()}
                self._logits_only(g, values.pop(_PICKED, None))
                if g in last3:
                    self.store[g] = values

    def _logits_only(self, g: int, picked: torch.Tensor | None) -> None:
        """Score group ``g``'s logits-only pairs from its pass-2 logits (no pass 3 needed)."""
        for p, only in enumerate(self.pairs.logits_only):
            if not only or self.pairs.group_of[p] != g or picked is None:
                continue
            rp = self.pairs.receiver_pos[p]
            if rp is not None:
                hit = (self.targets.pos[:, :, None] == self.roles[rp][:, None, :]).any(-1)
                picked_p = torch.where(hit[..., None].to(picked.device), picked, self.clean_picked)
            else:
                picked_p = picked
            n, k = self.targets.pos.shape
            at = Targets(
                torch.arange(k).expand(n, k),
                self.targets.target,
                self.targets.wrong,
                self.targets.valid,
            )
            self.out[p] = [score(self.kind, picked_p, at, self.clean_logp)]

    def _pass3(self, lo: int, hi: int, b: int, order3: list[int]) -> None:
        segs = segments(lo, hi, b)
        idx = torch.arange(lo, hi) % b
        writes = []
        for j, a, z, off in segs:
            p = order3[j]
            rp = self.pairs.receiver_pos[p]
            at = None if rp is None else self.roles[rp][a:z]
            values = self.store[self.pairs.group_of[p]]
            for s in self.pairs.receivers[p]:
                key, cols = self.read_at[(s, rp)]
                value = values[key][a:z, :, cols]
                writes.append(Write(self.plan.sites[s], slice(off, off + z - a), at, value))
        dev = self.base.ids.device
        at = _rows_of(self.targets, idx)
        logits, _ = self.engine.run(
            self.base.ids[idx.to(dev)],
            self.base.mask[idx.to(dev)],
            writes=writes,
            logits=scored_at(at),
        )
        self.passes += 1
        vals = score(self.kind, logits, at, self.clean_logp[idx], picked=True)
        for j, a, z, off in segs:
            self.out[order3[j]].append(vals[off : off + z - a])


def _source_passes(job: Job, max_rows: int) -> int:
    """Forward passes of the source stage (``mean`` averages reference rows in chunks)."""
    return -(-source_stage_rows(job) // max_rows)


def _clean_pass(
    engine: Engine,
    base: Batch,
    targets: Targets,
    kind: str,
    freeze: list[SiteBinding],
    chunks: list[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The clean metric [B], the clean logits at the metric positions, and every freeze value."""
    clean, picked, frozen = [], [], defaultdict(list)
    for a, z in chunks:
        sub = _sub_batch(base, a, z)
        at = _rows_of(targets, torch.arange(a, z))
        reads = [Read(f.name, f, None) for f in freeze]
        logits, got = engine.run(sub.ids, sub.mask, reads=reads, logits=scored_at(at))
        picked.append(picked_logits(logits, at, picked=True))
        clean.append(score(kind, logits, at, torch.log_softmax(picked[-1], -1), picked=True))
        for k, v in got.items():
            frozen[k].append(v)
    return torch.cat(clean), torch.cat(picked), {k: torch.cat(v) for k, v in frozen.items()}


def _source_pass(
    job: Job,
    plan: Plan,
    engine: Engine,
    data: Dataset,
    base: Batch,
    keys: list[tuple[str, Role]],
    chunks: list[tuple[int, int]],
    clean_logp: torch.Tensor,
) -> tuple[dict[tuple[str, Role], torch.Tensor], torch.Tensor | None]:
    """Each sender's source value at its position ([B, P, w]), and the source run's metric on
    the base targets (None for zero/mean sources, or a source of another length)."""
    table = plan.position_table()
    if job.source not in ("rows", "column"):
        return source_values(job, plan, table, engine, data, base, keys)[0], None
    metric = MetricSection.model_validate(plan.metric)
    parts: dict[tuple[str, Role], list[torch.Tensor]] = defaultdict(list)
    scores: list[torch.Tensor] = []
    for a, z in chunks:
        update: dict[str, Any] = {"rows": job.rows[a:z]}
        if job.source == "rows":
            update["source_rows"] = job.source_rows[a:z]
        sub = _sub_batch(base, a, z)
        got, run = source_values(
            job.model_copy(update=update), plan, table, engine, data, sub, keys
        )
        for k, v in got.items():
            parts[k].append(v)
        if run is not None:  # the source run, scored where the metric's role is in it
            scores.append(run.score(metric.kind, clean_logp[a:z]))
    try:
        values = {k: torch.cat(v) for k, v in parts.items()}
    except RuntimeError:
        raise ExecutionError(
            f"path_patch job {job.id}: source rows of different lengths across chunks of "
            f"{plan.max_batch_rows} rows; patch named positions, not 'all'"
        ) from None
    return values, torch.cat(scores) if len(scores) == len(chunks) else None


def _sub_batch(base: Batch, a: int, z: int) -> Batch:
    """Base rows [a, z), padded as in the whole batch."""
    return Batch(base.ids[a:z], base.mask[a:z], base.data, base.rows[a:z])


def _rows_of(t: Targets, idx: torch.Tensor) -> Targets:
    """The targets of base rows ``idx`` (a pass's rows, in order)."""
    return t.rows(idx)
