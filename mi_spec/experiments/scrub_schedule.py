"""Evaluating scrub trees (``scrub_tree``'s plan encoding) in batched passes: which rows each
pass runs, what they write and read, and where every value lands.

*Evaluation* (``schedule``, run by ``execute/scrub_op.py``; compile counts the same passes). A node's value depends only on what
is written into its inputs, never on its row's tokens, so values are computed per distinct input:
a position-local reader (q/k/v input, MLP, residual point, output) per (position, inputs there); a
head, under causal attention, per distinct input prefix (one batch row serves every node whose
inputs are a prefix of its own), under bidirectional attention per distinct whole row. Inputs are
compared as value classes, so equal subtrees count as equal. Rows run only as far as they are
used (causal), passes stop after their deepest site, and each site keeps its values only at the
positions later read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mi_spec.experiments.scrub_tree import (
    LOGITS,
    ScrubError,
    head_of,
    layer_of,
    levels,
    shape_of,
)

# readers that depend at position q only on their inputs at q
LOCAL = re.compile(r"^(L\d+\.H\d+:[qkv]|L\d+\.mlp_out|L\d+\.resid_(pre|post)|logits)$")
PASS_FLOATS = 1 << 28  # cap on a stage's gathered writes, reads and logits: 1 GiB in float32


def layer_key(site: str) -> int:
    """How deep a pass reading ``site`` runs: embed first, then by layer, the output last."""
    return 1 << 30 if site == LOGITS else layer_of(site.split("[")[0])


@dataclass(slots=True)
class Row:
    """A batch row of a level pass: each input edge written at the positions listed, then ``site``
    read at ``reads``. Sources index the edge site's table (``Schedule``)."""

    site: int
    shape: tuple[int, ...]  # (site, input sites...): rows of one shape share their writes
    tokens: int  # the dataset row run; values never depend on it (every input is written)
    length: int  # positions run: 0 .. length - 1
    reads: list[int]
    writes: list[tuple[list[int], list[int]]]  # per input edge: (positions, sources)
    subs: list[list[list[int]]]  # per input edge: [[position, subspace site id, source], ...]
    cells: list[int] = field(default_factory=list)  # the value class of each read
    at: int = 0  # table index of its first read


@dataclass(slots=True)
class CleanRow:
    """A dataset row of the clean pass: sites read (site id -> positions), logits positions."""

    row: int
    length: int
    reads: dict[int, list[int]]
    logits: list[int]
    at: dict[int, int] = field(default_factory=dict)  # site id -> table index of its first read


@dataclass
class Schedule:
    """How a job's trees are evaluated: the clean pass's stages, then each level's; a stage runs in
    passes of at most ``max_batch_rows`` rows. Every value computed lands in its site's table:
    clean values at the positions some write reads, then the levels' reads (``sizes`` entries)."""

    clean: list[list[CleanRow]]
    levels: list[list[Row]]
    sizes: dict[int, int]
    cell_index: dict[tuple[int, int], int]  # (node, position) -> index in its site's table
    clean_logits: dict[tuple[int, int], int]  # (base row, position) -> index in the logits table

    @property
    def stage_rows(self) -> list[int]:
        """Rows of each stage, clean first (``params["level_rows"]``)."""
        return [len(s) for s in self.clean] + [len(s) for s in self.levels]


def schedule(
    nodes: Sequence[Sequence[Any]],
    sites: Sequence[str],
    length: int,
    base: Mapping[int, Sequence[int]],
    widths: Sequence[int],
    attention: str = "causal",
    budget: int = PASS_FLOATS,
    share: bool = True,
    truncate: bool = True,
) -> Schedule:
    """The evaluation schedule of ``nodes`` (one length), with clean logits of ``base`` rows at
    their positions; ``widths``: floats per value of each site (logits: the vocabulary).

    Values, not nodes, are computed once (``share``): a position-local reader's value at q depends
    only on its inputs at q; with causal attention, a head's value at p on its inputs at 0..p;
    with bidirectional attention, on the whole row. Inputs are compared as value classes, so
    equal subtrees count as equal inputs. ``truncate`` (causal only) runs a row up to its last
    position used. Stages split where the pass depth (``layer_key``) changes and where a stage's
    padded writes, reads and logits would pass ``budget`` floats.
    """
    return _Scheduler(nodes, sites, length, attention == "causal", share, truncate).run(
        base, widths, budget
    )


@dataclass
class _Trie:
    """Inputs of the head nodes of one shape, position by position: a path is a row's inputs."""

    next: dict[tuple[int, tuple[Any, ...]], int] = field(default_factory=dict)
    parent: dict[int, int] = field(default_factory=dict)
    inputs: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    needed: dict[int, None] = field(default_factory=dict)  # classes some node reads (causal)
    leaves: dict[int, dict[int, int]] = field(default_factory=dict)  # bidirectional: p -> class

    def path(self, t: int) -> list[int]:
        out = []
        while t != -1:
            out.append(t)
            t = self.parent[t]
        return out[::-1]


class _Scheduler:
    def __init__(self, nodes, sites, length: int, causal: bool, share: bool, truncate: bool):
        self.nodes, self.sites, self.length = nodes, sites, length
        self.causal, self.share, self.truncate = causal, share, truncate and causal
        self.cell: dict[tuple[int, int], int] = {}  # (node, position) -> value class
        self.classes = 0

    def _new(self) -> int:
        self.classes += 1
        return self.classes - 1

    def run(self, base: Mapping[int, Sequence[int]], widths: Sequence[int], budget: int):
        level = levels(self.nodes)
        by_level: list[list[int]] = [[] for _ in range(max(level, default=0))]
        for k, lv in enumerate(level):
            by_level[lv - 1].append(k)
        rows = [self._level(ids) for ids in by_level]
        clean = self._clean(rows, base)
        logits = self.sites.index(LOGITS) if LOGITS in self.sites else -1
        width = dict(enumerate(widths))

        def clean_slots(c: CleanRow) -> dict[Any, tuple[int, int]]:
            out = {s: (len(ps), width[s]) for s, ps in c.reads.items()}
            return out | ({logits: (len(c.logits), width[logits])} if c.logits else {})

        def deepest(c: CleanRow) -> int:
            if c.logits:
                return layer_key(LOGITS)
            return max(layer_key(self.sites[s]) for s in c.reads)

        clean.sort(key=lambda c: (deepest(c), c.length, c.row))
        clean_stages = _stages(clean, deepest, lambda c: 0, clean_slots, budget)
        level_stages: list[list[Row]] = []
        for got in rows:
            got.sort(key=lambda r: (layer_key(self.sites[r.site]), r.shape, r.length))
            level_stages += _stages(
                got,
                lambda r: layer_key(self.sites[r.site]),
                lambda r: r.shape,
                lambda r: {
                    "read": (len(r.reads), width[r.site]),
                    **{
                        e: (len(r.writes[e][0]) + len(r.subs[e]), width[s])
                        for e, s in enumerate(r.shape[1:])
                    },
                },
                budget,
            )
        sizes: dict[int, int] = {}
        at: dict[tuple[int, int, int], int] = {}  # (site, clean row, position) -> index
        clean_logits: dict[tuple[int, int], int] = {}
        for c in (c for stage in clean_stages for c in stage):
            for s, ps in c.reads.items():
                c.at[s] = start = sizes.get(s, 0)
                at.update({(s, c.row, p): start + i for i, p in enumerate(ps)})
                sizes[s] = start + len(ps)
            if c.logits:
                c.at[logits] = start = sizes.get(logits, 0)
                clean_logits.update({(c.row, p): start + i for i, p in enumerate(c.logits)})
                sizes[logits] = start + len(c.logits)
        index: dict[int, int] = {}  # value class -> index in its site's table
        for r in (r for stage in level_stages for r in stage):
            r.at = start = sizes.get(r.site, 0)
            index.update({c: start + i for i, c in enumerate(r.cells)})
            sizes[r.site] = start + len(r.cells)
        for r in (r for stage in level_stages for r in stage):
            for e, s in enumerate(r.shape[1:]):
                ps, src = r.writes[e]
                got = [
                    at[(s, x, p)] if x >= 0 else index[-x - 1] for p, x in zip(ps, src, strict=True)
                ]
                r.writes[e] = (ps, got)
                for w in r.subs[e]:
                    w[2] = at[(s, w[2], w[0])] if w[2] >= 0 else index[-w[2] - 1]
        cells = {kp: index[c] for kp, c in self.cell.items()}
        return Schedule(clean_stages, level_stages, sizes, cells, clean_logits)

    def _clean(self, rows: list[list[Row]], base: Mapping[int, Sequence[int]]) -> list[CleanRow]:
        """Every dataset row a write takes values from (at those sites and positions), and the
        base rows (their logits at the scored positions)."""
        demand: dict[int, dict[int, set[int]]] = {}
        for r in (r for got in rows for r in got):
            for e, s in enumerate(r.shape[1:]):
                for p, src in zip(*r.writes[e], strict=True):
                    if src >= 0:
                        demand.setdefault(src, {}).setdefault(s, set()).add(p)
                for p, _, src in r.subs[e]:
                    if src >= 0:
                        demand.setdefault(src, {}).setdefault(s, set()).add(p)
        out = []
        for row in sorted(set(demand) | set(base)):
            reads = {s: sorted(ps) for s, ps in sorted(demand.get(row, {}).items())}
            logits = sorted(set(base.get(row, ())))
            last = max([ps[-1] for ps in reads.values()] + logits)
            out.append(CleanRow(row, last + 1 if self.truncate else self.length, reads, logits))
        return out

    def _level(self, ids: list[int]) -> list[Row]:
        """The batch rows computing the distinct values of one level's nodes."""
        local: dict[Any, dict[tuple[int, tuple[Any, ...]], tuple[int, int]]] = {}
        tries: dict[Any, _Trie] = {}
        for k in ids:
            sid, row, need, _ = self.nodes[k]
            shape = shape_of(self.nodes[k])
            group = shape if self.share else (shape, k)
            if LOCAL.match(self.sites[sid]):
                cells = local.setdefault(group, {})
                for q, inputs in zip(need, self._inputs(k, need), strict=True):
                    if (q, inputs) not in cells:
                        cells[(q, inputs)] = (self._new(), row)
                    self.cell[(k, q)] = cells[(q, inputs)][0]
                continue
            trie = tries.setdefault(group, _Trie())
            span = range(need[-1] + 1 if self.causal else self.length)
            t, wanted = -1, set(need)
            for p, inputs in enumerate(self._inputs(k, span)):
                if (t, inputs) not in trie.next:
                    new = trie.next[(t, inputs)] = self._new()
                    trie.parent[new], trie.inputs[new], trie.tokens[new] = t, inputs, row
                t = trie.next[(t, inputs)]
                if self.causal and p in wanted:
                    self.cell[(k, p)] = t
                    trie.needed[t] = None
            if not self.causal:
                leaf = trie.leaves.setdefault(t, {})
                for p in need:
                    if p not in leaf:
                        leaf[p] = self._new()
                    self.cell[(k, p)] = leaf[p]
        out = []
        for group, cells in local.items():
            out += self._pack(group if self.share else group[0], cells)
        for group, trie in tries.items():
            out += self._trie_rows(group if self.share else group[0], trie)
        return out

    def _inputs(self, k: int, span: Sequence[int]) -> list[tuple[Any, ...]]:
        """Node ``k``'s inputs at each position of ``span`` as value classes: per edge its source
        (a clean row >= 0, or -1 - the class of a node's value there), paired with its subspace
        sources where it has some; None where the node does not read the input there (a split
        head's query outside its need)."""
        _, _, need, edges = self.nodes[k]
        at = {p: i for i, p in enumerate(span)}
        query = set(need) if edges and head_of(self.sites[edges[0][0]]) else None
        cols = []
        for n, e in enumerate(edges):
            read = at if n or query is None else {p: i for p, i in at.items() if p in query}
            default = e[1]
            if default >= 0 and len(read) == len(at):
                col: list[Any] = [default] * len(span)
                for p, src in e[2]:
                    if p in read:
                        col[read[p]] = self._source(k, src, p)
            else:
                col = [None] * len(span)
                over = dict(e[2])
                for p, i in read.items():
                    col[i] = self._source(k, over.get(p, default), p)
            for p, src, b in e[3] if len(e) > 3 else ():
                if p in read:
                    i = read[p]
                    old, spaces = col[i] if isinstance(col[i], tuple) else (col[i], ())
                    col[i] = (old, tuple(sorted((*spaces, (b, self._source(k, src, p))))))
            cols.append(col)
        return list(zip(*cols, strict=True)) if cols else [()] * len(span)

    def _source(self, k: int, src: int, p: int) -> int:
        if src >= 0:
            return src
        cls = self.cell.get((-src - 1, p))
        if cls is None:
            child = self.nodes[-src - 1]
            raise ScrubError(
                f"scrub tree node {k} reads node {-src - 1} ({self.sites[child[0]]}) at position "
                f"{p}, where that node is not computed (it is needed at {child[2]})"
            )
        return -cls - 1

    def _pack(self, shape, cells: dict[tuple[int, tuple[Any, ...]], tuple[int, int]]) -> list[Row]:
        """Position-local values: one per position per row, as many rows as the busiest position."""
        slots: list[list[tuple[int, tuple[Any, ...], int]]] = []
        tokens: list[int] = []
        used: dict[int, int] = {}
        for (q, inputs), (cls, row) in cells.items():
            i = used.get(q, 0)
            used[q] = i + 1
            if i == len(slots):
                slots.append([])
                tokens.append(row)
            slots[i].append((q, inputs, cls))
        out = []
        for got, row in zip(slots, tokens, strict=True):
            got.sort()
            at = [(q, inputs) for q, inputs, _ in got]
            out.append(self._row(shape, row, got[-1][0] + 1, [q for q, *_ in got], at))
            out[-1].cells = [cls for *_, cls in got]
        return out

    def _trie_rows(self, shape, trie: _Trie) -> list[Row]:
        """Causal: a row per needed path with no needed extension, reading every needed value on
        it not read yet. Bidirectional: a row per distinct whole-row input."""
        out = []
        if not self.causal:
            for leaf, cells in trie.leaves.items():
                path = trie.path(leaf)
                at = [(p, trie.inputs[c]) for p, c in enumerate(path)]
                out.append(self._row(shape, trie.tokens[leaf], len(path), sorted(cells), at))
                out[-1].cells = [cells[p] for p in sorted(cells)]
            return out
        extended: set[int] = set()
        for t in trie.needed:
            a = trie.parent[t]
            while a != -1 and a not in extended:
                extended.add(a)
                a = trie.parent[a]
        taken: set[int] = set()
        for t in trie.needed:
            if t in extended:
                continue
            path = trie.path(t)
            mine = [(p, c) for p, c in enumerate(path) if c in trie.needed and c not in taken]
            taken.update(c for _, c in mine)
            at = [(p, trie.inputs[c]) for p, c in enumerate(path)]
            out.append(self._row(shape, trie.tokens[t], len(path), [p for p, _ in mine], at))
            out[-1].cells = [c for _, c in mine]
        return out

    def _row(self, shape, tokens: int, length: int, reads: list[int], at) -> Row:
        """A row writing each position's inputs ``at`` [(position, inputs)]."""
        positions = [p for p, _ in at]
        writes: list[tuple[list[int], list[int]]] = []
        subs: list[list[list[int]]] = []
        for col in zip(*(inputs for _, inputs in at), strict=True):
            if all(type(x) is int for x in col):
                writes.append((positions, list(col)))
                subs.append([])
                continue
            ps, src, spaces = [], [], []
            for p, x in zip(positions, col, strict=True):
                if x is None:
                    continue
                if isinstance(x, tuple):
                    x, mine = x
                    spaces += [[p, b, s] for b, s in mine]
                ps.append(p)
                src.append(x)
            writes.append((ps, src))
            subs.append(spaces)
        return Row(
            shape[0], shape, tokens, length if self.truncate else self.length, reads, writes, subs
        )


class _Padded:
    """Floats of a stage's padded rectangles: per run of rows of one shape, rows x the longest
    list of each slot (input edge, read, logits) x its width."""

    def __init__(self, limit: int):
        self.limit, self.run, self.rows, self.closed, self.current = limit, None, 0, 0, 0
        self.longest: dict[Any, tuple[int, int]] = {}

    def add(self, run: Any, slots: Mapping[Any, tuple[int, int]]) -> bool:
        """Add a row if the stage stays within the limit (or holds nothing yet); whether added."""
        same = run == self.run and self.rows > 0
        longest = dict(self.longest) if same else {}
        for s, (n, w) in slots.items():
            if n > longest.get(s, (0, 0))[0]:
                longest[s] = (n, w)
        rows = self.rows + 1 if same else 1
        closed = self.closed if same else self.closed + self.current
        current = rows * sum(n * w for n, w in longest.values())
        if closed + current > self.limit and (self.rows or self.closed):
            return False
        self.run, self.rows, self.longest, self.closed, self.current = (
            run, rows, longest, closed, current
        )  # fmt: skip
        return True


def _stages(items: list, key: Callable, run: Callable, slots: Callable, budget: int) -> list[list]:
    """``items`` (sorted) cut where ``key`` changes or the padded floats would pass ``budget``."""
    out: list[list] = []
    padded, last = _Padded(budget), None
    for item in items:
        k = key(item)
        if not out or k != last or not padded.add(run(item), slots(item)):
            out.append([])
            padded = _Padded(budget)
            padded.add(run(item), slots(item))
        out[-1].append(item)
        last = k
    return out
