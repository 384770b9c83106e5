"""MlflowTracker against a throwaway sqlite store (never the user's)."""

from __future__ import annotations

import json
import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from mi_spec.analysis.report import ExperimentReport, StudyRecord
from mi_spec.errors import MiSpecError
from mi_spec.tracking.base import InMemoryTracker, flatten_params, tracking
from mi_spec.tracking.mlflow_tracker import (
    MlflowTracker,
    experiment_label,
    mlflow_key,
    resolve_experiment,
    resolve_tracking_uri,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


DESCRIPTION = "Which heads carry induction? Patching every head of the 2-layer model."


def _study(name: str = "induction") -> StudyRecord:
    return StudyRecord(
        name=name,
        params={
            "description": DESCRIPTION,
            "model": {"name": "tiny"},
            "experiments": [{"samples": 8}],
            "seed": 0,
        },
        tags={"mi_spec.version": "0.1.0"},
        artifacts={"resolved.yaml": "name: induction\n", "plan.json": "{}"},
    )


def _report(name: str, kind: str = "activation_patching", effect: float = 0.5) -> ExperimentReport:
    return ExperimentReport(
        name=name,
        kind=kind,
        metrics={"patch.max_effect": effect, "patch.max_effect.ci_low": effect - 0.1},
        headline={"patch.max_effect": effect},
        params={"samples": 8, "sites": ["L0.attn", "L1.attn"]},
        tables={"effects.csv": [{"site": "L0", "effect": 0.1}, {"site": "L1", "effect": effect}]},
        figures={"heatmap.png": PNG},
        warnings=["few samples"],
    )


@pytest.fixture
def uri(tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)  # anything relative lands in tmp, never the user's cwd
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path}/m.db"


COMPUTE_S = 2.5  # the compute time given for the "residual" experiment


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> tuple[MlflowClient, MlflowTracker]:
    """A study with two same-kind experiments, then v2 of it with one, in one store."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/m.db"
    tracker = MlflowTracker(uri, experiment="test")
    with tracking(tracker, _study()):
        tracker.log_experiment(_report("heads@induction", effect=0.5))
        tracker.log_experiment(_report("residual@induction", effect=0.7), compute_s=COMPUTE_S)
    v2 = MlflowTracker(uri, experiment="test")
    with tracking(v2, _study("induction-v2")):
        v2.log_experiment(_report("heads@induction-v2", effect=0.6))
    return MlflowClient(uri), tracker


def _runs(client: MlflowClient, tracker: MlflowTracker):
    runs = client.search_runs([tracker.experiment_id])
    return {r.info.run_name: r for r in runs}


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id, path)}


def test_parent_and_children_finished_with_names_and_params(logged):
    client, tracker = logged
    runs = _runs(client, tracker)
    assert set(runs) == {
        "induction",
        "heads@induction",
        "residual@induction",
        "induction-v2",
        "heads@induction-v2",
    }
    parent = runs["induction"]
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert parent.data.params["model.name"] == "tiny"
    assert parent.data.params["experiments.0.samples"] == "8"
    assert parent.data.tags["mi_spec.version"] == "0.1.0"
    child = runs["heads@induction"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["mi_spec.kind"] == "activation_patching"
    assert child.data.tags["mi_spec.warnings"] == "1"
    assert child.data.params["sites.1"] == "L1.attn"
    assert child.data.metrics == {"patch.max_effect": 0.5, "patch.max_effect.ci_low": 0.4}


def test_parent_metrics_are_named_by_experiment_the_same_across_hypotheses(logged):
    client, tracker = logged
    runs = _runs(client, tracker)
    parent = runs["induction"]
    assert parent.info.run_id == tracker.parent_run_id
    assert parent.data.metrics == {"heads/patch.max_effect": 0.5, "residual/patch.max_effect": 0.7}
    # v2's "heads" lands on the same key as v1's: one chart in the MLflow UI
    assert runs["induction-v2"].data.metrics == {"heads/patch.max_effect": 0.6}


def test_description_is_the_parent_runs_note(logged):
    client, tracker = logged
    runs = _runs(client, tracker)
    assert runs["induction"].data.tags["mlflow.note.content"] == DESCRIPTION
    assert "mlflow.note.content" not in runs["heads@induction"].data.tags


def test_child_run_spans_the_compute_time(logged):
    client, tracker = logged
    runs = _runs(client, tracker)
    timed, untimed = runs["residual@induction"].info, runs["heads@induction"].info
    assert timed.end_time - timed.start_time == COMPUTE_S * 1000
    assert timed.start_time < untimed.end_time  # it reaches back before the earlier child ended
    assert 0 <= untimed.end_time - untimed.start_time < COMPUTE_S * 1000  # just the logging


def test_tables_are_logged_as_mlflow_tables(logged):
    client, tracker = logged
    runs = _runs(client, tracker)
    child = runs["heads@induction"]
    assert json.loads(child.data.tags["mlflow.loggedArtifacts"]) == [
        {"path": "effects.json", "type": "table"}
    ]
    for name, effect in (("heads@induction", 0.5), ("heads@induction-v2", 0.6)):
        path = client.download_artifacts(runs[name].info.run_id, "effects.json")
        with open(path) as f:  # what log_table writes: pandas' "split" layout
            table = json.load(f)
        assert table["columns"] == ["site", "effect"]
        assert table["data"] == [["L0", 0.1], ["L1", effect]]


def test_experiment_label_and_name_precedence(monkeypatch):
    assert experiment_label("heads@induction", "induction") == "heads"
    assert experiment_label("heads@induction#2", "induction") == "heads#2"
    assert experiment_label("heads@other", "induction") == "heads@other"
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert (
        resolve_experiment() == "mi_spec"
        and MlflowTracker("sqlite:///x.db").experiment == "mi_spec"
    )
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "induction-study")
    assert MlflowTracker("sqlite:///x.db").experiment == "induction-study"
    assert resolve_experiment("explicit") == "explicit"


def test_artifacts(logged):
    client, tracker = logged
    runs = _runs(client, tracker)
    parent, child = runs["induction"].info.run_id, runs["heads@induction"].info.run_id
    assert {"resolved.yaml", "plan.json", "heads", "residual"} <= _artifacts(client, parent)
    assert _artifacts(client, parent, "heads") == {"heads/heatmap.png"}
    assert _artifacts(client, child) == {
        "effects.csv",
        "effects.json",
        "heatmap.png",
        "warnings.txt",
    }
    csv_path = client.download_artifacts(child, "effects.csv")
    with open(csv_path) as f:
        assert f.read() == "site,effect\nL0,0.1\nL1,0.5\n"


def test_run_url_for_sqlite_names_the_ui_command(logged):
    _, tracker = logged
    url = tracker.run_url()
    assert url is not None and url.startswith("mi-spec ui --tracking-uri sqlite:///")
    assert "--experiment test  # then open http://127.0.0.1:5000/" in url
    assert f"#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning" in url


def test_run_url_for_http():
    tracker = MlflowTracker("http://mlflow.example:5000/")
    assert tracker.run_url() is None
    tracker.experiment_id = "7"
    assert tracker.run_url() == (
        "http://mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning"
    )


def test_failure_inside_tracking_marks_parent_failed(uri):
    tracker = MlflowTracker(uri)
    with pytest.raises(ValueError, match="boom"), tracking(tracker, _study("bad")):
        tracker.log_experiment(_report("ok@1"))
        raise ValueError("boom")
    client = MlflowClient(uri)
    parent = client.get_run(tracker_parent_id(client, tracker, "bad"))
    assert parent.info.status == "FAILED"
    assert parent.data.tags["mi_spec.error"] == "ValueError: boom"
    assert "error.txt" in _artifacts(client, parent.info.run_id)
    assert {r.info.status for r in client.search_runs([tracker.experiment_id])} == {
        "FINISHED",
        "FAILED",
    }


def test_failure_while_logging_a_child_leaves_nothing_running(uri):
    tracker = MlflowTracker(uri)
    bad = _report("bad@1")
    bad.metrics = {"patch.x": "not a number"}  # type: ignore[dict-item]
    with pytest.raises(ValueError), tracking(tracker, _study()):
        tracker.log_experiment(bad)
    runs = MlflowClient(uri).search_runs([tracker.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]


def tracker_parent_id(client: MlflowClient, tracker: MlflowTracker, name: str) -> str:
    (run,) = client.search_runs([tracker.experiment_id], f"attributes.run_name = '{name}'")
    return run.info.run_id


def test_unreachable_sqlite_store_is_a_mispec_error(tmp_path):
    # MLflow creates missing parent folders (and we may run as root), so block the path with a file.
    (tmp_path / "blocker").write_text("")
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/blocker/x/y.db")
    with pytest.raises(MiSpecError, match="blocker"), tracking(tracker, _study()):
        pytest.fail("the body must not run")


def test_unreachable_http_store_fails_fast(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(MiSpecError, match=f"127.0.0.1:{port}"):
        MlflowTracker(f"http://127.0.0.1:{port}").start(_study())
    assert time.monotonic() - t0 < 10


def test_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri() == "http://env:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert MlflowTracker().tracking_uri == "http://env:5000"


def test_many_params_are_batched(uri):
    tracker = MlflowTracker(uri)
    study = _study()
    study.params = {f"p{i}": i for i in range(250)}
    with tracking(tracker, study):
        pass
    run = MlflowClient(uri).get_run(tracker_parent_id(MlflowClient(uri), tracker, "induction"))
    assert len(run.data.params) == 250


def test_mlflow_key_sanitizes():
    assert mlflow_key("a@b/../c//d") == "a_b/c/d"
    assert mlflow_key("x" * 300) == "x" * 250


def test_flatten_params():
    flat = flatten_params({"a": {"b": [1, {"c": None}], "e": {}}, "l": [], "s": "x" * 600})
    assert flat["a.b.0"] == "1"
    assert flat["a.b.1.c"] == "None"
    assert flat["a.e"] == "{}" and flat["l"] == "[]"
    assert len(flat["s"]) == 500 and flat["s"].endswith("…")
    assert flatten_params({"k": 1}, prefix="spec") == {"spec.k": "1"}


def test_tracking_with_in_memory_tracker():
    ok = InMemoryTracker()
    with tracking(ok, _study()) as t:
        t.log_experiment(_report("r@1"))
    assert ok.status == "FINISHED" and ok.report("r@1").kind == "activation_patching"

    interrupted = InMemoryTracker()
    with pytest.raises(KeyboardInterrupt), tracking(interrupted, _study()):
        raise KeyboardInterrupt
    assert interrupted.status == "FAILED" and interrupted.error == "KeyboardInterrupt: "
