"""The hypothesis as a picture (``graph.png``): the high-level causal model with each variable's
sites, and the model nodes it implies with their named edges.

Left: inputs (grey), variables (blue, labelled with their sites) and the output (green), left to
right by depth (each variable as close as possible to what reads it). Right, when the hypothesis
names edges between model nodes: the sites (orange), wired writer -> reader for every named edge
(labelled with the variable that flows), from ``embed`` to ``logits`` by depth in the model.

`draw_graph` is the one drawer of node-and-edge pictures (also for discovered circuits): nodes are
boxes sized to their labels, placed in fixed layers (the same picture for the same hypothesis),
each edge bends just enough to pass around the boxes it does not join, and its label sits where
it covers no box and no other label. Rendered headlessly (Agg, no pyplot); matplotlib and
networkx are imported only when drawing.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mi_spec.analysis.figures import _CHAR_IN, MIN_PT, _figure, _png

if TYPE_CHECKING:
    import networkx as nx
    from matplotlib.axes import Axes
    from matplotlib.transforms import Bbox

OUTPUT = "output"
COLORS = {"input": "#d9d9d9", "variable": "#9ecae1", "output": "#a1d99b", "site": "#fdae6b"}
KIND_NAMES = {
    "input": "input of the causal model",
    "variable": "variable (under it: its model sites)",
    "output": "output / logits",
    "site": "model site",
}
NODE_PT = 10.0  # node labels
NODE_GID = "graph-node"  # the gid of a node's text (its box is the node)
_SITE = re.compile(r"^L(\d+)\.(?:H\d+(?P<part>:[qkv])?|(?P<mlp>mlp_out))")
_RADS = (0.0, 0.2, -0.2, 0.35, -0.35, 0.5, -0.5, 0.7, -0.7)  # arc3 bends tried, in order
_ALONG = (0.5, 0.4, 0.6, 0.3, 0.7, 0.22, 0.78)  # where on an edge its label is tried


@dataclass(frozen=True)
class Edge:
    """An arrow ``source -> target``; ``width`` in points."""

    source: str
    target: str
    label: str = ""
    color: str = "black"
    width: float = 1.2


def causal_panel(
    graph: nx.DiGraph | None, correspondence: Mapping[str, Sequence[str]], output: Sequence[str]
) -> nx.DiGraph:
    """Variables and inputs (from the causal graph) plus the output; with ``label``, ``layer``."""
    import networkx as nx

    g = nx.DiGraph()
    source = graph if graph is not None else nx.DiGraph()
    for n, data in sorted(source.nodes(data=True)):
        kind = "input" if data.get("kind") == "input" else "variable"
        g.add_node(n, kind=kind, label=_with_sites(n, correspondence.get(n, [])))
    g.add_edges_from(sorted(source.edges()))
    for var, sites in sorted(correspondence.items()):
        if var not in g:
            g.add_node(var, kind="variable", label=_with_sites(var, sites))
    g.add_node(OUTPUT, kind="output", label=OUTPUT)
    g.add_edges_from((v, OUTPUT) for v in sorted(output))
    for depth, layer in enumerate(nx.topological_generations(g)):
        for n in layer:
            g.nodes[n]["layer"] = depth
    for n in reversed(list(nx.lexicographical_topological_sort(g))):  # as late as possible
        if g.nodes[n]["kind"] == "variable" and g.out_degree(n):
            g.nodes[n]["layer"] = min(g.nodes[s]["layer"] for s in g.successors(n)) - 1
    return g


def _with_sites(name: str, sites: Sequence[str]) -> str:
    return name if not sites else f"{name}\n" + textwrap.fill(", ".join(sites), 22)


def model_panel(
    correspondence: Mapping[str, Sequence[str]], edges: Sequence[tuple[str, str, str]]
) -> nx.DiGraph:
    """Sites and ``logits``, with (writer, reader, variable) edges; ``label`` and ``layer`` set
    (columns by depth in the model, empty depths skipped)."""
    import networkx as nx

    g = nx.DiGraph()
    names = [s for _, sites in sorted(correspondence.items()) for s in sites] + ["logits"]
    names += [x for w, r, _ in sorted(edges) for x in (w, r)]
    depth = {n: _depth(n) for n in names if n != "logits"}
    depth["logits"] = max(depth.values(), default=0) + 1
    column = {d: i for i, d in enumerate(sorted(set(depth.values())))}
    for n in dict.fromkeys(names):
        g.add_node(n, kind="output" if n == "logits" else "site", label=n, layer=column[depth[n]])
    for w, r, var in sorted(edges):
        if g.has_edge(w, r):  # two variables over one edge: one arrow, both names
            g.edges[w, r]["label"] += f", {var}"
        else:
            g.add_edge(w, r, label=var)
    return g


def _depth(site: str) -> int:
    """embed 0; in layer l: q/k/v inputs 3l+1, heads 3l+2, MLP 3l+3."""
    m = _SITE.match(site)
    if m is None:
        return 0
    return 3 * int(m[1]) + (1 if m["part"] else 3 if m["mlp"] else 2)


def layered_positions(g: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Positions in inches: a column per ``layer``, as wide as its widest ``label``; within a
    column, nodes ordered by the mean height of their predecessors (fewer crossings; ties by
    name) and centred on 0. Deterministic: the same graph gives the same picture."""
    layers: dict[int, list[str]] = {}
    for n in sorted(g.nodes):
        layers.setdefault(g.nodes[n]["layer"], []).append(n)
    lines = {n: str(g.nodes[n].get("label", n)).splitlines() or [""] for n in g.nodes}
    row = 0.24 * max((len(v) for v in lines.values()), default=1) + 0.5
    pos: dict[str, tuple[float, float]] = {}
    x = 0.0
    for layer in sorted(layers):

        def key(n: str) -> tuple[float, str]:
            ys = [pos[p][1] for p in sorted(g.predecessors(n)) if p in pos]
            return (-float(np.mean(ys)) if ys else 0.0, n)

        ordered = sorted(layers[layer], key=key)
        half = max(_CHAR_IN * 1.1 * max(len(s) for s in lines[n]) for n in ordered) / 2 + 0.15
        x += half
        for i, n in enumerate(ordered):
            pos[n] = (x, row * ((len(ordered) - 1) / 2 - i))
        x += half + 0.9  # room between columns for arrows and their labels
    return pos


def hypothesis_graph_png(
    graph: nx.DiGraph | None,
    correspondence: Mapping[str, Sequence[str]],
    output: Sequence[str],
    model_edges: Sequence[tuple[str, str, str]],
    title: str,
) -> bytes:
    """The causal-model panel and, when the hypothesis names model edges, the model panel, with a
    legend of node colours, as PNG bytes."""
    from matplotlib.patches import Patch

    panels = [(causal_panel(graph, correspondence, output), "high-level model")]
    if model_edges:
        panels.append((model_panel(correspondence, model_edges), "model nodes and named edges"))
    layouts = [layered_positions(g) for g, _ in panels]
    sizes = [_panel_size(pos) for pos in layouts]
    fig = _figure(
        width=min(max(sum(w for w, _ in sizes) + 0.5, 7.0), 26.0),
        height=min(max(max(h for _, h in sizes) + 1.6, 4.5), 16.0),
    )
    axes = fig.subplots(1, len(panels), width_ratios=[w for w, _ in sizes], squeeze=False)[0]
    kinds: set[str] = set()
    for ax, (g, name), pos in zip(axes, panels, layouts, strict=True):
        nodes = {n: (d["label"], COLORS[d["kind"]]) for n, d in g.nodes(data=True)}
        edges = [Edge(u, v, d.get("label", "")) for u, v, d in sorted(g.edges(data=True))]
        draw_graph(ax, pos, nodes, edges)
        ax.set_title(name, fontsize=11)
        kinds |= {d["kind"] for _, d in g.nodes(data=True)}
    fig.suptitle(title, fontsize=13)
    handles = [
        Patch(facecolor=COLORS[k], edgecolor="black", label=KIND_NAMES[k])
        for k in COLORS
        if k in kinds
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=MIN_PT,
               frameon=False)  # fmt: skip
    return _png(fig)


def _panel_size(pos: Mapping[str, tuple[float, float]]) -> tuple[float, float]:
    """(width, height) in inches of a panel laid out by `layered_positions`."""
    xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
    return (max(xs) - min(xs) + 2.2, max(ys) - min(ys) + 1.6)


def draw_graph(
    ax: Axes,
    pos: Mapping[str, tuple[float, float]],
    nodes: Mapping[str, tuple[str, str]],
    edges: Sequence[Edge],
    axis_off: bool = True,
    margin: tuple[float, float] = (1.0, 0.7),
) -> None:
    """Nodes (``name -> (label, colour)``) as boxes at ``pos`` (data coordinates) and ``edges`` as
    arrows clipped at the boxes, each bent to avoid the other boxes, labelled at 9 pt where the
    label covers no box and no other label; ``margin``: around the nodes, in data units.
    Deterministic for the same inputs."""
    from matplotlib.patches import FancyArrowPatch

    fig = ax.get_figure()
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    ax.set_xlim(min(xs) - margin[0], max(xs) + margin[0])
    ax.set_ylim(min(ys) - margin[1], max(ys) + margin[1])
    boxes = {}
    for n in sorted(nodes):
        label, color = nodes[n]
        boxes[n] = ax.text(
            *pos[n], label, ha="center", va="center", fontsize=NODE_PT, zorder=2, gid=NODE_GID,
            bbox={"boxstyle": "round,pad=0.35", "fc": color, "ec": "black", "lw": 0.9},
        )  # fmt: skip
    if axis_off:  # a graph: no axes, and no ticks that anything could ever draw
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_axis_off()
    fig.canvas.draw()  # settle the layout: box extents in display coordinates are final
    renderer = fig.canvas.get_renderer()
    extents = {n: t.get_bbox_patch().get_window_extent(renderer) for n, t in boxes.items()}
    taken = [e.padded(2) for e in extents.values()]
    used: dict[tuple[str, str], set[float]] = {}  # bends of parallel edges: each its own
    for e in edges:
        a, b = ax.transData.transform([pos[e.source], pos[e.target]])
        others = [extents[n].padded(10) for n in extents if n not in (e.source, e.target)]
        free = [r for r in _RADS if r not in used.setdefault((e.source, e.target), set())]
        rad = next((r for r in free if not _hits(_arc(a, b, r), others)), free[0])
        used[(e.source, e.target)].add(rad)
        ax.add_patch(FancyArrowPatch(
            pos[e.source], pos[e.target], connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
            mutation_scale=14, lw=e.width, color=e.color, zorder=3, shrinkA=1, shrinkB=1,
            patchA=boxes[e.source].get_bbox_patch(), patchB=boxes[e.target].get_bbox_patch(),
        ))  # fmt: skip
        if e.label:
            taken.append(_edge_label(ax, e.label, _arc(a, b, rad), taken, renderer))


def _arc(a: np.ndarray, b: np.ndarray, rad: float, n: int = 41) -> np.ndarray:
    """Points of matplotlib's ``arc3`` connection from ``a`` to ``b`` (display coordinates)."""
    control = (a + b) / 2 + rad * np.array([b[1] - a[1], a[0] - b[0]])
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * control + t**2 * b


def _hits(points: np.ndarray, boxes: Sequence) -> bool:
    x, y = points[:, 0], points[:, 1]
    return any(
        bool(((box.x0 < x) & (x < box.x1) & (box.y0 < y) & (y < box.y1)).any()) for box in boxes
    )


def _edge_label(ax: Axes, label: str, path: np.ndarray, taken: list, renderer) -> Bbox:
    """Place ``label`` on the path (display coordinates) where it overlaps nothing in ``taken``
    (or, failing that, at the middle); return its extent."""
    from matplotlib.transforms import IdentityTransform

    text = ax.text(0, 0, label, ha="center", va="center", fontsize=MIN_PT, zorder=4,
                   transform=IdentityTransform(),
                   bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.9})  # fmt: skip
    for t in (*_ALONG, _ALONG[0]):
        text.set_position(tuple(path[round(t * (len(path) - 1))]))
        extent = text.get_window_extent(renderer).padded(3)
        if not any(extent.overlaps(o) for o in taken):
            break
    text.set_position(tuple(ax.transData.inverted().transform(text.get_position())))
    text.set_transform(ax.transData)  # placed in display coordinates, kept in data coordinates
    return extent
