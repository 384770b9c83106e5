"""Figures of circuit discovery: the circuit as a graph (layers bottom to top, edge width = |score|),
the faithfulness curve with CIs and the chosen size marked, and a heatmap of edge scores.
Headless (Agg, no pyplot)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mi_spec.analysis.figures import MIN_PT, _figure, _png, heatmap_png
from mi_spec.analysis.graph_figure import Edge, draw_graph


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
    nodes = sorted(set(nodes)) or ["embed", "logits"]
    rows: dict[float, list[str]] = {}
    for n in sorted(nodes, key=lambda n: (_y(n, n_layers), n)):
        rows.setdefault(_y(n, n_layers), []).append(n)
    widest = max((len(ns) for ns in rows.values()), default=1)
    pos = {
        n: (i - (len(ns) - 1) / 2, float(rank))
        for rank, (_, ns) in enumerate(sorted(rows.items()))
        for i, n in enumerate(ns)
    }
    fig = _figure(
        width=min(max(5.5, 1.9 * widest + 2.5), 22.0), height=min(3 + 1.1 * len(rows), 16)
    )
    ax = fig.add_subplot()
    top = max((abs(scores.get(e, 0.0)) for e in circuit), default=1.0) or 1.0
    edges = [
        Edge(_component(u)[0], _component(r)[0], _component(r)[1],
             "#C44E52" if scores.get(e, 0.0) >= 0 else "#4C72B0",
             0.8 + 4.0 * abs(scores.get(e, 0.0)) / top)
        for e, (u, r) in sorted(zip(circuit, pairs, strict=True))
    ]  # fmt: skip
    colors = {n: "#d9d9d9" if n in ("embed", "logits") else "#fdae6b" for n in pos}
    ax.set_yticks(range(len(rows)), [_ylabel(y, n_layers) for y in sorted(rows)])
    ax.tick_params(labelsize=MIN_PT, left=False)
    ax.set_xticks([])
    ax.set_ylabel("depth in the model", fontsize=11)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    draw_graph(ax, pos, {n: (n, colors[n]) for n in pos}, edges, False, (0.8, 0.6))
    fig.suptitle(title, fontsize=12)
    ax.set_title(
        f"{len(circuit)} edges; width = |score|, red +, blue −; label: the q/k/v input entered",
        fontsize=MIN_PT,
    )
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
    ax.tick_params(labelsize=MIN_PT)
    ax.legend(fontsize=MIN_PT, loc="lower right")
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
    return heatmap_png(
        grid.tolist(), list(senders), cols, title, "edge score", nan_means="not an edge",
        xlabel="receiver (q/k/v: the head input entered)", ylabel="sender",
    )  # fmt: skip
