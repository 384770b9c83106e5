"""Checks that a figure is worth keeping, from its matplotlib objects (used by the tests).

`check_figure` draws the figure as it will be saved and lists what is wrong: no title; an axes
whose tick labels are shown without an axis label (axis-less axes, such as graphs, need none);
text smaller than `MIN_PT` points at the saved size; two texts overlapping (their boxes,
background boxes included, by the renderer); text outside the figure. `capture_figures` records
every figure saved while it is active, with its PNG bytes, so that a real run's figures can be
checked and compared across runs (identical bytes for identical inputs).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING

import numpy as np

from mi_spec.analysis.figures import MIN_PT
from mi_spec.analysis.graph_figure import NODE_GID

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

OVERLAP_PX = 1.0  # boxes sharing less than this (in both directions) merely touch


@dataclass(frozen=True)
class DrawnText:
    """A text as drawn: its string, size in points and box in display pixels."""

    text: str
    size: float
    box: Bbox


@dataclass(frozen=True)
class SavedFigure:
    """A figure saved while `capture_figures` was active, and the bytes it was saved as."""

    figure: Figure
    png: bytes


def drawn_texts(fig: Figure) -> list[DrawnText]:
    """Every non-empty text the renderer draws (tick labels of hidden axes excluded), with its box
    (the text's own, joined with its background box if it has one; not an annotation's arrow)."""
    from matplotlib.text import Text

    found: list[DrawnText] = []
    original = Text.draw

    def spy(self: Text, renderer) -> None:  # noqa: ANN001
        original(self, renderer)
        if not (self.get_visible() and self.get_text().strip()):
            return
        box = Text.get_window_extent(self, renderer)
        patch = self.get_bbox_patch()
        if patch is not None:
            box = type(box).union([box, patch.get_window_extent(renderer)])
        found.append(DrawnText(self.get_text(), float(self.get_fontsize()), box))

    Text.draw = spy
    try:
        fig.canvas.draw()
    finally:
        Text.draw = original
    return found


def check_figure(fig: Figure, min_pt: float = MIN_PT) -> list[str]:
    """What is wrong with ``fig`` as saved at its own dpi (empty: nothing)."""
    texts = drawn_texts(fig)
    problems = []
    titles = [fig.get_suptitle()] + [
        ax.get_title(loc) for ax in fig.axes for loc in ("center", "left", "right")
    ]
    if not any(t.strip() for t in titles):
        problems.append("no title (neither the figure's nor an axes')")
    for i, ax in enumerate(fig.axes):
        if not ax.axison:
            continue
        for name, axis, label in (
            ("x", ax.xaxis, ax.get_xlabel()),
            ("y", ax.yaxis, ax.get_ylabel()),
        ):
            shown = axis.get_visible() and any(t.get_text() for t in axis.get_ticklabels())
            if shown and not label.strip():
                problems.append(
                    f"axes {i} ({ax.get_title()!r}): {name} tick labels but no {name} label"
                )
    small = sorted({(t.size, t.text) for t in texts if t.size < min_pt - 1e-9})
    problems += [f"text {s!r} is {pt:g} pt (< {min_pt:g})" for pt, s in small]
    frame = fig.bbox.padded(1)
    problems += [
        f"text {t.text!r} reaches outside the figure"
        for t in texts
        if not (frame.x0 <= t.box.x0 and t.box.x1 <= frame.x1)
        or not (frame.y0 <= t.box.y0 and t.box.y1 <= frame.y1)
    ]
    for a, b in combinations(texts, 2):
        w = min(a.box.x1, b.box.x1) - max(a.box.x0, b.box.x0)
        h = min(a.box.y1, b.box.y1) - max(a.box.y0, b.box.y0)
        if w > OVERLAP_PX and h > OVERLAP_PX:
            problems.append(f"texts {a.text!r} and {b.text!r} overlap ({w:.0f} x {h:.0f} px)")
    return problems


def arrows_through_nodes(fig: Figure, gid: str = NODE_GID) -> list[str]:
    """Graph arrows that pass through a node box (texts with ``gid``) other than at their ends:
    arrows are clipped at the boxes they join, so no point of one may lie inside any box."""
    from matplotlib.patches import FancyArrowPatch
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    nodes = [
        (t.get_text().splitlines()[0], t.get_bbox_patch().get_window_extent(renderer).padded(-3))
        for t in fig.findobj(Text)
        if t.get_gid() == gid and t.get_bbox_patch() is not None
    ]
    problems = []
    for arrow in fig.findobj(FancyArrowPatch):
        path = arrow.get_transform().transform_path(arrow.get_path())
        points = np.concatenate(path.to_polygons(closed_only=False) or [np.empty((0, 2))])
        for name, box in nodes:
            inside = (box.x0 < points[:, 0]) & (points[:, 0] < box.x1)
            if (inside & (box.y0 < points[:, 1]) & (points[:, 1] < box.y1)).any():
                problems.append(f"an arrow passes through node {name!r}")
    return problems


@contextmanager
def capture_figures() -> Iterator[list[SavedFigure]]:
    """Record every matplotlib figure saved (to a buffer) inside the block, with its bytes."""
    from matplotlib.figure import Figure

    saved: list[SavedFigure] = []
    original = Figure.savefig

    def spy(self: Figure, fname, *args, **kwargs) -> None:  # noqa: ANN001
        original(self, fname, *args, **kwargs)
        if isinstance(fname, io.BytesIO):
            saved.append(SavedFigure(self, fname.getvalue()))

    Figure.savefig = spy
    try:
        yield saved
    finally:
        Figure.savefig = original
