"""Figures worth keeping: every figure mi_spec draws, from small real runs of the bundled
hypotheses, passes the figure checker (title, axis labels, no text under 9 pt, no overlapping
text, all inside the picture), graph arrows pass around the nodes they do not join, and the same
inputs give the same PNG bytes, in another process and with the graph's inputs in another order.
Plus the pieces: heatmap cell rounding, the checker itself, matplotlib imported only to draw."""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from mi_spec import api
from mi_spec.analysis.figure_check import (
    arrows_through_nodes,
    capture_figures,
    check_figure,
    drawn_texts,
)
from mi_spec.analysis.figures import ZERO_MARK, _figure, bars_png, cell_text, heatmap_png
from mi_spec.analysis.graph_figure import hypothesis_graph_png
from mi_spec.experiments import (
    attribution_report,
    causal_scrubbing,
    causal_tracing,
    das,
    discovery_report,
    effects,
    logit_lens,
    path_patching,
)
from mi_spec.tracking.base import InMemoryTracker

ROOT = Path(__file__).resolve().parents[2]
HYP = ROOT / "hypotheses"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# small real runs of the bundled hypotheses, together drawing every kind of figure (~60 s)
STUDIES = {
    "induction_patching.yaml": ["data.params.n=32"]
    + [f"experiments.{i}.samples=16" for i in range(3)],
    "induction_paths.yaml": ["data.params.n=32", "experiments.0.samples=16"]
    + ["experiments.1.samples=16"],
    "induction_attribution.yaml": ["data.params.n=64", "experiments.0.samples=32"]
    + ["experiments.1.samples=32"],
    "induction_scrub.yaml": ["experiments.0.samples=8", "experiments.0.controls.n_random=2"],
    "induction_das.yaml": ["data.params.n=300", "experiments.0.pairs.train=64"]
    + ["experiments.0.pairs.val=32", "experiments.0.pairs.test=64"]
    + ["experiments.0.training.epochs=2"],
    "induction_discovery.yaml": ["data.params.n=200", "experiments.0.samples=16"]
    + ["experiments.1.samples=16"],
    "induction_logit_lens.yaml": ["data.params.n=32", "experiments.0.samples=16"]
    + ["experiments.1.samples=16"],
    "induction_tracing.yaml": ["data.params.n=16", "experiments.0.samples=8"],
}
DRAWERS = (effects, path_patching, attribution_report, causal_scrubbing, das, discovery_report,
           logit_lens, causal_tracing)  # fmt: skip
KINDS = {"heatmap_png", "scatter_png", "bars_png", "hypothesis_graph_png", "circuit_png",
         "faithfulness_png", "edge_heatmap_png", "_curve", "lens_png", "tracing_png"}  # fmt: skip
CELL = re.compile(rf"^({ZERO_MARK}|0|≈0|-?\d+(\.\d+)?)$")


@pytest.fixture(scope="module")
def drawn():
    """Every drawing call of the studies: (module, function, args, kwargs, png, figure)."""
    calls: list[tuple] = []
    mp = pytest.MonkeyPatch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with capture_figures() as saved:
            for module in DRAWERS:
                for name, fn in list(vars(module).items()):
                    if name in KINDS and callable(fn):
                        mp.setattr(module, name, _recording(fn, calls, saved))
            for file, overrides in STUDIES.items():
                api.run(HYP / file, InMemoryTracker(), overrides, cache_dir=None,
                        runner="synchronous")  # fmt: skip
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return calls


def _recording(fn, calls: list, saved: list):
    def spy(*args, **kwargs):
        png = fn(*args, **kwargs)
        calls.append((fn.__module__, fn.__name__, args, kwargs, png, saved[-1].figure))
        return png

    return spy


def test_every_figure_passes_the_checker(drawn):
    assert {name for _, name, *_ in drawn} == KINDS  # every kind of figure was drawn
    problems = {}
    for module, name, _, _, png, fig in drawn:
        assert png.startswith(PNG_MAGIC)
        image = matplotlib.image.imread(io.BytesIO(png), format="png")
        texts = drawn_texts(fig)
        title = fig.get_suptitle() or fig.axes[0].get_title()
        print(f"{name:22s} {image.shape[1]:5d}x{image.shape[0]:<5d} px {len(texts):3d} texts, "
              f"smallest {min(t.size for t in texts):g} pt  {title.splitlines()[0][:50]}")  # fmt: skip
        found = check_figure(fig)
        if name in ("hypothesis_graph_png", "circuit_png"):
            found += arrows_through_nodes(fig)
        if found:
            problems[f"{module}.{name}: {title.splitlines()[0]}"] = found
    assert not problems, "\n".join(f"{k}:\n  " + "\n  ".join(v) for k, v in problems.items())


def test_same_inputs_same_bytes_in_another_process(drawn, tmp_path):
    """Re-drawn here and in a process with another hash seed (set order), byte for byte."""
    for module, name, args, kwargs, png, _ in drawn[:4]:
        assert getattr(sys.modules[module], name)(*args, **kwargs) == png, name
    calls = [(m, n, a, k) for m, n, a, k, _, _ in drawn]
    (tmp_path / "calls.pkl").write_bytes(pickle.dumps(calls))
    script = (
        "import hashlib, importlib, pickle, sys\n"
        "for m, n, a, k in pickle.load(open(sys.argv[1], 'rb')):\n"
        "    png = getattr(importlib.import_module(m), n)(*a, **k)\n"
        "    print(hashlib.sha256(png).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "calls.pkl")],
                         capture_output=True, text=True, env=env, timeout=300, check=True)  # fmt: skip
    assert out.stdout.split() == [hashlib.sha256(c[4]).hexdigest() for c in drawn]


def test_graph_layout_ignores_input_order(drawn):
    import networkx as nx

    graphs = [c for c in drawn if c[1] == "hypothesis_graph_png"]
    assert len(graphs) == 2  # scrubbing and DAS
    for _, _, (graph, corr, output, edges, title), _, png, _ in graphs:
        shuffled = nx.DiGraph()
        shuffled.add_nodes_from(reversed(list(graph.nodes(data=True))))
        shuffled.add_edges_from(reversed(list(graph.edges())))
        again = {k: list(v) for k, v in reversed(list(corr.items()))}
        assert hypothesis_graph_png(shuffled, again, output[::-1], edges[::-1], title) == png


def test_graphs_name_colours_and_keep_one_panel_without_model_edges(drawn):
    for _, _, args, _, _, fig in (c for c in drawn if c[1] == "hypothesis_graph_png"):
        legend = {t.get_text() for lg in fig.legends for t in lg.get_texts()}
        assert {"input of the causal model", "output / logits"} <= legend
        assert any(s.startswith("variable") for s in legend)
        texts = {t.text for t in drawn_texts(fig)}
        if args[3]:  # scrubbing: named edges between model nodes, each labelled by its variable
            assert len(fig.axes) == 2 and "model site" in legend
            assert {var for _, _, var in args[3]} <= {s for t in texts for s in t.split(", ")}
        else:  # DAS: no model edges, so no panel of unconnected nodes
            assert len(fig.axes) == 1
            site = args[1][next(iter(args[1]))][0]
            assert any(site in t for t in texts)


def test_heatmap_cells_rounded_to_their_ci(drawn):
    """No float noise in a cell; a cell whose CI contains 0 is marked; normalised effects share
    the colour scale [-1, 1]; raw values are symmetric around 0."""
    heatmaps = [c for c in drawn if c[1] == "heatmap_png"]
    assert len(heatmaps) >= 6
    for _, _, args, kwargs, _, fig in heatmaps:
        values, rows, cols, _, what = args[:5]
        ci = args[5] if len(args) > 5 else None
        ax = fig.axes[0]
        cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
                 for t in ax.texts}  # fmt: skip
        v = np.asarray(values, dtype=float)
        low, high = clim = ax.images[0].get_clim()
        assert high == -low > 0
        if what == "normalised effect":
            assert clim == (-1.0, 1.0) and kwargs["vlim"] == 1.0
        else:
            assert high == pytest.approx(np.nanmax(np.abs(v)))
        if len(rows) > 20 or len(cols) > 20:
            continue
        for (r, c), value in np.ndenumerate(v):
            text = cells.get((r, c), "")
            assert CELL.match(text) or (text == "" and math.isnan(value)), text
            if ci is not None and ci[0][r][c] <= 0 <= ci[1][r][c]:
                assert text == ZERO_MARK, (rows[r], cols[c], value)
            elif text not in ("", ZERO_MARK, "0", "≈0"):
                assert float(text) == pytest.approx(value, abs=0.5 * 10 ** -_decimals(text))


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def test_scatter_names_every_point_on_symlog_axes(drawn):
    scatters = [c for c in drawn if c[1] == "scatter_png"]
    assert len(scatters) == 2
    for _, _, args, kwargs, _, fig in scatters:
        x, y, labels = args[:3]
        ax = fig.axes[0]
        assert ax.get_xscale() == ax.get_yscale() == "symlog"
        big = [abs(v) for v in (*x, *y) if abs(v) > 1e-6 * max(map(abs, (*x, *y)))]
        assert ax.xaxis.get_transform().linthresh <= min(big)
        words = " ".join(t.text for t in drawn_texts(fig)).replace("\n", " ")
        assert all(label in words for label in labels)
        degenerate = re.search(r"\[([\d.-]+), ([\d.-]+)\]", args[3])
        if degenerate and degenerate[1] == degenerate[2]:
            assert "degenerate bootstrap" in words and kwargs["notes"]


@pytest.mark.parametrize(
    ("value", "low", "high", "scale", "expected"),
    [
        (0.256, 0.243, 0.271, 0.26, "0.26"),  # half-width 0.014: two decimals
        (10.1, 9.89, 10.3, 10.1, "10.1"),
        (5.04, 4.5, 5.6, 10.1, "5.0"),  # half-width 0.55: tenths
        (5.04, 3.0, 7.0, 10.1, "5"),  # half-width 2: whole units
        (-4.8e-38, -1e-37, 1e-37, 1.0, ZERO_MARK),  # CI contains 0
        (0.0, 0.0, 0.0, 1.0, ZERO_MARK),
        (6.3e-11, math.nan, math.nan, 1.0, "0"),  # no CI: float noise next to 1 is 0
        (4.1e-11, 2e-11, 6e-11, 0.2, "≈0"),  # significant, but nothing at this scale
        (-0.0012, -0.0016, -0.0007, 0.26, "-0.001"),  # resolution: 1% of the scale
        (math.nan, math.nan, math.nan, 1.0, ""),
    ],
)
def test_cell_text(value, low, high, scale, expected):
    assert cell_text(value, low, high, scale) == expected


def test_checker_finds_each_problem():
    fig = _figure(4, 3)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1])
    ax.text(0.5, 0.5, "first", fontsize=12)
    ax.text(0.52, 0.5, "second", fontsize=12)
    ax.text(0.1, 0.9, "tiny", fontsize=6)
    problems = check_figure(fig)
    assert any("no title" in p for p in problems)
    assert any("x tick labels but no x label" in p for p in problems)
    assert any("y tick labels but no y label" in p for p in problems)
    assert any("'tiny' is 6 pt" in p for p in problems)
    assert any("'first' and 'second' overlap" in p for p in problems)
    fine = _figure(4, 3)
    ax = fine.add_subplot()
    ax.plot([0, 1], [0, 1])
    ax.set(xlabel="x", ylabel="y", title="fine")
    assert check_figure(fine) == []


def test_unit_heatmap_and_bars_pass_the_checker():
    with capture_figures() as saved:
        values = np.linspace(-1, 2, 12).reshape(3, 4)
        values[0, 0] = math.nan
        heatmap_png(values.tolist(), ["L0", "L1", "L2"], ["t0", "t1", "t2", "t3"], "patching",
                    "normalised effect", ((values - 0.2).tolist(), (values + 0.2).tolist()),
                    xlabel="position", ylabel="layer", vlim=1.0)  # fmt: skip
        rng = np.random.default_rng(0)
        rows, cols = [f"L{i}" for i in range(30)], [f"p{j}" for j in range(40)]
        heatmap_png(rng.normal(size=(30, 40)).tolist(), rows, cols, "big", "effect",
                    xlabel="position", ylabel="site")  # fmt: skip
        bars_png(["full", "circuit", "ablated"], [1.0, 0.8, math.nan], [0.9, 0.7, 0.0],
                 [1.1, 0.95, 0.2], "faithfulness", "logit diff", {"clean": 1.0, "corrupt": 0.0})  # fmt: skip
    small, big, bars = saved
    for s in saved:
        assert check_figure(s.figure) == []
    assert small.figure.axes[0].images[0].get_clim() == (-1.0, 1.0)
    assert big.figure.get_size_inches()[0] > small.figure.get_size_inches()[0]
    assert bars.png.startswith(PNG_MAGIC)


def test_matplotlib_is_imported_only_to_draw():
    code = (
        "import sys\n"
        "import mi_spec.analysis.figures, mi_spec.analysis.graph_figure\n"
        "import mi_spec.analysis.circuit_figures, mi_spec.analysis.figure_check\n"
        "import mi_spec.experiments.effects, mi_spec.experiments.das\n"
        "import mi_spec.experiments.causal_scrubbing, mi_spec.experiments.attribution_report\n"
        "import mi_spec.experiments.discovery_report, mi_spec.experiments.path_patching\n"
        "import mi_spec.experiments.logit_lens, mi_spec.experiments.causal_tracing\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"
