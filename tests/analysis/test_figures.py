"""Figures come back as decodable PNGs of a sensible size."""

from __future__ import annotations

import io
import math

import matplotlib.image
import numpy as np

from mi_spec.analysis.figures import bars_png, heatmap_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _decode(png: bytes) -> np.ndarray:
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 5_000
    return matplotlib.image.imread(io.BytesIO(png), format="png")


def test_heatmap_annotated_with_ci_and_nan():
    values = np.linspace(-1, 2, 12).reshape(3, 4).tolist()
    values[0][0] = math.nan
    png = heatmap_png(
        values,
        row_labels=["L0", "L1", "L2"],
        col_labels=["tok0", "tok1", "tok2", "tok3"],
        title="Activation patching",
        cbar_label="normalized logit diff",
        ci_halfwidth=[[0.1] * 4 for _ in range(3)],
    )
    img = _decode(png)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[1] > img.shape[0] > 300  # landscape, readable


def test_large_heatmap_is_not_annotated_and_grows():
    rng = np.random.default_rng(0)
    small = _decode(
        heatmap_png(rng.normal(size=(3, 4)).tolist(), list("abc"), list("defg"), "", "")
    )
    rows, cols = [f"L{i}" for i in range(30)], [f"p{j}" for j in range(40)]
    big = _decode(heatmap_png(rng.normal(size=(30, 40)).tolist(), rows, cols, "big", "effect"))
    assert big.shape[0] > small.shape[0] and big.shape[1] > small.shape[1]


def test_bars_with_ci_and_reference_lines():
    png = bars_png(
        labels=["full", "circuit", "ablated"],
        values=[1.0, 0.8, 0.1],
        ci_low=[0.9, 0.7, 0.0],
        ci_high=[1.1, 0.95, 0.2],
        title="Faithfulness",
        ylabel="logit diff",
        reference_lines={"clean": 1.0, "corrupt": 0.0},
    )
    img = _decode(png)
    assert img.shape[1] > 400 and img.shape[0] > 300


def test_bars_tolerate_nan_and_ci_not_around_value():
    img = _decode(bars_png(["a", "b"], [math.nan, 1.0], [0.0, 1.2], [1.0, 1.5], "t", "y"))
    assert img.size > 0
