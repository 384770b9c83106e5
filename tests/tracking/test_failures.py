"""Robustness: an unreachable store fails before any compute; a study that crashes (in this
process, inside a Dask worker, or by Ctrl-C) leaves its MLflow runs FAILED with the error
recorded, never RUNNING."""

from __future__ import annotations

import socket
import time

import pytest
from conftest import write_rows
from mlflow.tracking import MlflowClient

from mi_spec import api
from mi_spec.cli.main import main
from mi_spec.errors import ExecutionError, MiSpecError
from mi_spec.schedule.profiles import RunnerProfile
from mi_spec.tracking.mlflow_tracker import MlflowTracker

BODY = "experiments:\n  - {kind: activation_patching, sites: ['L*.H*'], positions: [mid]}\n"


def runs(uri: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mi_spec")
    return client.search_runs([exp.experiment_id]) if exp else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a model is loaded or a job runs."""

    def forbidden(*a, **k):
        pytest.fail("compute started before the tracking store was checked")

    monkeypatch.setattr(api, "compile_file", forbidden)
    monkeypatch.setattr(api, "check_plan_sites", forbidden)
    monkeypatch.setattr(api, "run_plan", forbidden)


def test_unreachable_sqlite_store_fails_before_the_model_loads(tmp_path, study_file, no_compute):
    (tmp_path / "blocker").write_text("")  # a file where the store's folder should be
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/blocker/mlflow.db")
    with pytest.raises(MiSpecError, match="cannot use MLflow tracking store"):
        api.run(study_file(BODY), tracker, cache_dir=None, runner="synchronous")
    assert tracker.parent_run_id is None


def test_sqlite_uri_naming_a_directory_fails_at_once(tmp_path, study_file, no_compute, capsys):
    """MLflow itself retries such a store for about two minutes before giving up."""
    folder = tmp_path / "runs"
    folder.mkdir()
    uri = f"sqlite:///{folder}"
    start = time.perf_counter()
    code = main(["run", str(study_file(BODY)), "--tracking-uri", uri, "--runner", "synchronous"])
    assert time.perf_counter() - start < 10
    assert code == 1
    err = capsys.readouterr().err  # after the run's stage lines (which file, which stage)
    assert err.endswith(
        f"\nerror: cannot use MLflow tracking store {uri!r}: {folder} is a directory, not a "
        f"database file (e.g. sqlite:///{folder}/mlflow.db)\n"
    )
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("where", ["blocker/mlflow.db", "blocker/deeper/mlflow.db"])
def test_sqlite_uri_through_a_file_fails_at_once(tmp_path, where):
    (tmp_path / "blocker").write_text("")
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/{where}")
    start = time.perf_counter()
    with pytest.raises(MiSpecError, match=f"{tmp_path}/blocker is a file, not a folder$"):
        tracker.check()
    assert time.perf_counter() - start < 10


def test_sqlite_store_in_a_missing_folder_is_created(tmp_path):
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/new/mlflow.db")
    tracker.check()
    assert (tmp_path / "new" / "mlflow.db").is_file()


def test_unreachable_server_fails_fast_from_the_cli(study_file, monkeypatch, no_compute, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = main(["run", str(study_file(BODY)), "--tracking-uri", uri, "--runner", "synchronous"])
    assert code == 1
    err = capsys.readouterr().err
    assert "\nerror: cannot reach MLflow tracking server" in err and uri in err
    assert "Traceback" not in err


def test_ctrl_c_mid_study_marks_the_run_failed(study_file, tracking_uri, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "run_plan", interrupted)
    code = main(["run", str(study_file(BODY)), "--runner", "synchronous", "--no-cache"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    (parent,) = runs(tracking_uri)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["mi_spec.error"] == "KeyboardInterrupt: "


def test_ctrl_c_while_logging_an_experiment_fails_parent_and_child(
    study_file, tracking_uri, monkeypatch
):
    tracker = MlflowTracker(tracking_uri)
    original = tracker._log_files

    def interrupt_child_files(run_id, files):
        if run_id != tracker.parent_run_id:
            raise KeyboardInterrupt
        original(run_id, files)

    monkeypatch.setattr(tracker, "_log_files", interrupt_child_files)
    with pytest.raises(KeyboardInterrupt):
        api.run(study_file(BODY), tracker, cache_dir=None, runner="synchronous")
    logged = runs(tracking_uri)
    assert sorted(r.info.status for r in logged) == ["FAILED", "FAILED"]
    assert {r.info.run_name for r in logged} == {"tiny", "activation_patching@tiny"}


def test_sigterm_while_finishing_the_study_still_ends_the_run_failed(
    study_file, tracking_uri, monkeypatch
):
    """The study's last step, ending its run FINISHED, cut short (here by SIGTERM, which the CLI
    raises as Terminated, a KeyboardInterrupt): the run is ended FAILED, not left RUNNING."""
    from mi_spec.cli.signals import Terminated

    tracker = MlflowTracker(tracking_uri)
    tracker.check()
    original = tracker._client.set_terminated

    def terminated_while_ending_the_parent(run_id, status=None, **kwargs):
        if run_id == tracker.parent_run_id and status == "FINISHED":
            raise Terminated(15)
        original(run_id, status, **kwargs)

    monkeypatch.setattr(tracker._client, "set_terminated", terminated_while_ending_the_parent)
    with pytest.raises(Terminated):
        api.run(study_file(BODY), tracker, cache_dir=None, runner="synchronous")
    statuses = {
        r.info.run_name: (r.info.status, r.data.tags.get("mi_spec.error"))
        for r in runs(tracking_uri)
    }
    assert statuses == {
        "tiny": ("FAILED", "Terminated: terminated by SIGTERM"),
        "activation_patching@tiny": ("FINISHED", None),
    }


def test_crash_inside_a_dask_worker_marks_the_run_failed(
    tmp_path, study_file, tracking_uri, monkeypatch
):
    """The worker process reloads the data and finds it changed since compile: the job fails
    there, on its only attempt, and the study's run records that error."""
    path = study_file(BODY)
    checked = api.check_plan_sites

    def check_then_change_the_data(study, plan):
        checked(study, plan)  # in this process, on the data as compiled
        write_rows(tmp_path / "rows.jsonl", seed=1)  # what the worker will read

    monkeypatch.setattr(api, "check_plan_sites", check_then_change_the_data)
    profile = RunnerProfile(kind="local", workers=1, retries=0, gpu=False, dashboard=False)
    with pytest.raises(ExecutionError, match="dataset changed"):
        api.run(path, MlflowTracker(tracking_uri), cache_dir=None, runner=profile)
    (parent,) = runs(tracking_uri)
    assert parent.info.status == "FAILED"
    error = parent.data.tags["mi_spec.error"]
    assert error.startswith("ExecutionError:") and "dataset changed" in error
    text = MlflowClient(tracking_uri).download_artifacts(parent.info.run_id, "error.txt")
    with open(text) as f:
        assert f.read() == error
