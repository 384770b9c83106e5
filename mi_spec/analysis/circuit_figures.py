"""Figures of circuit discovery: the circuit as a graph (layers bottom to top, edge width = |score|),
the faithfulness curve with CIs and the chosen size marked, and a heatmap of edge scores.
Headless (Agg, no pyplot)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mi_spec.analysis.figures import _figure, _png, heatmap_png

_PART_RAD = {"q": -0.25, "k": 0.0, "v": 0.25}


def _component(site: str) -> tuple[str, str]:
    """(node, input part) of a sender or receiver: ``L1.H1:k`` -> (``L1.H1``, ``k``)."""
    if ":" in site:
        node, part = site.split(":")
        return node, part
    return site.replace(".mlp_in", ".mlp_out"), ""


def _y(node: str, n_layers: int) -> float:
    if node == "embed":
        return 0.0
    if node == "logits":
        return 2.0 * n_layers + 1
    m = re.match(r"^L(\d+)\.(H\d+|mlp_out)$", node)
    if m is None:
        return 0.0
    return 2.0 * int(m[1]) + (1.0 if m[2].startswith("H") else 2.0)


def circuit_png(
    circuit: Sequence[str], scores: Mapping[str, float], n_layers: int, title: str
) -> bytes:
    """The circuit's components by layer (embed at the bottom, logits on top); an edge per circuit
    edge, width proportional to |score|, labelled with the q/k/v input it enters."""
    pairs = [tuple(e.split("->")) for e in circuit]
    nodes: list[str] = []
    for u, r in pairs:
        nodes += [_component(u)[0], _component(r)[0]]
    nodes = list(dict.fromkeys(nodes)) or ["embed", "logits"]
    rows: dict[float, list[str]] = {}
    for n in sorted(nodes, key=lambda n: (_y(n, n_layers), n)):
        rows.setdefault(_y(n, n_layers), []).append(n)
    pos = {}
    for y, ns in rows.items():
        for i, n in enumerate(ns):
            pos[n] = ((i + 1) / (len(ns) + 1), y)
    widest = max((len(ns) for ns in rows.values()), default=1)
    fig = _figure(width=min(max(5.0, 1.6 * widest + 2), 22.0), height=min(3 + 0.9 * len(rows), 16))
    ax = fig.add_subplot()
    top = max((abs(scores.get(e, 0.0)) for e in circuit), default=1.0) or 1.0
    for e, (u, r) in zip(circuit, pairs, strict=True):
        a, (b, part) = _component(u)[0], _component(r)
        s = scores.get(e, 0.0)
        ax.annotate(
            "", xy=pos[b], xytext=pos[a],
            arrowprops={
                "arrowstyle": "-|>", "lw": 0.6 + 5.0 * abs(s) / top, "alpha": 0.75,
                "color": "#C44E52" if s >= 0 else "#4C72B0", "shrinkA": 14, "shrinkB": 14,
                "connectionstyle": f"arc3,rad={_PART_RAD.get(part, 0.1)}",
            },
        )  # fmt: skip
        if part:  # the q/k/v input, on its arc (q bends left, v right, k straight)
            side = {"q": -1, "k": 0, "v": 1}[part]
            tx = (pos[a][0] + pos[b][0]) / 2 + side * 0.045 * abs(pos[b][1] - pos[a][1]) ** 0.5
            ty = (pos[a][1] + pos[b][1]) / 2 + (0.25 if side == 0 else 0)
            ax.text(tx, ty, part, fontsize=9, color="#333333", ha="center", weight="bold",
                    bbox={"boxstyle": "circle,pad=0.15", "fc": "white", "ec": "none"})  # fmt: skip
    for n, (x, y) in pos.items():
        ax.text(x, y, n, ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round", "fc": "#fdae6b" if n not in ("embed", "logits")
                      else "#d9d9d9", "ec": "black"})  # fmt: skip
    ax.set_xlim(0, 1)
    ys = list(rows)
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    ax.set_yticks(sorted(ys), [_ylabel(y, n_layers) for y in sorted(ys)], fontsize=8)
    ax.set_xticks([])
    ax.set_title(f"{title}\n{len(circuit)} edges (width = |score|; red +, blue −)", fontsize=11)
    return _png(fig)


def _ylabel(y: float, n_layers: int) -> str:
    if y == 0:
        return "embed"
    if y == 2 * n_layers + 1:
        return "logits"
    layer = int((y - 1) // 2)
    return f"L{layer} heads" if y % 2 == 1 else f"L{layer} MLP"


def faithfulness_png(
    sizes: Sequence[int],
    faith: tuple[np.ndarray, np.ndarray, np.ndarray],
    chosen: int,
    target: float,
    n_edges: int,
    title: str,
) -> bytes:
    """Faithfulness (real runs) vs the number of edges kept, with its 95 % CI band (x: symlog)."""
    x = np.asarray(sizes, dtype=float)
    est, low, high = (np.asarray(a, dtype=float) for a in faith)
    fig = _figure(width=7.0, height=4.6)
    ax = fig.add_subplot()
    ax.fill_between(x, low, high, color="#4C72B0", alpha=0.25, lw=0, label="95% CI")
    ax.plot(x, est, "o-", color="#4C72B0", ms=3, lw=1.4, label="faithfulness")
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.axhline(target, color="#55A868", ls="--", lw=1.2, label=f"target {target:g}")
    at = list(sizes).index(chosen)
    ax.axvline(chosen, color="#C44E52", ls="--", lw=1.2, label=f"chosen: {chosen} edges")
    ax.plot([chosen], [est[at]], "o", color="#C44E52", ms=7)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, max(1, n_edges) * 1.05)
    ax.set_xlabel(f"edges kept (of {n_edges}; others ablated)", fontsize=11)
    ax.set_ylabel("faithfulness (metric recovered)", fontsize=11)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def edge_heatmap_png(
    senders: Sequence[str],
    receivers: Sequence[Any],
    edges: Sequence[Sequence[int]],
    scores: np.ndarray,
    title: str,
) -> bytes:
    """Senders x receivers, each cell an edge's score (grey: no edge)."""
    grid = np.full((len(senders), len(receivers)), np.nan)
    for (u, r), s in zip(edges, scores, strict=True):
        grid[u, r] = s
    cols = [r[0] if isinstance(r, (list, tuple)) else str(r) for r in receivers]
    return heatmap_png(grid.tolist(), list(senders), cols, title, "edge score")
