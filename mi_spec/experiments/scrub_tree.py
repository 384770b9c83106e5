"""Treeified causal scrubbing as plain data: hypothesis nodes, the residual DAG they live in,
agreement sampling and the scrub tree. Pure Python, no torch.

Formulation (Chan et al. 2022, made exact for transformers)
-----------------------------------------------------------
*Model graph.* Writers add into the residual stream: ``embed`` (token embedding), every head
``L{l}.H{h}`` (its output z, through the output projection) and every ``L{l}.mlp_out``. Readers read
the stream: a head's q/k/v inputs (at its layer's ``resid_pre``), an MLP (at ``resid_mid``) and the
output (``logits``). A reader's input is the sum of the writers upstream of it (embed; heads and
MLPs of earlier layers; for an MLP also its own layer's heads) plus terms that depend on no input
(position embeddings, biases), equal for all inputs of one length. Layer norms, projections and the
unembedding belong to the reader. (Sequential blocks; parallel-residual blocks are not modelled.)

*Hypothesis nodes.* Each correspondence entry ``variable: [site@role, ...]`` is a node: ``embed``;
a head ``L1.H2`` (reading the stream through q, k and v at once); a head input ``L1.H2:q`` (the head
is then *split*: its output reads its three inputs, each a node of its own or unnamed); an MLP.
``@role`` restricts a node to those positions, else it covers all. The root is the output, reading
the ``output`` variables (default: variables of writer sites that no variable with sites reads).

*Named edges.* Writer node w feeds reader node r iff var(w) is a parent of var(r) in the causal
graph and w is upstream of r (for a split head: w is one of its inputs). Any other writer (or head
input) of r is unnamed there.

*Treeified resampling.* A tree node is (hypothesis node, reference input y, positions needed). Its
value is the node computed by the model on an input stream assembled writer by writer and position
by position:

- a named writer w at position q takes the value of the child (w, y', {q}), y' drawn uniformly from
  the *other* dataset inputs of y's length that agree with y on var(w) at q (per-position variable),
  or of one child (w, y', Q) with y' agreeing on var(w) for all covered positions Q (per example);
- any other writer, and a named writer at positions its node does not cover, is computed by the
  unmodified model on a random other input of y's length: one per edge (``independent``), or one
  per tree node shared by all its unnamed edges (``joint``: the rest of one random input's stream).

``embed`` is a leaf (the embedding of its input). A head needs its inputs at every position it can
see from the positions needed: with causal attention every position up to the last one needed,
with bidirectional attention every position of the row (``Arch.attention``, probed from the model
by ``models/attention_probe.py``); other readers only at the needed positions. The root is
the output on the base input x at the metric's positions; the random baseline is the root with no
named edges. A condition nobody else satisfies is an error; its counts are recorded (power).

*Residual cuts and subspaces.* A node may sit at a residual point (``L1.resid_pre``,
``L0.resid_post``): it stands for the sum of every writer below it, so readers above it read that
node plus the writers between it and them (``Hypothesis.inputs``). A node may be a subspace of its
site (``L1.resid_pre[prev]``, ``L0.H3[dir]``): its coordinates come from the agreeing child, the
rest of the site (the orthogonal complement, or what an SAE's features leave) from the position's
unnamed source, like an unnamed edge.

*Plan encoding.* ``sites``: names; ``nodes``: ``[site_id, row, need, edges]`` in post-order
(children first), ``need`` the positions whose value is used; ``edges``: ``[site_id, default,
overrides]``, the input's source at every position, except ``overrides`` ``[[pos, src], ...]``,
plus, where subspace nodes feed it, ``[[pos, src, subspace_site_id], ...]``: at ``pos`` the
subspace's coordinates are then taken from ``src``. A source ``s >= 0`` is the clean value of
dataset row s, ``s < 0`` is tree node ``-s - 1``. Nodes are hash-consed: equal nodes (site, row,
need, edges; children already shared) are stored once and referenced by every parent.
"""

from __future__ import annotations

import bisect
import functools
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mi_spec.sites.subspace_ref import split_subspace
from mi_spec.sites.vocabulary import parse_site, split_position

OUTPUT = "<output>"  # the root's pseudo-variable
LOGITS = "logits"
_HEAD = re.compile(r"^L(\d+)\.H(\d+)$")
_PART = re.compile(r"^(L\d+\.H\d+):([qkv])$")
_MLP = re.compile(r"^L(\d+)\.mlp_out$")
_RESID = re.compile(r"^L(\d+)\.resid_(pre|post)$")
ATTENTION = ("causal", "bidirectional")


class ScrubError(ValueError):
    """A hypothesis or dataset that cannot be scrubbed as written."""


@dataclass(frozen=True)
class Node:
    """A hypothesis node: ``site`` at ``role`` (None: every position) computes ``var``; with
    ``space``, only that subspace of the site does (``site[space]``)."""

    site: str
    role: str | int | None
    var: str
    space: str | None = None

    @property
    def bound(self) -> str:
        """The site as bound: ``L1.resid_pre[prev]`` for a subspace node, else the site."""
        return self.site if self.space is None else f"{self.site}[{self.space}]"

    @property
    def label(self) -> str:
        return self.bound if self.role is None else f"{self.bound}@{self.role}"


def layer_of(site: str) -> int:
    """-1 for embed, the layer of a head / head input / MLP / residual point."""
    return -1 if site == "embed" else int(site[1 : site.index(".")])


def cut_of(site: str) -> int | None:
    """A residual point's depth: the writers below it are those of layers < the depth
    (``L1.resid_pre`` and ``L0.resid_post``: 1); None for any other site."""
    m = _RESID.match(site)
    return None if m is None else int(m[1]) + (m[2] == "post")


def head_of(site: str) -> str | None:
    """``L1.H2:q`` -> ``L1.H2``; None for anything else."""
    m = _PART.match(site)
    return m[1] if m else None


@dataclass(frozen=True)
class Arch:
    """The residual DAG of a sequential transformer, from its dimensions, and what its attention
    lets a position read: ``causal`` (positions <= p) or ``bidirectional`` (the whole row)."""

    n_layers: int
    n_heads: int
    has_mlp: bool
    attention: str = "causal"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ScrubError(
                f"causal scrubbing models {' and '.join(ATTENTION)} attention, not {self.attention!r}"
            )

    def visible(self, need: frozenset[int], length: int) -> frozenset[int]:
        """The positions a head's inputs are read at when its output is needed at ``need``."""
        if self.attention == "bidirectional":
            return frozenset(range(length))
        return frozenset(range(max(need) + 1))

    @property
    def writers(self) -> list[str]:
        mlp = ["mlp_out"] if self.has_mlp else []
        per_layer = [f"H{h}" for h in range(self.n_heads)] + mlp
        return ["embed"] + [f"L{x}.{w}" for x in range(self.n_layers) for w in per_layer]

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (a few frozen, hashable instances)
    def upstream(self, reader: str) -> list[str]:
        """Writers whose output reaches ``reader``'s input (in forward order)."""
        if reader == LOGITS:
            return self.writers
        limit = layer_of(reader)
        mlp = _MLP.match(reader) is not None  # an MLP also reads its own layer's heads
        ws = self.writers
        return [
            w
            for w in ws
            if layer_of(w) < limit or (mlp and _HEAD.match(w) and layer_of(w) == limit)
        ]


@dataclass(frozen=True)
class Hypothesis:
    """Nodes, the causal graph's parents (variable -> parent variables) and the output variables."""

    nodes: tuple[Node, ...]
    parents: Mapping[str, frozenset[str]] = field(hash=False)
    output: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        correspondence: Mapping[str, Sequence[str]],
        parents: Mapping[str, Sequence[str]],
        output: Sequence[str] | None = None,
    ) -> Hypothesis:
        nodes = []
        for var, sites in correspondence.items():
            for text in sites:
                site, role = split_position(text)
                site, space, index = split_subspace(site)
                if index is not None:
                    space = f"{space}:{index}"
                nodes.append(Node(parse_site(site).name, role, var, space))
        par = {v: frozenset(p) for v, p in parents.items()}
        with_sites = {n.var for n in nodes}
        if output is None:  # writers' variables that no variable with sites reads
            read = {p for v in with_sites for p in par.get(v, ())}
            writes = {n.var for n in nodes if not head_of(n.site)}
            output = sorted(writes - read)
        missing = sorted(set(output) - with_sites)
        if missing:
            raise ScrubError(f"output variables {missing} have no sites in the correspondence")
        return cls(tuple(nodes), par, frozenset(output))

    def parents_of(self, var: str) -> frozenset[str]:
        return self.output if var == OUTPUT else self.parents.get(var, frozenset())

    @functools.cached_property
    def split(self) -> frozenset[str]:
        """Heads whose q/k/v inputs are nodes of their own."""
        return frozenset(h for n in self.nodes if (h := head_of(n.site)))

    @functools.cached_property
    def cuts(self) -> dict[int, str]:
        """Residual points that are nodes, by depth (``cut_of``)."""
        out: dict[int, str] = {}
        for n in self.nodes:
            depth = cut_of(n.site)
            if depth is not None:
                if out.get(depth, n.site) != n.site:
                    raise ScrubError(
                        f"{out[depth]} and {n.site} are the same residual point; name one of them"
                    )
                out[depth] = n.site
        return out

    def inputs(self, arch: Arch, site: str) -> list[str]:
        """What a node at ``site`` reads: its q/k/v if it is a split head, else upstream writers,
        where a residual point that is a node stands for every writer below it (a cut: what
        crosses it outside the node's subspace is resampled like an unnamed edge)."""
        if site in self.split:
            return [f"{site}:{p}" for p in "qkv"]
        depth = cut_of(site)
        if depth is not None:
            ups = [w for w in arch.writers if layer_of(w) < depth]
            below = [c for c in self.cuts if c < depth]
        else:
            ups = arch.upstream(head_of(site) or site)
            top = arch.n_layers if site == LOGITS else layer_of(head_of(site) or site)
            below = [c for c in self.cuts if c <= top]
        if not below:
            return ups
        cut = max(below)
        return [self.cuts[cut]] + [w for w in ups if layer_of(w) >= cut]

    @functools.cache  # noqa: B019 (hypotheses are few, frozen, hashable)
    def named(self, source_site: str, reader_var: str) -> list[Node]:
        """Nodes at ``source_site`` whose variable is a parent of ``reader_var``."""
        parents = self.parents_of(reader_var)
        return [n for n in self.nodes if n.site == source_site and n.var in parents]

    def without(self, i: int) -> Hypothesis:
        nodes = self.nodes[:i] + self.nodes[i + 1 :]
        output = self.output & {n.var for n in nodes}
        return Hypothesis(nodes, self.parents, output)

    def remap(self, mapping: Mapping[str, str]) -> Hypothesis:
        """Move nodes to other heads/MLPs: ``mapping`` maps a head or MLP site to another."""

        def move(site: str) -> str:
            head = head_of(site)
            return f"{mapping.get(head, head)}:{site[-1]}" if head else mapping.get(site, site)

        nodes = tuple(Node(move(n.site), n.role, n.var, n.space) for n in self.nodes)
        return Hypothesis(nodes, self.parents, self.output)


def value_key(value: Any) -> Any:
    """A hashable form of a variable's value (lists -> tuples, dicts -> sorted JSON)."""
    if isinstance(value, list | tuple):
        return tuple(value_key(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return value


class Pools:
    """Dataset rows grouped by length and by (variable, position, value): who agrees with whom."""

    def __init__(
        self,
        values: Mapping[str, Sequence[Any]],
        per_position: Mapping[str, bool],
        lengths: Sequence[int],
    ):
        self.values, self.per_position, self.lengths = values, per_position, list(lengths)
        self.groups: dict[int, list[int]] = {}
        for r, n in enumerate(self.lengths):
            self.groups.setdefault(n, []).append(r)
        self._keys: dict[tuple[str, int | None], list[Any]] = {}  # value key of every row
        self._pools: dict[tuple[str, int | None], dict[tuple[int, Any], list[int]]] = {}

    def key(self, var: str, pos: int | None, row: int) -> Any:
        """The hashable value of ``var`` (at ``pos``) on ``row``."""
        if (var, pos) not in self._keys:
            self._keys[(var, pos)] = [self._key(var, pos, r) for r in range(len(self.lengths))]
        return self._keys[(var, pos)][row]

    def _key(self, var: str, pos: int | None, row: int) -> Any:
        value = self.values[var][row]
        if pos is None:
            return value_key(value)
        if not isinstance(value, list | tuple) or len(value) != self.lengths[row]:
            raise ScrubError(
                f"per-position variable {var!r} must hold one value per token; row {row} has "
                f"{self.lengths[row]} tokens but {var} = {str(value)[:60]}"
            )
        return value_key(value[pos]) if pos < len(value) else None

    def agreeing(self, var: str, pos: int | None, row: int) -> list[int]:
        """Rows of ``row``'s length agreeing with it on ``var`` (at ``pos``), itself included."""
        if (var, pos) not in self._pools:
            pools: dict[tuple[int, Any], list[int]] = {}
            for r, n in enumerate(self.lengths):
                if pos is None or pos < n:
                    pools.setdefault((n, self.key(var, pos, r)), []).append(r)
            self._pools[(var, pos)] = pools
        return self._pools[(var, pos)][(self.lengths[row], self.key(var, pos, row))]


def draw_other(pool: list[int], row: int, rng: random.Random) -> int:
    """A uniform draw from sorted ``pool`` minus ``row`` (which it contains)."""
    i = int(rng.random() * (len(pool) - 1))
    return pool[i] if i < bisect.bisect_left(pool, row) else pool[i + 1]


@dataclass
class Sampling:
    """One tree's hypothesis and RNG, and where to record its agreement conditions (or None)."""

    hyp: Hypothesis
    rng: random.Random
    record: dict[tuple[str, int | None, Any], list[int]] | None = None


@dataclass
class TreeBuilder:
    """Builds scrub trees into one shared node list (the Plan encoding above).

    Hash-consed: a node equal to one already built (same site, row, need and edges, its children
    already shared) is not added again; its parent references the first. ``built`` counts every
    node as built (what evaluating the trees node by node would compute), ``len(nodes)`` the
    distinct ones."""

    arch: Arch
    pools: Pools
    roles: Callable[[str | int, int], list[int]]  # (named role, row) -> positions
    unnamed: str = "independent"
    max_nodes: int = 500_000
    sites: list[str] = field(default_factory=list)
    nodes: list[list[Any]] = field(default_factory=list)
    dedup: bool = True
    built: int = 0
    _known: dict[tuple[Any, ...], int] = field(default_factory=dict, repr=False)

    def root(self, t: Sampling, row: int, need: Sequence[int]) -> int:
        """Build the tree of the output on base row ``row`` scored at ``need``; its node id."""
        return -self._make(t, LOGITS, OUTPUT, row, frozenset(need)) - 1

    def _site_id(self, site: str) -> int:
        if site not in self.sites:
            self.sites.append(site)
        return self.sites.index(site)

    def _random(self, t: Sampling, row: int) -> int:
        group = self.pools.groups[self.pools.lengths[row]]
        if len(group) < 2:
            raise ScrubError(f"row {row} is the only input of its length: nothing to resample")
        return draw_other(group, row, t.rng)

    def _agree(self, t: Sampling, var: str, pos: int | None, row: int) -> int:
        pool = self.pools.agreeing(var, pos, row)
        if len(pool) < 2:
            at = "" if pos is None else f" at position {pos}"
            raise ScrubError(
                f"no dataset input other than row {row} agrees with it on {var}{at} "
                f"(= {str(self.pools.key(var, pos, row))[:40]}): nothing to resample from; use "
                "more data or a coarser variable"
            )
        if t.record is not None:
            entry = t.record.setdefault(
                (var, pos, self.pools.key(var, pos, row)), [len(pool) - 1, 0]
            )
            entry[1] += 1
        return draw_other(pool, row, t.rng)

    def _make(self, t: Sampling, site: str, var: str, row: int, need: frozenset[int]) -> int:
        """The source (encoded) of ``site`` computing ``var`` on ``row`` at positions ``need``."""
        if site == "embed":
            return row
        seen = self.arch.visible(need, self.pools.lengths[row])
        inputs = t.hyp.inputs(self.arch, site)
        if site in t.hyp.split:
            needs = [need, seen, seen]
        else:
            needs = [seen if _HEAD.match(site) else need] * len(inputs)
        shared = self._random(t, row) if self.unnamed == "joint" else None
        edges = [
            [self._site_id(s), *self._sources(t, s, var, row, n, shared)]
            for s, n in zip(inputs, needs, strict=True)
        ]
        for e in edges:  # [site, default, overrides]; [..., subspace overrides] where there are
            if not e[3]:
                e.pop()
        self.built += 1
        node = [self._site_id(site), row, sorted(need), edges]
        key = (node[0], row, tuple(node[2]), *(_frozen(e) for e in edges))
        if self.dedup and key in self._known:
            return -self._known[key] - 1
        if len(self.nodes) >= self.max_nodes:
            raise ScrubError(
                f"the scrub trees exceed {self.max_nodes} distinct nodes per job; lower "
                "batch_size, samples or the number of scored positions (sample_positions), or "
                "raise max_tree_nodes"
            )
        self._known[key] = len(self.nodes)
        self.nodes.append(node)
        return -len(self.nodes)

    def _sources(
        self, t: Sampling, site: str, var: str, row: int, need: frozenset[int], shared: int | None
    ) -> tuple[int, list[list[int]], list[list[int]]]:
        """(default source, [[position, source], ...], [[position, source, subspace site], ...])
        of input ``site`` for reader ``var``: a subspace node's coordinates come from its agreeing
        child, the rest of the site (its complement) from the position's own source."""
        at: dict[int, int] = {}
        subs: dict[tuple[int, str], int] = {}
        for node in t.hyp.named(site, var):
            where = self.roles(node.role, row) if node.role is not None else need
            covered = sorted(need.intersection(where))
            taken = set(at) | {q for q, b in subs if node.space is None or b == node.bound}
            if clash := taken.intersection(covered):
                raise ScrubError(f"{site} at positions {sorted(clash)} belongs to two nodes")
            if not covered:
                continue
            if self.pools.per_position.get(node.var, False):
                got = {}
                for q in covered:
                    other = self._agree(t, node.var, q, row)
                    got[q] = self._make(t, site, node.var, other, frozenset({q}))
            else:
                other = self._agree(t, node.var, None, row)
                child = self._make(t, site, node.var, other, frozenset(covered))
                got = dict.fromkeys(covered, child)
            if node.space is None:
                at.update(got)
            else:
                subs.update({(q, node.bound): s for q, s in got.items()})
        if len(at) == len(need):  # all named: elsewhere the value is never used
            default = at[min(at)]
        else:
            default = shared if shared is not None else self._random(t, row)
        spaces = [[q, s, self._site_id(b)] for (q, b), s in sorted(subs.items())]
        return default, [[q, s] for q, s in sorted(at.items()) if s != default], spaces


def _frozen(edge: Sequence[Any]) -> tuple[Any, ...]:
    """A hashable form of an edge ``[site_id, default, overrides(, subspace overrides)]``."""
    return (edge[0], edge[1], *(tuple(map(tuple, part)) for part in edge[2:]))


def sources_of(edge: Sequence[Any]) -> list[int]:
    """Every source an edge ``[site_id, default, overrides(, subspace overrides)]`` names."""
    subs = edge[3] if len(edge) > 3 else ()
    return [edge[1], *(s for _, s in edge[2]), *(s for _, s, _ in subs)]


def shape_of(node: Sequence[Any]) -> tuple[int, ...]:
    """What rows computing ``node`` share in one pass: its site and its inputs' sites (the same
    site reads different inputs under hypotheses with different residual cuts)."""
    return (node[0], *(e[0] for e in node[3]))


def levels(nodes: Sequence[Sequence[Any]]) -> list[int]:
    """Each node's evaluation level: 1 + the deepest child node (clean sources are level 0)."""
    out: list[int] = []
    for node in nodes:
        children = [out[-s - 1] for e in node[3] for s in sources_of(e) if s < 0]
        out.append(max(children, default=0) + 1)
    return out
