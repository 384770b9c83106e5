"""The hypothesis as a picture (``graph.png``): the high-level causal model with each variable's
sites, and the model nodes it implies with their named edges.

Left: inputs (grey), variables (blue, labelled with their sites) and the output (green), left to
right by depth (each variable as close as possible to what reads it). Right: the sites, wired
writer -> reader for every named edge (labelled with the variable that flows), from ``embed`` to
``logits`` by depth in the model.
Every node carries its name. Rendered headlessly (Agg, no pyplot).
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence

import networkx as nx

from mi_spec.analysis.figures import _figure, _png

OUTPUT = "output"
COLORS = {"input": "#d9d9d9", "variable": "#9ecae1", "output": "#a1d99b", "site": "#fdae6b"}
_SITE = re.compile(r"^L(\d+)\.(?:H\d+(?P<part>:[qkv])?|(?P<mlp>mlp_out))")


def causal_panel(
    graph: nx.DiGraph | None, correspondence: Mapping[str, Sequence[str]], output: Sequence[str]
) -> nx.DiGraph:
    """Variables and inputs (from the causal graph) plus the output; with ``label``, ``layer``."""
    g = nx.DiGraph()
    source = graph if graph is not None else nx.DiGraph()
    for n, data in source.nodes(data=True):
        kind = "input" if data.get("kind") == "input" else "variable"
        sites = correspondence.get(n, [])
        label = n if not sites else f"{n}\n" + textwrap.fill(", ".join(sites), 18)
        g.add_node(n, kind=kind, label=label)
    g.add_edges_from(source.edges())
    for var, sites in correspondence.items():
        if var not in g:
            g.add_node(var, kind="variable", label=f"{var}\n" + textwrap.fill(", ".join(sites), 18))
    g.add_node(OUTPUT, kind="output", label=OUTPUT)
    g.add_edges_from((v, OUTPUT) for v in output)
    for depth, layer in enumerate(nx.topological_generations(g)):
        for n in layer:
            g.nodes[n]["layer"] = depth
    for n in reversed(list(nx.topological_sort(g))):  # as late as possible: fewer long edges
        if g.nodes[n]["kind"] == "variable" and g.out_degree(n):
            g.nodes[n]["layer"] = min(g.nodes[s]["layer"] for s in g.successors(n)) - 1
    return g


def model_panel(
    correspondence: Mapping[str, Sequence[str]], edges: Sequence[tuple[str, str, str]]
) -> nx.DiGraph:
    """Sites and ``logits``, with (writer, reader, variable) edges; ``label`` and ``layer`` set."""
    g = nx.DiGraph()
    names = [s for sites in correspondence.values() for s in sites] + ["logits"]
    names += [x for w, r, _ in edges for x in (w, r)]
    last = max((_depth(n) for n in names if n != "logits"), default=0) + 1
    for n in dict.fromkeys(names):
        g.add_node(n, kind="output" if n == "logits" else "site", label=n)
        g.nodes[n]["layer"] = last if n == "logits" else _depth(n)
    for w, r, var in edges:
        g.add_edge(w, r, label=var)
    return g


def _depth(site: str) -> int:
    """embed 0; in layer l: q/k/v inputs 3l+1, heads 3l+2, MLP 3l+3."""
    m = _SITE.match(site)
    if m is None:
        return 0
    return 3 * int(m[1]) + (1 if m["part"] else 3 if m["mlp"] else 2)


def hypothesis_graph_png(
    graph: nx.DiGraph | None,
    correspondence: Mapping[str, Sequence[str]],
    output: Sequence[str],
    model_edges: Sequence[tuple[str, str, str]],
    title: str,
) -> bytes:
    """Both panels side by side as PNG bytes."""
    left = causal_panel(graph, correspondence, output)
    right = model_panel(correspondence, model_edges)
    width = 3.0 + 1.4 * (_span(left) + _span(right))
    height = 3.0 + 1.0 * _tallest(left, right)
    fig = _figure(width=min(max(width, 9.0), 24.0), height=min(max(height, 4.5), 14.0))
    panels = ("high-level model", "model nodes and named edges")
    for ax, g, name in zip(fig.subplots(1, 2), (left, right), panels, strict=True):
        _draw(ax, g, name)
    fig.suptitle(title, fontsize=13)
    return _png(fig)


def _span(g: nx.DiGraph) -> int:
    return len({d["layer"] for _, d in g.nodes(data=True)})


def _tallest(*graphs: nx.DiGraph) -> int:
    counts = [Counter(d["layer"] for _, d in g.nodes(data=True)) for g in graphs]
    return max(max(c.values(), default=1) for c in counts)


def _draw(ax, g: nx.DiGraph, title: str) -> None:
    """Nodes in columns by layer; edges bend more the more columns they skip, so as to pass
    around the nodes in between."""
    pos = nx.multipartite_layout(g, subset_key="layer", align="vertical") if len(g) else {}
    colors = [COLORS[d["kind"]] for _, d in g.nodes(data=True)]
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, node_size=2400, edgecolors="black")
    spans: dict[int, list[tuple[str, str]]] = {}
    for u, v in g.edges():
        spans.setdefault(abs(g.nodes[v]["layer"] - g.nodes[u]["layer"]), []).append((u, v))
    for span, edges in spans.items():
        style = f"arc3,rad={0.1 if span <= 1 else 0.3}"
        nx.draw_networkx_edges(
            g, pos, edgelist=edges, ax=ax, arrows=True, arrowstyle="-|>", arrowsize=14,
            node_size=2400, width=1.1, connectionstyle=style,
        )  # fmt: skip
        labels = {(u, v): g.edges[u, v].get("label", "") for u, v in edges}
        if any(labels.values()):
            nx.draw_networkx_edge_labels(
                g, pos, edge_labels=labels, ax=ax, font_size=6, connectionstyle=style
            )
    nx.draw_networkx_labels(
        g, pos, labels={n: d["label"] for n, d in g.nodes(data=True)}, ax=ax, font_size=7
    )
    ax.set_title(title, fontsize=11)
    ax.margins(0.12)
    ax.set_axis_off()
