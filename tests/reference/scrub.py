"""A slow, obviously-correct causal-scrubbing reference, independent of mi_spec's scrub code.

It walks each compiled tree recursively from its root, re-deriving from the hypothesis what every
edge must be and asserting the tree says the same:

- a node reads every residual writer upstream of it (embed, heads and MLPs of earlier layers, its
  own layer's heads for an MLP), or, for a head whose q/k/v are named, those three inputs;
- at each position the reader needs (attention: every position up to the last needed one, as
  `Reference.visible` says), an input that is a site of a parent variable of the reader's variable
  is a child computed on another row that agrees with the reader's row on that variable (at that
  position for per-position variables), needed there; any other input there is a clean value of
  some other row;

A node at a residual point (``L1.resid_pre``, ``L0.resid_post``: depth 1) stands for every writer
below it: a reader above it reads it plus the writers from its depth up. A subspace node
``site[name]`` (``projectors[site[name]]``: the orthogonal projector P onto its span, in the site's
columns) sets only P's part: the input at that position is ``x + P (x_child - x)``, ``x`` the
position's own source.

It computes each node with ONE plain forward pass of the model, PyTorch hooks overwriting every
input of the node position by position (Python loops) and capturing its site. Roots return logits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from mi_spec.data.positions import resolve_role

HEAD = re.compile(r"^L(\d+)\.H(\d+)$")
PART = re.compile(r"^(L\d+\.H\d+):([qkv])$")
MLP = re.compile(r"^L(\d+)\.mlp_out$")
RESID = re.compile(r"^L(\d+)\.resid_(pre|post)$")
OUT = "<output>"


@dataclass
class Hyp:
    """The hypothesis as plain data: (site, role positions per row or None, variable) nodes."""

    nodes: list[tuple[str, Any, str]]  # role: None, or a function row -> positions
    parents: dict[str, list[str]]
    output: list[str]
    per_position: dict[str, bool]
    values: dict[str, list[Any]]  # variable -> value per dataset row
    n_layers: int
    n_heads: int
    has_mlp: bool
    projectors: dict[str, torch.Tensor] = field(default_factory=dict)  # site[name] -> P
    split: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.split = {m[1] for s, _, _ in self.nodes if (m := PART.match(s))}


def layer(site: str) -> int:
    return -1 if site == "embed" else int(site[1 : site.index(".")])


def depth(site: str) -> int | None:
    m = RESID.match(site)
    return None if m is None else int(m[1]) + (1 if m[2] == "post" else 0)


def plain(site: str) -> str:
    return site.split("[")[0]


def inputs(h: Hyp, site: str) -> list[str]:
    """What ``site`` reads: q/k/v of a split head, else upstream writers cut at the deepest
    residual-point node below the reader."""
    if site in h.split:
        return [f"{site}:{p}" for p in "qkv"]
    points = {depth(plain(s)): plain(s) for s, _, _ in h.nodes if depth(plain(s)) is not None}
    mine = depth(site)
    if mine is not None:
        ups = [w for w in upstream(h, "logits") if layer(w) < mine]
        below = [d for d in points if d < mine]
    else:
        ups = upstream(h, site)
        top = (
            h.n_layers
            if site == "logits"
            else layer(PART.match(site)[1] if PART.match(site) else site)
        )
        below = [d for d in points if d <= top]
    if not below:
        return ups
    cut = max(below)
    return [points[cut]] + [w for w in ups if layer(w) >= cut]


def upstream(h: Hyp, reader: str) -> list[str]:
    writers = ["embed"]
    for lay in range(h.n_layers):
        writers += [f"L{lay}.H{i}" for i in range(h.n_heads)]
        if h.has_mlp:
            writers.append(f"L{lay}.mlp_out")
    if reader == "logits":
        return writers
    if m := PART.match(reader):
        reader = m[1]
    out = [w for w in writers if layer(w) < layer(reader)]
    if MLP.match(reader):
        out += [f"L{layer(reader)}.H{i}" for i in range(h.n_heads)]
    return out


def _module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return dict(model.named_modules())[path]


class Reference:
    def __init__(self, model, bindings, data, params: dict, hyp: Hyp):
        self.model, self.bind, self.data, self.hyp = model, bindings, data, hyp
        self.sites, self.nodes = params["sites"], params["nodes"]
        self.memo: dict[int, torch.Tensor] = {}
        self.clean_cache: dict[int, dict[str, torch.Tensor]] = {}
        self.forwards = 0

    def root_logits(self, k: int) -> torch.Tensor:
        return self.value(k, OUT)

    # --- sources ----------------------------------------------------------------------------
    def clean(self, row: int, site: str) -> torch.Tensor:
        """[T, w] value of ``site`` in a plain forward of dataset row ``row`` (all sites at once)."""
        if row not in self.clean_cache:
            sites = [s for s in self.sites if s != "logits"]
            self.clean_cache[row] = self.forward(row, {}, sites)
        return self.clean_cache[row][site]

    # --- the recursion ----------------------------------------------------------------------
    def visible(self, need: list[int], length: int) -> range:
        """Where a head needed at ``need`` reads its inputs (causal: positions up to max(need))."""
        return range(max(need) + 1)

    def value(self, k: int, var: str) -> torch.Tensor:
        if k in self.memo:
            return self.memo[k]
        sid, row, need, edges = self.nodes[k]
        site = self.sites[sid]
        h = self.hyp
        reads_from = inputs(h, site)
        assert [self.sites[e[0]] for e in edges] == reads_from, (site, edges)
        length = self.data.lengths[row]
        attention = HEAD.match(site) is not None
        edits = {}
        for edge, src_site in zip(edges, reads_from, strict=True):
            _, default, overrides = edge[:3]
            spaces = edge[3] if len(edge) > 3 else []
            src = [default] * length
            for q, s in overrides:
                src[q] = s
            if site in h.split:
                reads = need if src_site.endswith(":q") else self.visible(need, length)
            else:
                reads = self.visible(need, length) if attention else need
            owner = self.check_edge(src_site, var, row, src, list(reads))
            var_of = {-src[q] - 1: owner[q] for q in reads if src[q] < 0}
            edits[src_site] = [
                self.clean(s, src_site)[q] if s >= 0 else self.value(-s - 1, var_of[-s - 1])[q]
                for q, s in enumerate(src)
            ]
            sub_owner = self.check_spaces(src_site, var, row, spaces, list(reads))
            for q, s, sub in spaces:  # x + P (x_child - x) at q
                x = edits[src_site][q]
                child = (
                    self.clean(s, src_site)[q]
                    if s >= 0
                    else self.value(-s - 1, sub_owner[(q, sub)])[q]
                )
                proj = h.projectors[self.sites[sub]].to(x.dtype)
                edits[src_site][q] = x + proj @ (child - x)
        value = self.forward(row, edits, [site])[site]
        self.memo[k] = value
        return value

    def check_edge(self, src_site, var, row, src, reads) -> dict[int, str]:
        """Assert the edge's sources follow the hypothesis; the child's variable per position."""
        h = self.hyp
        parents = h.output if var == OUT else h.parents.get(var, [])
        owner: dict[int, str] = {}
        for s, role, v in h.nodes:
            if s == src_site and v in parents:  # whole-site nodes (subspace nodes: check_spaces)
                for q in range(self.data.lengths[row]) if role is None else role(row):
                    assert q not in owner
                    owner[q] = v
        children: dict[int, list[int]] = {}
        for q in reads:
            if q not in owner:
                assert src[q] >= 0, f"{src_site}@{q}: unnamed input must be a clean row"
                continue
            v = owner[q]
            if src_site == "embed":
                other = src[q]
                assert other >= 0
            else:
                assert src[q] < 0, f"{src_site}@{q}: named input must be a tree node"
                child = self.nodes[-src[q] - 1]
                assert self.sites[child[0]] == src_site
                other = child[1]
                children.setdefault(-src[q] - 1, []).append(q)
            assert other != row, "resampled inputs differ from the reference input"
            mine, theirs = h.values[v][row], h.values[v][other]
            if h.per_position[v]:
                assert mine[q] == theirs[q], (v, q, mine[q], theirs[q])
            else:
                assert mine == theirs, (v, mine, theirs)
        for c, qs in children.items():
            need = self.nodes[c][2]
            if h.per_position[owner[qs[0]]]:
                assert need == qs == [qs[0]], (need, qs)
            else:
                assert need == sorted(qs), (need, qs)
        return owner

    def check_spaces(self, src_site, var, row, spaces, reads) -> dict[tuple[int, int], str]:
        """Assert each subspace source is a child of ``src_site`` agreeing on its node's variable;
        the variable per (position, subspace site)."""
        h = self.hyp
        parents = h.output if var == OUT else h.parents.get(var, [])
        owner: dict[tuple[int, str], str] = {}
        for s, role, v in h.nodes:
            if plain(s) == src_site and s != src_site and v in parents:
                for q in range(self.data.lengths[row]) if role is None else role(row):
                    assert (q, s) not in owner
                    owner[(q, s)] = v
        found = {(q, self.sites[sub]) for q, _, sub in spaces}
        assert found == {k for k in owner if k[0] in reads}, (src_site, found, owner)
        out = {}
        for q, s, sub in spaces:
            v = owner[(q, self.sites[sub])]
            assert s < 0 or src_site == "embed"
            other = self.nodes[-s - 1][1] if s < 0 else s
            if s < 0:
                assert self.sites[self.nodes[-s - 1][0]] == src_site
            assert other != row
            mine, theirs = h.values[v][row], h.values[v][other]
            assert (mine[q] == theirs[q]) if h.per_position[v] else (mine == theirs), (v, q)
            out[(q, sub)] = v
        return out

    # --- one forward --------------------------------------------------------------------------
    def forward(
        self, row: int, edits: dict[str, list[torch.Tensor]], read: list[str]
    ) -> dict[str, torch.Tensor]:
        """Row ``row`` with each site in ``edits`` overwritten (per position); ``read``'s values."""
        self.forwards += 1
        got: dict[str, torch.Tensor] = {}
        handles = []

        def overwrite(act: torch.Tensor, site: str) -> torch.Tensor:
            act = act.clone()
            b = self.bind[site]
            for q, v in enumerate(edits[site]):
                act[0, q, b.start : b.stop] = v
            return act

        def capture(act: torch.Tensor, site: str) -> None:
            b = self.bind[site]
            got[site] = act[0, :, b.start : b.stop].clone()

        for site in set(edits) | (set(read) - {"logits"}):
            b = self.bind[site]
            mod = _module(self.model, b.module)
            if b.io == "output":

                def hook(m, args, out, site=site):
                    t = out if torch.is_tensor(out) else out[0]
                    if site in edits:
                        t = overwrite(t, site)
                    if site in read:
                        capture(t, site)
                    return t if torch.is_tensor(out) else (t, *out[1:])

                handles.append(mod.register_forward_hook(hook))
            else:

                def pre(m, args, site=site):
                    t = args[0]
                    if site in edits:
                        t = overwrite(t, site)
                    if site in read:
                        capture(t, site)
                    return (t, *args[1:])

                handles.append(mod.register_forward_pre_hook(pre))
        ids = torch.tensor([self.data.tokens[row]])
        try:
            with torch.no_grad():
                out = self.model(ids, attention_mask=torch.ones_like(ids))
        finally:
            for handle in handles:
                handle.remove()
        got["logits"] = (out.logits if hasattr(out, "logits") else out)[0]
        return got


def hyp_of(study: Any, variant: dict) -> Hyp:
    """The variant's own hypothesis (its nodes and output, as recorded in the plan)."""
    data, causal = study.data, study.causal
    nodes = []
    for var, text in variant["nodes"]:
        site, _, role = text.partition("@")

        def positions(row, role=role):
            return resolve_role(role, study.positions, data, [row])[0]

        nodes.append((site, positions if role else None, var))
    rows = [causal.compute(data.row(r)) for r in range(len(data))]
    return Hyp(
        nodes=nodes,
        parents={v: causal.parents(v) for v in causal.variables},
        output=variant["output"],
        per_position={v: causal.variables[v].per_position for v in causal.variables},
        values={v: [r[v] for r in rows] for v in causal.variables},
        n_layers=study.dims.n_layers,
        n_heads=study.dims.n_heads,
        has_mlp="L0.mlp_out" in study.vocabulary,
    )
