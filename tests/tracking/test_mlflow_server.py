"""End to end against a real ``mlflow server`` on loopback: a study logged over REST (runs,
params, metrics, tags, dataset input, artifacts through the server's artifact proxy), read back
over REST, listed by ``mi-spec compare``; ``mi-spec ui`` on it just prints the URL; a crash over
REST leaves the run FAILED.

Skipped (with the reason) only when the ``mlflow server`` process cannot start at all. Its start
is polled for up to ``procs.START_S`` s (slow on a loaded machine); it is always stopped.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import procs
import pytest
import requests
from mlflow.tracking import MlflowClient
from tracking.studies import PATCHING, PATCHING_SMALL

from mi_spec import api
from mi_spec.cli.main import main
from mi_spec.tracking.mlflow_tracker import MlflowTracker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``(uri, artifacts folder)`` of a running ``mlflow server`` (sqlite backend, proxied
    artifacts); it and every process it started (uvicorn, job runner, huey consumers) are ended
    after the module, or on any failure (``procs.spawn``)."""
    tmp = tmp_path_factory.mktemp("server")
    port, art = free_port(), tmp / "artifacts"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
        "--artifacts-destination", str(art),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = tmp / "server.log"
    uri = f"http://127.0.0.1:{port}"

    def up(proc) -> bool | None:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:]
            pytest.skip(f"mlflow server cannot start (exit {proc.returncode}): {tail}")
        try:
            return requests.get(f"{uri}/health", timeout=30).status_code == 200 or None
        except requests.RequestException:
            return None

    with (
        log.open("w") as out,
        procs.spawn(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp) as proc,
    ):
        procs.wait_until(lambda: up(proc), f"mlflow server at {uri}", log=log)
        yield uri, art


@pytest.fixture(scope="module")
def logged(server, tmp_path_factory):
    """The small patching study, logged over REST."""
    uri, _ = server
    tracker = MlflowTracker(uri)
    result = api.run(PATCHING, tracker, PATCHING_SMALL, cache_dir=None, runner="synchronous")
    assert result.run_url == (
        f"{uri}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
    )
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([tracker.experiment_id])}
    return client, tracker, runs


def test_runs_params_metrics_tags_over_rest(logged):
    client, tracker, runs = logged
    assert set(runs) == {
        "induction-patching",
        "heads@induction-patching",
        "residual@induction-patching",
        "heads-mean-ablation@induction-patching",
    }
    parent = runs["induction-patching"]
    assert parent.info.run_id == tracker.parent_run_id
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert parent.data.params["experiments.0.samples"] == "16"
    assert parent.data.tags["mi_spec.model_name"] == "mi_spec.zoo:induction_2l"
    assert len(parent.data.tags["mi_spec.file_hash"]) == 64
    heads = runs["heads@induction-patching"]
    assert heads.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert heads.data.tags["mi_spec.kind"] == "activation_patching"
    m = heads.data.metrics
    assert m["patch.max_effect.ci_low"] <= m["patch.max_effect"] <= m["patch.max_effect.ci_high"]
    assert parent.data.metrics["heads/patch.max_effect"] == m["patch.max_effect"]
    (ds,) = parent.inputs.dataset_inputs
    assert ds.dataset.digest == parent.data.params["data.hash"]
    assert json.loads(ds.dataset.profile) == {"num_rows": 32}


def test_artifacts_go_through_the_server(logged, server, tmp_path):
    client, _, runs = logged
    _, art = server
    heads = runs["heads@induction-patching"]
    assert heads.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied, not a local path
    assert {a.path for a in client.list_artifacts(heads.info.run_id)} >= {
        "heatmap.png",
        "effects.csv",
    }
    png = Path(client.download_artifacts(heads.info.run_id, "heatmap.png", str(tmp_path)))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    stored = list(art.rglob("heatmap.png"))
    assert any(p.read_bytes() == data for p in stored)  # it landed in the server's store
    resolved = client.download_artifacts(
        runs["induction-patching"].info.run_id, "resolved.yaml", str(tmp_path)
    )
    assert "name: induction-patching" in Path(resolved).read_text()


def test_compare_over_rest(logged, server, capsys):
    uri, _ = server
    assert main(["compare", "--tracking-uri", uri, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["run"] for r in rows} == {
        "heads@induction-patching",
        "residual@induction-patching",
        "heads-mean-ablation@induction-patching",
    }
    heads = next(r for r in rows if r["run"] == "heads@induction-patching")
    assert (
        heads["patch.max_effect"]
        == logged[2]["heads@induction-patching"].data.metrics["patch.max_effect"]
    )
    assert main(["compare", "--tracking-uri", uri, "--kind", "ablation"]) == 0
    out = capsys.readouterr().out
    assert "ablation (1 run)" in out and "heads-mean-ablation" in out


def test_ui_on_a_server_prints_its_url(logged, server, capsys):
    uri, _ = server
    assert main(["ui", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    expected = f"{uri}/#/experiments/{logged[1].experiment_id}/runs?workflowType=machine_learning"
    assert f"MLflow UI: {expected}" in out and "nothing started" in out


def test_crash_over_rest_marks_the_run_failed(server, logged, monkeypatch):
    uri, _ = server

    def boom(*a, **k):
        raise RuntimeError("worker died")

    monkeypatch.setattr(api, "run_plan", boom)
    tracker = MlflowTracker(uri)
    with pytest.raises(RuntimeError, match="worker died"):
        api.run(PATCHING, tracker, PATCHING_SMALL, cache_dir=None, runner="synchronous")
    run = MlflowClient(uri).get_run(tracker.parent_run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["mi_spec.error"] == "RuntimeError: worker died"
