"""`mi-spec run` end to end into a temporary MLflow store: runs, params, metrics, artifacts, FAILED."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from mi_spec import api
from mi_spec.cli.main import main
from mi_spec.tracking.mlflow_tracker import MlflowTracker

BODY = """experiments:
  - {kind: activation_patching, name: heads, sites: ['L*.H*'], positions: [mid]}
  - {kind: ablation, name: zero-L1, sites: ['L1.H*'], method: zero}
"""


def _runs(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mi_spec")
    return client, client.search_runs([exp.experiment_id])


def test_run_logs_parent_children_metrics_artifacts(study_file, tracking_uri, capsys):
    path = study_file(BODY, name="tiny-study")
    assert main(["run", str(path), "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "patch.max_effect" in out and "MLflow:" in out
    client, runs = _runs(tracking_uri)
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"tiny-study", "heads@tiny-study", "zero-L1@tiny-study"}
    parent = by_name["tiny-study"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["experiments.0.sites.0"] == "L*.H*"
    assert len(parent.data.params["model.weights_hash"]) == 16
    assert "version.torch" in parent.data.params and "data.hash" in parent.data.params
    child = by_name["heads@tiny-study"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    m = child.data.metrics
    assert (
        m["patch.metric.clean.ci_low"] <= m["patch.metric.clean"] <= m["patch.metric.clean.ci_high"]
    )
    assert len([k for k in m if k.startswith("patch.effect.L")]) == 3 * 8
    # headline copied to the parent as <experiment>/<metric>
    assert parent.data.metrics["heads/patch.max_effect"] == m["patch.max_effect"]
    assert "zero-L1/ablation.max_effect" in parent.data.metrics
    root = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"resolved.yaml", "hypothesis.yaml", "plan.json"} <= root
    files = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"heatmap.png", "effects.csv"} <= files


def test_child_runs_span_the_compute_time(study_file, tracking_uri):
    """Each child run lasts its experiment's compute time (the jobs' seconds), not the logging."""
    given: dict[str, float | None] = {}

    class Recording(MlflowTracker):
        def log_experiment(self, report, compute_s=None):
            given[report.name] = compute_s
            super().log_experiment(report, compute_s)

    tracker = Recording(tracking_uri)
    result = api.run(study_file(BODY, name="timed"), tracker, cache_dir=None, runner="synchronous")
    client = MlflowClient(tracking_uri)
    assert set(tracker.child_run_ids) == {r.name for r in result.reports} == set(given)
    for name, run_id in tracker.child_run_ids.items():
        info = client.get_run(run_id).info
        assert given[name] is not None and given[name] > 0
        assert info.end_time - info.start_time == round(given[name] * 1000)


def test_failed_study_is_marked_failed(study_file, tracking_uri, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("worker died")

    monkeypatch.setattr(api, "run_plan", boom)
    with pytest.raises(RuntimeError):
        api.run(study_file(BODY), MlflowTracker(tracking_uri), cache_dir=None, runner="synchronous")
    _, runs = _runs(tracking_uri)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "worker died" in runs[0].data.tags["mi_spec.error"]


def test_cache_reuses_results(study_file, tracking_uri, tmp_path, monkeypatch):
    from mi_spec.tracking.base import InMemoryTracker

    path = study_file(BODY)
    first = api.run(path, InMemoryTracker(), cache_dir=tmp_path / "cache", runner="synchronous")
    calls = []
    import mi_spec.schedule.synchronous as sync

    original = sync.execute_job
    monkeypatch.setattr(sync, "execute_job", lambda *a: calls.append(1) or original(*a))
    second = api.run(path, InMemoryTracker(), cache_dir=tmp_path / "cache", runner="synchronous")
    assert calls == []
    assert first.reports[0].metrics == second.reports[0].metrics
