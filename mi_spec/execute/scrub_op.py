"""The ``scrub`` job op: evaluate scrub trees (``experiments/scrub_tree.py``) in batched passes,
as ``scrub_schedule.schedule`` lays them out (the compile step counts the same stages).

1. Clean pass: every dataset row some write takes values from runs once, reading each site at the
   positions read from it; base rows also give their logits at the scored positions.
2. Levels: a tree node's level is 1 + its deepest child's. A batch row gets its inputs written (all
   writers upstream of a reader, or a split head's q/k/v) at the positions it reads them, gathered
   from the values computed before, and its site is read back. Nothing a row reads depends on the
   row's own tokens, so rows never interact, and each distinct value is computed once: a
   position-local reader (q/k/v input, MLP, residual point, output) per (position, inputs there),
   packed one per position per row; a head per distinct input prefix (causal attention: values at
   p depend on inputs at 0..p, so one row serves every node whose inputs are a prefix of its own),
   or per distinct whole row (bidirectional).
3. Passes are as short as they can be: a row runs up to the last position it uses (causal), a pass
   stops after its deepest site (``Engine.run(logits=False)``), and the output's rows compute logits
   at the scored positions only, scored right away (nothing of vocabulary width is kept).
4. Memory: per site one table of the distinct values read, at the positions later read (clean
   values included), so memory grows with distinct values x positions read, not nodes x T; a
   stage's gathered writes, reads and logits stay below ``params["pass_floats"]``.

Cost: sum over stages of ceil(rows / R) forward passes (``params["level_rows"]``: the clean
stages, then each level's, split where the pass depth changes or the memory cap is reached), each
over rows x (last position used + 1) tokens, up to the deepest site read. ``params["full_passes"]``
(for comparison and tests) runs every row over the whole sequence and model, shares nothing
between nodes, and reads logits everywhere: the same values, the old cost.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from mi_spec.data.dataset import Dataset
from mi_spec.errors import ExecutionError
from mi_spec.execute.engine import Engine, Read, Write, coords_of
from mi_spec.execute.metrics import Targets, make_targets, score
from mi_spec.execute.ops import register_op
from mi_spec.experiments.scrub_schedule import PASS_FLOATS, CleanRow, Row, schedule
from mi_spec.experiments.scrub_tree import LOGITS
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.sites.adapter import SiteBinding
from mi_spec.spec.sections import MetricSection


class _Tables:
    """Per site, the distinct values computed, at the indices the schedule gave them."""

    def __init__(self, sizes: dict[int, int]):
        self.sizes = sizes
        self.tables: dict[int, torch.Tensor] = {}

    def put(self, site: int, start: int, values: torch.Tensor) -> None:
        if site not in self.tables:
            shape = (self.sizes[site], *values.shape[1:])
            self.tables[site] = values.new_zeros(shape)
        self.tables[site][start : start + len(values)] = values

    def get(self, site: int, index: torch.Tensor) -> torch.Tensor:
        table = self.tables[site]
        return table[index.to(table.device)]


class _Scores:
    """Per-position metric values of the clean run (group 0) and each variant, filled as the
    logits of scored cells come out of passes."""

    def __init__(self, kind: str, targets: Targets, groups: int):
        self.kind, self.targets = kind, targets
        self.values = torch.full((groups, *targets.pos.shape), float("nan"), dtype=torch.float64)
        self.users: dict[int, list[tuple[int, int, int]]] = {}  # logits index -> (group, x, j)
        self.clean_logp: torch.Tensor | None = None  # [B, P, V] for kl

    def use(self, index: int, group: int, x: int, j: int) -> None:
        self.users.setdefault(index, []).append((group, x, j))

    def add(self, start: int, logits: torch.Tensor) -> None:
        """Score the logits of table entries ``start, start + 1, ...`` for everyone using them."""
        got = [(i, *u) for i in range(len(logits)) for u in self.users.get(start + i, ())]
        if not got:
            return
        i, g, x, j = (torch.tensor(c) for c in zip(*got, strict=True))
        picked = logits[i.to(logits.device)][:, None]
        t = self.targets
        one = Targets(
            torch.zeros(len(got), 1, dtype=torch.long),
            t.target[x, j][:, None],
            None if t.wrong is None else t.wrong[x, j][:, None],
        )
        ref = None
        if self.kind == "kl":
            if self.clean_logp is None:
                shape = (*t.pos.shape, picked.shape[-1])
                dtype = torch.float64 if picked.dtype == torch.float64 else torch.float32
                self.clean_logp = torch.zeros(shape, dtype=dtype, device=picked.device)
            dev = self.clean_logp.device
            clean = (g == 0).to(dev)
            if bool(clean.any()):
                mine = picked[clean][:, 0]
                mine = mine if mine.dtype == torch.float64 else mine.float()
                xs, js = x.to(dev)[clean], j.to(dev)[clean]
                self.clean_logp[xs, js] = torch.log_softmax(mine, -1).to(self.clean_logp.dtype)
            ref = self.clean_logp[x.to(dev), j.to(dev)][:, None]
        self.values[g, x, j] = score(self.kind, picked, one, ref, picked=True).double().cpu()

    def means(self, where: str) -> torch.Tensor:
        """[groups, B]: each row's mean over its scored positions (as ``metrics.score``)."""
        valid = self.targets.valid
        mask = torch.ones_like(self.values[0], dtype=torch.bool) if valid is None else valid
        if bool(self.values[:, mask].isnan().any()):
            raise ExecutionError(f"{where}: a scored position of a scrub tree was never computed")
        if valid is None:
            return self.values.mean(-1)
        return self.values.nan_to_num(0.0).mul(mask).sum(-1) / mask.sum(-1)


@register_op("scrub")
def run_scrub(job: Job, plan: Plan, engine: Engine, data: Dataset) -> JobResult:
    """Evaluate every variant's trees; per-row metric: clean (the model) and one row per variant."""
    t0 = time.perf_counter()
    p = job.params
    sites: list[str] = p["sites"]
    nodes: list[list[Any]] = p["nodes"]
    rows = list(job.rows)
    where = f"job {job.id}"
    metric = MetricSection.model_validate(plan.metric)
    targets = make_targets(metric, data, rows, plan.position_table())
    if p.get("positions") is not None:
        targets = _keep(targets, p["positions"])
    full = bool(p.get("full_passes", False))
    lengths = data.lengths
    length = lengths[rows[0]]
    used = {n[1] for n in nodes} | {s for n in nodes for e in n[3] for s in _clean_sources(e)}
    if any(lengths[r] != length for r in used | set(rows)):
        raise ExecutionError(f"{where}: scrub trees mix inputs of different lengths")
    variants = p["variants"]
    base = {r: nodes[k][2] for r, k in zip(rows, variants[0]["roots"], strict=True)}
    widths = p.get("widths") or [1] * len(sites)
    attention = p.get("attention", "bidirectional")  # not recorded: whole rows, exact for any
    plan_of = schedule(
        nodes, sites, length, base, widths, attention, p.get("pass_floats", PASS_FLOATS),
        share=not full, truncate=not full,
    )  # fmt: skip
    scores = _Scores(metric.kind, targets, 1 + len(variants))
    pos, valid = targets.pos.tolist(), targets.valid
    for x, r in enumerate(rows):
        for j, q in enumerate(pos[x]):
            if valid is not None and not bool(valid[x, j]):
                continue
            if (r, q) not in plan_of.clean_logits:
                raise ExecutionError(f"{where}: row {r} is scored at {q}, where it has no tree")
            scores.use(plan_of.clean_logits[(r, q)], 0, x, j)
            for g, v in enumerate(variants, 1):
                scores.use(plan_of.cell_index[(v["roots"][x], q)], g, x, j)
    tables = _Tables(plan_of.sizes)
    bind = [plan.sites.get(s) for s in sites]
    logits_id = sites.index(LOGITS) if LOGITS in sites else -1
    passes = 0
    step = plan.max_batch_rows
    for stage in plan_of.clean:
        for start in range(0, len(stage), step):
            chunk = stage[start : start + step]
            _clean_pass(engine, data, bind, logits_id, chunk, tables, scores, full, length)
            passes += 1
    for stage in plan_of.levels:
        for start in range(0, len(stage), step):
            chunk = stage[start : start + step]
            _level_pass(engine, data, bind, logits_id, chunk, tables, scores, full, length)
            passes += 1
    means = scores.means(where)
    batch_rows = sum(plan_of.stage_rows)
    return JobResult(
        job_id=job.id,
        clean=tuple(means[0].tolist()),
        variants=tuple(tuple(m.tolist()) for m in means[1:]),
        extra={
            "passes": passes,
            "tree_nodes": p.get("tree_nodes", len(nodes)),
            "distinct_nodes": len(nodes),
            "clean_rows": sum(len(s) for s in plan_of.clean),
            "batch_rows": batch_rows,
        },
        seconds=time.perf_counter() - t0,
    )


def _clean_sources(edge: Sequence[Any]) -> list[int]:
    subs = edge[3] if len(edge) > 3 else ()
    return [s for s in (edge[1], *(s for _, s in edge[2]), *(s for _, s, _ in subs)) if s >= 0]


def _keep(t: Targets, positions: Sequence[Sequence[int]]) -> Targets:
    """``t`` restricted to each row's sampled ``positions`` (ragged rows repeat their last)."""
    keep = []
    for x, wanted in enumerate(positions):
        mine = set(wanted)
        ok = [j for j in range(t.pos.shape[1]) if t.valid is None or bool(t.valid[x, j])]
        keep.append([j for j in ok if int(t.pos[x, j]) in mine])
    width = max(len(k) for k in keep)
    index = torch.tensor([k + [k[-1]] * (width - len(k)) for k in keep])
    valid = None
    if any(len(k) != width for k in keep):
        valid = torch.tensor([[i < len(k) for i in range(width)] for k in keep])
    return Targets(
        t.pos.gather(1, index),
        t.target.gather(1, index),
        None if t.wrong is None else t.wrong.gather(1, index),
        valid,
    )


def _rect(lists: Sequence[Sequence[Sequence[int]]], columns: int = 2) -> list[torch.Tensor]:
    """Rows of tuples as rectangles, one per tuple field (short rows repeat their last tuple)."""
    width = max(len(x) for x in lists)
    full = [list(x) + [x[-1]] * (width - len(x)) for x in lists]
    flat = torch.tensor(full, dtype=torch.long).reshape(len(lists), width, columns)
    return [flat[..., c] for c in range(columns)]


def _ids(data: Dataset, engine: Engine, tokens: list[int], length: int):
    ids, mask = data.padded(tokens)
    return (torch.tensor(x, device=engine.device)[:, :length] for x in (ids, mask))


def _positions(lists: list[list[int] | None]) -> torch.Tensor:
    """Per-row positions [B, P]; rows with none (None or empty) read position 0 (discarded)."""
    return _rect([[[q] for q in (x or [0])] for x in lists], 1)[0]


def _run(engine: Engine, ids, mask, reads, writes, logit_rows: list[list[int] | None], full: bool):
    """One pass; logits at each row's positions (None: no row needs them, the pass stops early)."""
    if not any(logit_rows):
        return engine.run(ids, mask, reads=reads, writes=writes, logits=full)
    at = _positions(logit_rows)
    if full:
        logits, got = engine.run(ids, mask, reads=reads, writes=writes, logits=True)
        index = torch.arange(len(at), device=logits.device)[:, None]
        return logits[index, at.to(logits.device)], got
    return engine.run(ids, mask, reads=reads, writes=writes, logits=at)


def _clean_pass(
    engine: Engine,
    data: Dataset,
    bind: list[SiteBinding | None],
    logits_id: int,
    chunk: list[CleanRow],
    tables: _Tables,
    scores: _Scores,
    full: bool,
    length: int,
) -> None:
    """Read each clean row's sites at the positions used; score the base rows' clean logits."""
    run_to = length if full else max(c.length for c in chunk)
    ids, mask = _ids(data, engine, [c.row for c in chunk], run_to)
    read_sites = sorted({s for c in chunk for s in c.reads})
    reads = [
        Read(s, _bound(bind, s), _positions([c.reads.get(s) for c in chunk])) for s in read_sites
    ]
    logits, got = _run(engine, ids, mask, reads, [], [c.logits for c in chunk], full)
    for s in read_sites:
        for i, c in enumerate(chunk):
            if s in c.reads:
                tables.put(s, c.at[s], got[s][i, : len(c.reads[s])])
    for i, c in enumerate(chunk):
        if c.logits:
            scores.add(c.at[logits_id], logits[i, : len(c.logits)])


def _level_pass(
    engine: Engine,
    data: Dataset,
    bind: list[SiteBinding | None],
    logits_id: int,
    chunk: list[Row],
    tables: _Tables,
    scores: _Scores,
    full: bool,
    length: int,
) -> None:
    """One forward computing the rows of ``chunk``: writes gathered from the tables, reads stored."""
    run_to = length if full else max(r.length for r in chunk)
    ids, mask = _ids(data, engine, [r.tokens for r in chunk], run_to)
    writes: list[Write] = []
    start = 0
    for stop in range(1, len(chunk) + 1):  # runs of rows of one shape share their writes
        if stop < len(chunk) and chunk[stop].shape == chunk[start].shape:
            continue
        writes += _writes(bind, chunk, start, stop, tables)
        start = stop
    read_sites = sorted({r.site for r in chunk if r.site != logits_id})
    reads = [
        Read(s, _bound(bind, s), _positions([r.reads if r.site == s else None for r in chunk]))
        for s in read_sites
    ]
    logit_rows = [r.reads if r.site == logits_id else None for r in chunk]
    logits, got = _run(engine, ids, mask, reads, writes, logit_rows, full)
    for i, r in enumerate(chunk):
        if r.site == logits_id:
            scores.add(r.at, logits[i, : len(r.reads)])
        else:
            tables.put(r.site, r.at, got[r.site][i, : len(r.reads)])


def _writes(
    bind: list[SiteBinding | None], chunk: list[Row], a: int, b: int, tables: _Tables
) -> list[Write]:
    """Rows ``a:b`` (one shape): each input edge at its positions, then the coordinates of each
    subspace that takes them from elsewhere (rows without such a source rewrite a position's own
    coordinates: no change)."""
    out = []
    rows = chunk[a:b]
    for e, site in enumerate(rows[0].shape[1:]):
        pos, src = _rect([list(zip(*r.writes[e], strict=True)) for r in rows])
        out.append(Write(_bound(bind, site), slice(a, b), pos, tables.get(site, src)))
        for sub in sorted({s for r in rows for _, s, _ in r.subs[e]}):
            mine = [
                [(q, x) for q, s, x in r.subs[e] if s == sub]
                or [(r.writes[e][0][0], r.writes[e][1][0])]
                for r in rows
            ]
            pos, src = _rect(mine)
            bound = _bound(bind, sub)
            out.append(Write(bound, slice(a, b), pos, coords_of(bound, tables.get(site, src))))
    return out


def _bound(bind: list[SiteBinding | None], site: int) -> SiteBinding:
    got = bind[site]
    if got is None:
        raise ExecutionError(f"scrub: site #{site} is not bound in the plan")
    return got
