"""SIGTERM/SIGHUP end `mi-spec run` like Ctrl-C: the study's MLflow run FAILED with the signal
recorded, finished jobs cached, Dask workers gone, exit 128 + signum with one line, no traceback.

The end-to-end tests run the CLI in its own session and wait by polling (never a fixed sleep),
with generous deadlines: the machine may be loaded."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import GPT2, write_rows
from mlflow.tracking import MlflowClient

from mi_spec.cli.signals import Terminated, terminating

WIDER = GPT2.replace("n_embd: 32", "n_embd: 192")  # jobs of ~0.1 s: the study takes a while
DEADLINE_S = 300  # for the CLI to start its first job (imports, MLflow's tables, Dask workers)


def write_study(tmp_path: Path, rows: int = 64) -> Path:
    """A hypothesis of ``rows`` one-row jobs on a small random GPT-2."""
    write_rows(tmp_path / "rows.jsonl", n=rows)
    path = tmp_path / "slow.yaml"
    path.write_text(
        f"name: slow\nmodel:\n  {WIDER}\ndata:\n  path: rows.jsonl\n  positions: {{mid: 4}}\n"
        "metric: {kind: loss, at: mid}\n"
        "experiments:\n  - {kind: activation_patching, sites: ['L*.H*'], batch_size: 1}\n"
    )
    return path


def wait_for(condition, what: str, proc: subprocess.Popen, deadline_s: float = DEADLINE_S):
    """Poll ``condition`` until it holds; fail if ``proc`` ends first or the deadline passes."""
    end = time.monotonic() + deadline_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"mi-spec exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > end:
            pytest.fail(f"no {what} after {deadline_s} s")
        time.sleep(0.1)


def cached(cache: Path) -> list[Path]:
    return list(cache.rglob("*.json"))  # whatever the layout under the cache folder


def run_statuses(db: Path) -> list[str]:
    """The statuses of the runs in the sqlite store, read without MLflow (no migrations)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return [s for (s,) in con.execute("SELECT status FROM runs")]
    except sqlite3.Error:  # tables not created yet, or locked: ask again
        return []


def session_processes(sid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of session ``sid``."""
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def start_run(tmp_path: Path, runner: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "mi_spec.cli.main",
        "run",
        str(write_study(tmp_path)),
        "--runner",
        runner,
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def assert_terminated(proc: subprocess.Popen, tmp_path: Path) -> str:
    """The CLI exited 143 with one SIGTERM line and no traceback; its run is FAILED, recorded."""
    _, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 128 + signal.SIGTERM == 143, err
    assert [line for line in err.splitlines() if "SIGTERM" in line] == ["terminated by SIGTERM"]
    assert "Traceback" not in err
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("mi_spec")
    (parent,) = client.search_runs([exp.experiment_id])
    assert parent.info.status == "FAILED"
    assert parent.data.tags["mi_spec.error"] == "Terminated: terminated by SIGTERM"
    assert cached(tmp_path / "cache"), "the jobs finished before SIGTERM are cached"
    return err


@pytest.mark.slow
def test_sigterm_mid_study_fails_the_run_and_exits_143(tmp_path):
    proc = start_run(tmp_path, "synchronous")
    try:
        db = tmp_path / "mlflow.db"
        wait_for(
            lambda: cached(tmp_path / "cache") and run_statuses(db) == ["RUNNING"], "job", proc
        )
        os.kill(proc.pid, signal.SIGTERM)
        assert_terminated(proc, tmp_path)
    finally:
        kill_session(proc)


@pytest.mark.slow
def test_sigterm_with_the_local_dask_runner_leaves_no_worker_behind(tmp_path):
    profile = tmp_path / "one_worker.yaml"
    profile.write_text("kind: local\nworkers: 1\ngpu: false\ndashboard: false\n")
    proc = start_run(tmp_path, str(profile))
    try:
        wait_for(lambda: cached(tmp_path / "cache"), "cached job", proc)
        workers = [p for p in session_processes(proc.pid) if p.pid != proc.pid]
        assert workers, "the LocalCluster's worker processes run in the CLI's session"
        os.kill(proc.pid, signal.SIGTERM)  # the main process only, as docker stop does;
        assert_terminated(proc, tmp_path)  # its worker is busy with the next job
        end = time.monotonic() + 60
        while alive := session_processes(proc.pid):
            assert time.monotonic() < end, f"left behind: {[p.cmdline() for p in alive]}"
            time.sleep(0.1)
    finally:
        kill_session(proc)


def test_terminating_raises_terminated_once_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    # the suite itself may run under nohup (SIGHUP ignored, which `terminating` respects)
    hup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated) as err, terminating():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # interrupted by the handler
        assert isinstance(err.value, KeyboardInterrupt)
        assert (str(err.value), err.value.exit_code) == ("terminated by SIGHUP", 129)
        with pytest.raises(Terminated) as err, terminating():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # a second one, during cleanup: ignored
                os.kill(os.getpid(), signal.SIGHUP)
        assert err.value.exit_code == 143
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, hup)


class TermsWhenCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # the handler runs in here, where Python drops its exception
            pass


def test_a_terminated_dropped_in_a_finalizer_is_delivered_again(capfd):
    with pytest.raises(Terminated), terminating():
        TermsWhenCollected()  # collected at once
        time.sleep(10)  # interrupted by the second delivery
    assert "Exception ignored" not in capfd.readouterr().err


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with terminating():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_disabled_or_off_the_main_thread_it_changes_nothing():
    import threading

    before = signal.getsignal(signal.SIGTERM)
    with terminating(enabled=False):
        assert signal.getsignal(signal.SIGTERM) is before
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_handler_inside()))
    thread.start()
    thread.join()
    assert seen == [before]


def _handler_inside():
    with terminating():
        return signal.getsignal(signal.SIGTERM)
