"""Small real studies on the bundled induction model, for the tracking and compare tests.

Not collected by pytest (no ``test_`` prefix); imported as ``tracking.studies``.
"""

from __future__ import annotations

from pathlib import Path

from mi_spec import api
from mi_spec.tracking.mlflow_tracker import MlflowTracker

ROOT = Path(__file__).resolve().parents[2]
PATCHING = ROOT / "hypotheses" / "induction_patching.yaml"
SCRUB = ROOT / "hypotheses" / "induction_scrub.yaml"

# ~1 s: 32 rows, three small sweeps (heads at two positions, residual stream, mean ablation)
PATCHING_SMALL = [
    "data.params.n=32",
    "experiments.0.samples=16",
    "experiments.1.samples=16",
    "experiments.2.samples=16",
]
# ~3 s: the standard circuit, 8 samples, 2 random controls (every node dropped in turn as well)
SCRUB_SMALL = ["experiments.0.samples=8", "experiments.0.controls.n_random=2"]

SMALL = {PATCHING: PATCHING_SMALL, SCRUB: SCRUB_SMALL}


# headline metrics each kind of the bundled studies logs (on the child and the parent)
HEADLINE = {
    "activation_patching": ["patch.metric.clean", "patch.metric.source", "patch.max_effect"],
    "ablation": ["ablation.metric.clean", "ablation.max_effect"],
    "causal_scrubbing": [
        "scrub.loss_model",
        "scrub.loss_random",
        "scrub.loss_scrubbed",
        "scrub.loss_recovered",
        "scrub.control.random_mean",
    ],
}


def variant(tmp: Path, name: str = "induction-patching-v2", seed: int = 7) -> Path:
    """A second version of the patching hypothesis: extends it, new name, other data seed."""
    path = tmp / f"{name}.yaml"
    path.write_text(
        f"extends: {PATCHING}\nname: {name}\n"
        f"data:\n  params: {{n: 32, seq_len: 41, seed: {seed}}}\n"
    )
    return path


def run_small(path: Path, uri: str, overrides: list[str] | None = None) -> MlflowTracker:
    """Run a small version of `path` synchronously into the store at `uri`; the tracker used."""
    tracker = MlflowTracker(uri)
    if overrides is None:
        overrides = SMALL.get(path, PATCHING_SMALL[1:])
    api.run(path, tracker, overrides, cache_dir=None, runner="synchronous")
    return tracker
