"""The ``scrub`` job op: evaluate scrub trees (``experiments/scrub_tree.py``) in batched passes.

1. Clean pass: every dataset row a tree uses as a clean source (plus the base rows, for the
   unmodified metric) runs once, reading each site that some edge takes from clean rows.
2. Levels: a tree node's level is 1 + its deepest child's. The nodes of one level, of every tree
   and variant, are the batch rows of the same passes (``max_batch_rows`` rows a pass). A row gets
   every input of its node written (all writers upstream of a reader, or a split head's q/k/v),
   gathered position by position from the sources, and the node's site is read back. Nothing a row
   reads depends on the row's own tokens, so rows never interact.
3. Packing (``scrub_tree.pack``): nodes of position-local readers needed at one position share
   batch rows, one node per position (exact). Attention nodes get a row each.
4. Roots (the output on a base row) are scored with the base row's targets.

Cost: ceil(clean rows / R) + sum over levels of ceil(rows at the level / R) forward passes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from mi_spec.data.dataset import Dataset
from mi_spec.errors import ExecutionError
from mi_spec.execute.engine import Engine, Read, Write, coords_of
from mi_spec.execute.metrics import make_targets, picked_logits, score
from mi_spec.execute.ops import register_op
from mi_spec.experiments.scrub_tree import LOGITS, Slot, levels, pack, shape_of, sources_of
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.spec.sections import MetricSection


class _Values:
    """Per site, one table: clean rows' values, then the rows of each level pass, in order."""

    def __init__(self, clean_rows: list[int]):
        self.clean_at = {r: i for i, r in enumerate(clean_rows)}
        self.blocks: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.size: dict[str, int] = defaultdict(int)
        self.node_at: dict[int, int] = {}  # node id -> its row in its site's table
        self._tables: dict[str, torch.Tensor] = {}

    def add(self, site: str, value: torch.Tensor, rows: list[list[Slot]]) -> None:
        for i, slots in enumerate(rows):
            for k, _ in slots:
                self.node_at[k] = self.size[site] + i
        self.blocks[site].append(value)
        self.size[site] += len(value)
        self._tables.pop(site, None)

    def index(self, site: str, src: int) -> int:
        return self.clean_at[src] if src >= 0 else self.node_at[-src - 1]

    def table(self, site: str) -> torch.Tensor:
        if site not in self._tables:
            self._tables[site] = torch.cat(self.blocks[site])
        return self._tables[site]


@register_op("scrub")
def run_scrub(job: Job, plan: Plan, engine: Engine, data: Dataset) -> JobResult:
    """Evaluate every variant's trees; per-row metric: clean (the model) and one row per variant."""
    t0 = time.perf_counter()
    sites: list[str] = job.params["sites"]
    nodes: list[list[Any]] = job.params["nodes"]
    rows = list(job.rows)
    metric = MetricSection.model_validate(plan.metric)
    targets = make_targets(metric, data, rows, plan.position_table())
    clean_sites: set[str] = set()
    clean_rows = set(rows)
    for node in nodes:
        for edge in node[3]:
            used = [s for s in sources_of(edge) if s >= 0]
            clean_rows.update(used)
            clean_sites.update([sites[edge[0]]] if used else [])
    lengths = data.lengths
    length = lengths[rows[0]]
    if any(lengths[r] != length for r in clean_rows):
        raise ExecutionError(f"job {job.id}: scrub trees mix inputs of different lengths")
    store = _Values(sorted(clean_rows))
    clean_logits = _clean_pass(plan, engine, data, sorted(clean_rows), clean_sites, rows, store)
    clean_logp = torch.log_softmax(picked_logits(clean_logits, targets), -1)
    roots = {k for v in job.params["variants"] for k in v["roots"]}
    root_logits: dict[int, torch.Tensor] = {}
    level = levels(nodes)
    passes = -(-len(clean_rows) // plan.max_batch_rows)
    for depth in range(1, max(level, default=0) + 1):
        todo = sorted(
            (k for k, lv in enumerate(level) if lv == depth), key=lambda k: shape_of(nodes[k])
        )
        packed = pack(nodes, sites, todo)
        for start in range(0, len(packed), plan.max_batch_rows):
            chunk = packed[start : start + plan.max_batch_rows]
            logits = _level_pass(plan, engine, data, nodes, sites, chunk, store, length)
            passes += 1
            for i, (_, slots) in enumerate(chunk):
                root_logits |= {k: logits[i] for k, _ in slots if k in roots}
    variants = []
    for v in job.params["variants"]:
        logits = torch.stack([root_logits[k] for k in v["roots"]])
        variants.append(tuple(score(metric.kind, logits, targets, clean_logp).tolist()))
    clean = score(metric.kind, clean_logits, targets, clean_logp).tolist()
    return JobResult(
        job_id=job.id,
        clean=tuple(clean),
        variants=tuple(variants),
        extra={"passes": passes, "tree_nodes": len(nodes), "clean_rows": len(clean_rows)},
        seconds=time.perf_counter() - t0,
    )


def _clean_pass(
    plan: Plan,
    engine: Engine,
    data: Dataset,
    clean_rows: list[int],
    clean_sites: set[str],
    base_rows: list[int],
    store: _Values,
) -> torch.Tensor:
    """Read ``clean_sites`` on every clean row; return the base rows' clean logits."""
    base_at = {r: i for i, r in enumerate(base_rows)}
    base_logits: list[Any] = [None] * len(base_rows)
    for start in range(0, len(clean_rows), plan.max_batch_rows):
        chunk = clean_rows[start : start + plan.max_batch_rows]
        ids, mask = (torch.tensor(x, device=engine.device) for x in data.padded(chunk))
        reads = [Read(s, plan.sites[s], None) for s in sorted(clean_sites)]
        logits, got = engine.run(ids, mask, reads=reads)
        for s, v in got.items():
            store.blocks[s].append(v)
        for i, r in enumerate(chunk):
            if r in base_at:
                base_logits[base_at[r]] = logits[i]
    for s in clean_sites:
        store.size[s] = len(clean_rows)
    return torch.stack(base_logits)


def _level_pass(
    plan: Plan,
    engine: Engine,
    data: Dataset,
    nodes: list[list[Any]],
    sites: list[str],
    chunk: list[tuple[int, list[Slot]]],
    store: _Values,
    length: int,
) -> torch.Tensor:
    """One forward computing the nodes in ``chunk`` (one batch row each); returns the logits."""
    tokens = [nodes[slots[0][0]][1] for _, slots in chunk]
    ids, mask = (torch.tensor(x, device=engine.device) for x in data.padded(tokens))
    groups: list[tuple[int, int]] = []  # [start, stop) runs of rows of one shape (site, inputs)
    shapes = [shape_of(nodes[slots[0][0]]) for _, slots in chunk]
    for i, shape in enumerate(shapes):
        if groups and shapes[groups[-1][0]] == shape:
            groups[-1] = (groups[-1][0], i + 1)
        else:
            groups.append((i, i + 1))
    writes, reads = [], []
    for a, b in groups:
        site = sites[chunk[a][0]]
        for e, edge in enumerate(nodes[chunk[a][1][0][0]][3]):
            source = sites[edge[0]]
            index = _index(store, source, [slots for _, slots in chunk[a:b]], nodes, e, length)
            table = store.table(source)
            value = table[torch.from_numpy(index), torch.arange(length)[None, :]]
            writes.append(Write(plan.sites[source], slice(a, b), None, value))
            slots = [slots for _, slots in chunk[a:b]]
            for sub in _subspaces(nodes, slots, e):  # then their coordinates, from their sources
                at = _sub_index(store, source, slots, nodes, e, index, sub)
                value = table[torch.from_numpy(at), torch.arange(length)[None, :]]
                bound = plan.sites[sites[sub]]
                writes.append(Write(bound, slice(a, b), None, coords_of(bound, value)))
        if site != LOGITS:
            reads.append(Read((a, b), plan.sites[site], None))
    logits, got = engine.run(ids, mask, reads=reads, writes=writes)
    for (a, b), value in got.items():
        store.add(sites[chunk[a][0]], value[a:b], [slots for _, slots in chunk[a:b]])
    return logits


def _subspaces(nodes: list[list[Any]], rows: list[list[Slot]], e: int) -> list[int]:
    """The subspace sites whose coordinates input edge ``e`` of these rows' nodes takes elsewhere."""
    found = {sub for slots in rows for k, _ in slots for *_, sub in _spaces(nodes[k][3][e])}
    return sorted(found)


def _spaces(edge: list[Any]) -> list[list[int]]:
    return edge[3] if len(edge) > 3 else []


def _sub_index(
    store: _Values,
    site: str,
    rows: list[list[Slot]],
    nodes: list[list[Any]],
    e: int,
    index: np.ndarray,
    sub: int,
) -> np.ndarray:
    """``index`` with the positions where subspace ``sub`` has its own source moved to it
    (elsewhere its coordinates are rewritten with the site's own: no change)."""
    out = index.copy()
    for i, slots in enumerate(rows):
        for k, q in slots:
            for p, s, b in _spaces(nodes[k][3][e]):
                if b == sub and (q is None or p == q):
                    out[i, p] = store.index(site, s)
    return out


def _index(
    store: _Values, site: str, rows: list[list[Slot]], nodes: list[list[Any]], e: int, length: int
) -> np.ndarray:
    """Rows of ``site``'s table to gather, [rows, positions], for input edge ``e`` of each slot."""
    index = np.zeros((len(rows), length), dtype=np.int64)
    for i, slots in enumerate(rows):
        for k, q in slots:
            _, default, overrides = nodes[k][3][e][:3]
            if q is None:
                index[i] = store.index(site, default)
                for p, s in overrides:
                    index[i, p] = store.index(site, s)
            else:
                src = next((s for p, s in overrides if p == q), default)
                index[i, q] = store.index(site, src)
    return index
