"""Normalised metrics warn when their denominator is near zero: `scrub.loss_recovered`
(÷ loss_random − loss_model) and `effect_norm` (÷ source − clean). A randomly initialised model
barely tells a clean input from a resampled one, so the ratio is noise; a trained model does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mi_spec import api
from mi_spec.experiments.effects import NEAR_ZERO, near_zero_denominator
from mi_spec.tracking.base import InMemoryTracker

ROOT = Path(__file__).resolve().parents[2]
HANDBUILT = ROOT / "hypotheses" / "handbuilt_scrub.yaml"
PATCHING = ROOT / "hypotheses" / "induction_patching.yaml"
RANDOM_HANDBUILT_SHAPE = [  # the hand-built model's shape, random weights
    "model.factory=mi_spec.zoo:attn_only",
    "model.kwargs={n_layers: 2, n_heads: 2, d_model: 32, d_head: 8, n_ctx: 16, d_vocab: 12}",
]
SMALL_SCRUB = [
    "experiments.0.samples=16",
    "experiments.0.seeds=[0]",
    "experiments.0.controls.n_random=0",
    "experiments.0.controls.drop_one=false",
]


def _denominator(warnings: list[str], what: str) -> float:
    """The denominator a warning about ``what`` reports (its first number)."""
    (w,) = [w for w in warnings if w.startswith(what)]
    return float(w.split("the denominator ")[1].split(" ")[0])


def test_rule_on_plain_arrays():
    rng = np.random.default_rng(0)
    b = rng.normal(4.0, 0.5, 400)
    assert near_zero_denominator("r", b + 5.0, b, seed=0) == []  # far from zero
    small = near_zero_denominator("r", b + 0.01, b, seed=0)  # CI excludes 0, but tiny
    assert len(small) == 1 and f"< {NEAR_ZERO:.0%}" in small[0] and "CI contains 0" not in small[0]
    assert _denominator(small, "r") == pytest.approx(0.01, rel=1e-2)
    d = rng.normal(0.0, 1.0, 400)
    both = near_zero_denominator("r", b + d - d.mean(), b, seed=0)  # mean 0, per-row noise
    assert len(both) == 1 and "its CI contains 0" in both[0]
    assert near_zero_denominator("r", b, b, seed=0)  # identical: zero denominator, zero CI


def test_scrub_random_model_warns_and_trained_does_not():
    warn = "scrub.loss_recovered (÷ loss_random − loss_model)"
    random_ = api.run(
        HANDBUILT, InMemoryTracker(), RANDOM_HANDBUILT_SHAPE + SMALL_SCRUB, cache_dir=None,
        runner="synchronous",
    ).reports[0]  # fmt: skip
    m = random_.metrics
    den = m["scrub.loss_random"] - m["scrub.loss_model"]
    assert abs(den) < NEAR_ZERO * m["scrub.loss_model"]  # the premise: a random model
    assert _denominator(random_.warnings, warn) == pytest.approx(den, rel=1e-2, abs=1e-3)
    trained = api.run(
        HANDBUILT, InMemoryTracker(), SMALL_SCRUB, cache_dir=None, runner="synchronous"
    ).reports[0]
    assert trained.metrics["scrub.loss_random"] > 5 > 0.01 > trained.metrics["scrub.loss_model"]
    assert not [w for w in trained.warnings if w.startswith(warn)]


def test_patching_random_model_warns_and_trained_does_not():
    small = ["data.params.n=64"]
    only = ["heads"]
    random_ = api.run(
        PATCHING, InMemoryTracker(), [*small, "model.kwargs.pretrained=false"], cache_dir=None,
        runner="synchronous", only=only,
    ).reports[0]  # fmt: skip
    m = random_.metrics
    den = m["patch.metric.source"] - m["patch.metric.clean"]
    assert _denominator(random_.warnings, "patch.effect_norm") == pytest.approx(den, abs=1e-3)
    trained = api.run(
        PATCHING, InMemoryTracker(), small, cache_dir=None, runner="synchronous", only=only
    ).reports[0]
    assert trained.metrics["patch.metric.source"] > 100 * trained.metrics["patch.metric.clean"]
    assert not [w for w in trained.warnings if w.startswith("patch.effect_norm")]
