"""Run a hypothesis from Python (a notebook) and get its results back as pandas tables.

    from mi_spec import notebook

    res = notebook.run("hypotheses/induction_patching.yaml", overrides=["data.params.n=64"])
    res.headline                          # every experiment's headline metrics, with CIs
    res.metrics["activation_patching"]    # all metrics of that kind: one row per experiment+metric
    res.tables["heads"]["effects.csv"]    # an experiment's result table
    res.figures["heads"]["heatmap.png"]   # shows itself in Jupyter; .show(), .to_matplotlib()
    res.run_id                            # the MLflow parent run (None with track=False)

It is `mi_spec.api.run` underneath: the same plan, cache, runners and MLflow logging as
``mi-spec run`` (the default runner here is ``synchronous``: no Dask cluster in the notebook's
process).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mi_spec import api
from mi_spec.analysis.report import ExperimentReport
from mi_spec.plan.ir import Plan
from mi_spec.schedule.profiles import RunnerProfile
from mi_spec.schedule.progress import Console
from mi_spec.spec.load import dump_yaml
from mi_spec.tracking.base import InMemoryTracker, Tracker
from mi_spec.tracking.mlflow_tracker import CI_SUFFIXES, MlflowTracker, experiment_label

METRIC_COLUMNS = ["estimate", "ci_low", "ci_high", "headline"]


@dataclass(frozen=True)
class Figure:
    """A figure as analysis rendered it (PNG bytes). Jupyter shows it inline (``_repr_png_``)."""

    name: str
    png: bytes

    def _repr_png_(self) -> bytes:
        return self.png

    def pixels(self) -> Any:
        """The image as an array (height, width, RGBA in [0, 1])."""
        from matplotlib.image import imread

        return imread(io.BytesIO(self.png), format="png")

    def to_matplotlib(self, dpi: float = 100.0) -> Any:
        """A ``matplotlib.figure.Figure`` showing the image at its pixel size (at `dpi`)."""
        from matplotlib.figure import Figure as MplFigure

        pixels = self.pixels()
        height, width = pixels.shape[:2]
        fig = MplFigure(figsize=(width / dpi, height / dpi), dpi=dpi)
        fig.figimage(pixels)
        return fig

    def show(self) -> None:
        """Display it: inline in IPython/Jupyter, else in a matplotlib window."""
        try:
            from IPython import get_ipython
            from IPython.display import display

            if get_ipython() is not None:
                display(self)
                return
        except ImportError:
            pass
        import matplotlib.pyplot as plt

        pixels = self.pixels()
        plt.figure(figsize=(pixels.shape[1] / 100, pixels.shape[0] / 100), dpi=100).figimage(pixels)
        plt.show()

    def save(self, path: str | Path) -> Path:
        """Write the PNG to `path`; returns it."""
        out = Path(path)
        out.write_bytes(self.png)
        return out


@dataclass
class Results:
    """One study's results. Experiments are keyed by their label (``heads``, not
    ``heads@induction-patching``).

    `metrics`: kind -> DataFrame indexed by (experiment, metric) with columns estimate, ci_low,
    ci_high (NaN when the metric has no CI) and headline (bool). `headline`: the headline rows of
    every kind, indexed by (experiment, metric), with a kind column. `tables`: experiment ->
    table name -> DataFrame. `figures`: experiment -> file name -> `Figure`. `run_id`: the MLflow
    parent run, `child_run_ids`: experiment -> child run (both empty/None with ``track=False``).
    """

    hypothesis: str
    plan: Plan
    reports: dict[str, ExperimentReport]
    metrics: dict[str, pd.DataFrame]
    headline: pd.DataFrame
    tables: dict[str, dict[str, pd.DataFrame]]
    figures: dict[str, dict[str, Figure]]
    run_id: str | None = None
    child_run_ids: dict[str, str] = field(default_factory=dict)
    tracking_uri: str | None = None
    run_url: str | None = None

    def __repr__(self) -> str:
        kinds = ", ".join(f"{k} ({len(df.index.unique(0))})" for k, df in self.metrics.items())
        return f"Results({self.hypothesis!r}: {kinds}; MLflow run {self.run_id})"


def run(
    hypothesis: str | Path | Mapping[str, Any],
    *,
    overrides: Sequence[str] = (),
    only: Sequence[str] | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    track: bool = True,
    runner: RunnerProfile | str = "synchronous",
    scheduler: str | None = None,
    cache_dir: str | Path | None = api.DEFAULT_CACHE,
    base_dir: str | Path | None = None,
    quiet: bool = False,
) -> Results:
    """Run every experiment of `hypothesis` and return its results as tables.

    `hypothesis` is a file path or the spec as a dict (what the YAML would hold). A dict is
    written to a hidden file in `base_dir` (default: the current directory) for the run and
    removed afterwards, so relative paths in it (``extends``, data files, checkpoints) are
    relative to `base_dir`. `overrides` are ``--set`` items (``"data.params.n=64"``), `only` the
    experiments to run (``--only``); `quiet` keeps the stage lines off stderr. The study
    is logged to MLflow like ``mi-spec run`` (`tracking_uri`, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db``; `experiment`, else ``$MLFLOW_EXPERIMENT_NAME``, else ``mi_spec``),
    or not at all with ``track=False``. Errors are the CLI's: `SpecError` with file:line:col.
    """
    tracker: Tracker = MlflowTracker(tracking_uri, experiment) if track else InMemoryTracker()
    console = Console(verbosity="quiet" if quiet else "normal")

    def run_file(path: str | Path) -> api.RunResult:
        return api.run(
            path, tracker, overrides, cache_dir, runner, scheduler, console=console, only=only
        )

    if isinstance(hypothesis, str | Path):
        result = run_file(hypothesis)
    else:
        folder = Path(base_dir) if base_dir is not None else Path.cwd()
        fd, name = tempfile.mkstemp(prefix=".mi_spec_notebook_", suffix=".yaml", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(dump_yaml(dict(hypothesis)))
            result = run_file(name)
        finally:
            Path(name).unlink(missing_ok=True)
    return results_of(result, tracker)


def results_of(result: api.RunResult, tracker: Tracker | None = None) -> Results:
    """`Results` from what `mi_spec.api.run` returned (and the tracker it logged to)."""
    hypothesis = result.plan.hypothesis
    reports = {experiment_label(r.name, hypothesis): r for r in result.reports}
    by_kind: dict[str, list[pd.DataFrame]] = {}
    for label, report in reports.items():
        by_kind.setdefault(report.kind, []).append(metrics_frame(label, report))
    metrics = {kind: pd.concat(frames) for kind, frames in by_kind.items()}
    headline = [df[df.headline].assign(kind=kind) for kind, df in metrics.items()]
    children = getattr(tracker, "child_run_ids", {})
    return Results(
        hypothesis=hypothesis,
        plan=result.plan,
        reports=reports,
        metrics=metrics,
        headline=pd.concat(headline)[["kind", "estimate", "ci_low", "ci_high"]]
        if headline
        else pd.DataFrame(columns=["kind", "estimate", "ci_low", "ci_high"]),
        tables={
            label: {n: pd.DataFrame.from_records(rows) for n, rows in r.tables.items()}
            for label, r in reports.items()
        },
        figures={
            label: {n: Figure(n, png) for n, png in r.figures.items()}
            for label, r in reports.items()
        },
        run_id=getattr(tracker, "parent_run_id", None),
        child_run_ids={experiment_label(n, hypothesis): i for n, i in children.items()},
        tracking_uri=getattr(tracker, "tracking_uri", None),
        run_url=result.run_url,
    )


def metrics_frame(experiment: str, report: ExperimentReport) -> pd.DataFrame:
    """One experiment's metrics: index (experiment, metric); estimate, ci_low, ci_high, headline.

    A metric's CI is its ``<name>.ci_low`` / ``<name>.ci_high`` companions (NaN when absent).
    """
    m = report.metrics
    names = [k for k in m if not k.endswith(CI_SUFFIXES)]
    rows = [
        (m[k], m.get(f"{k}.ci_low", float("nan")), m.get(f"{k}.ci_high", float("nan")))
        for k in names
    ]
    index = pd.MultiIndex.from_tuples(
        [(experiment, k) for k in names], names=["experiment", "metric"]
    )
    frame = pd.DataFrame(rows, index=index, columns=METRIC_COLUMNS[:3], dtype=float)
    frame["headline"] = [k in report.headline for k in names]
    return frame
