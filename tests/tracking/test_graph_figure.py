"""The hypothesis picture (``graph.png``) logged by causal scrubbing names every node of the
hypothesis: each variable and input of the causal model, each site of the correspondence, the
output and ``logits``; and every name is drawn inside the picture."""

from __future__ import annotations

import pytest
from matplotlib.text import Text
from tracking.studies import SCRUB, SCRUB_SMALL

from mi_spec import api
from mi_spec.analysis import graph_figure
from mi_spec.tracking.base import InMemoryTracker


@pytest.fixture(scope="module")
def drawn():
    """(study, the report's graph.png, the texts drawn in that figure with their boxes)."""
    captured = []
    original = graph_figure._png

    def spy(fig):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        captured.append((fig.bbox, [(t.get_text(), t.get_window_extent(renderer)) for t in texts]))
        png = original(fig)
        captured[-1] += (png,)
        return png

    mp = pytest.MonkeyPatch()
    mp.setattr(graph_figure, "_png", spy)
    try:
        tracker = InMemoryTracker()
        api.run(SCRUB, tracker, SCRUB_SMALL, cache_dir=None, runner="synchronous")
    finally:
        mp.undo()
    study, _ = api.compile_file(SCRUB, SCRUB_SMALL)
    (report,) = tracker.reports
    (fig_box, texts, png) = captured[0]
    assert len(captured) == 1 and report.figures["graph.png"] == png
    return study, texts, fig_box


def test_every_hypothesis_node_is_named(drawn):
    study, texts, _ = drawn
    lines = [line for text, _ in texts for line in text.splitlines()]
    first_lines = {text.splitlines()[0] for text, _ in texts}
    nodes = set(study.causal.graph.nodes)
    assert {"tok", "prev", "ind_q", "ind_k", "ind_v", "copied", "tokens"} <= nodes
    assert nodes | {"output"} <= first_lines  # each causal-model node labelled by its name
    sites = {s for group in study.spec.correspondence.values() for s in group}
    assert sites == {"embed", "L0.H2", "L1.H1:q", "L1.H1:k", "L1.H1:v", "L1.H1"}
    whole = {text for text, _ in texts}
    assert sites | {"logits"} <= whole  # each model node, as a node of its own
    for var, group in study.spec.correspondence.items():  # and under its variable
        label = next(text for text, _ in texts if text.splitlines()[0] == var)
        assert all(s in label.replace("\n", " ") for s in group), (var, label)
    assert "induction-scrub" in " ".join(lines)  # the title names the hypothesis


def test_every_name_is_inside_the_picture(drawn):
    _, texts, fig_box = drawn
    for text, box in texts:
        assert fig_box.x0 - 1 <= box.x0 and box.x1 <= fig_box.x1 + 1, text
        assert fig_box.y0 - 1 <= box.y0 and box.y1 <= fig_box.y1 + 1, text
