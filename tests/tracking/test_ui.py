"""``mi-spec ui``: starts the MLflow UI on a sqlite store (loopback), prints the runs-table URL,
serves the logged runs and figures, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import requests

from mi_spec.analysis.report import ExperimentReport, StudyRecord
from mi_spec.cli.main import main
from mi_spec.tracking.base import tracking
from mi_spec.tracking.mlflow_tracker import MlflowTracker
from mi_spec.tracking.ui import is_loopback, runs_url, ui_command

START_TIMEOUT_S = 60
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def servers_on(port: int) -> list[int]:
    """Pids of processes whose command line has ``--port <port>``."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(a == "--port" and b == str(port) for a, b in zip(cmd, cmd[1:], strict=False)):
            found.append(p.info["pid"])
    return found


def wait_for(url: str, proc: subprocess.Popen, log) -> requests.Response:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mi-spec ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return requests.get(url, timeout=5)
        except requests.ConnectionError:
            time.sleep(0.5)
    pytest.fail(f"no answer from {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def test_ui_serves_the_store_and_stops_on_ctrl_c(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri)
    study = StudyRecord("induction", {"seed": 0}, {}, {"resolved.yaml": "name: induction\n"})
    with tracking(tracker, study):
        tracker.log_experiment(
            ExperimentReport("heads@induction", "activation_patching", figures={"heatmap.png": PNG})
        )
    port = free_port()
    out, log = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    cmd = [
        sys.executable,
        "-m",
        "mi_spec.cli.main",
        "ui",
        "--tracking-uri",
        uri,
        "--port",
        str(port),
    ]
    with out.open("w") as stdout, log.open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for(f"{base}/health", proc, log).status_code == 200
        printed = out.read_text()
        expected = (
            f"{base}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
        )
        assert f"MLflow UI: {expected}\n" in printed
        assert requests.get(base, timeout=10).status_code == 200  # the UI page itself
        api = f"{base}/ajax-api/2.0/mlflow"
        runs = requests.post(
            f"{api}/runs/search", json={"experiment_ids": [tracker.experiment_id]}, timeout=10
        ).json()["runs"]
        assert {r["info"]["run_name"] for r in runs} == {"induction", "heads@induction"}
        figure = requests.get(
            f"{base}/get-artifact",
            params={"path": "heads_induction/heatmap.png", "run_uuid": tracker.parent_run_id},
            timeout=10,
        )
        assert figure.status_code == 200 and figure.content == PNG  # figures show in the UI

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=30) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{base}/health", timeout=5)
        assert servers_on(port) == [], "the UI's server processes outlived mi-spec ui"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_port_in_use_is_a_clear_error(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = main(["ui", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--port", str(port)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"cannot serve the MLflow UI on 127.0.0.1:{port}" in err and "--port" in err


def test_command_url_and_loopback():
    cmd = ui_command("sqlite:///x.db", "127.0.0.1", 5001)
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == "sqlite:///x.db"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5001"
    assert (
        runs_url("http://h:1/", "3")
        == "http://h:1/#/experiments/3/runs?workflowType=machine_learning"
    )
    assert runs_url("http://h:1", None) == "http://h:1/#/experiments"
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "example.org", "::"))


def test_default_host_is_loopback():
    from mi_spec.cli.main import _parser

    args = _parser().parse_args(["ui"])
    assert args.host == "127.0.0.1" and is_loopback(args.host) and args.port == 5000


def test_network_host_warns_and_missing_store_is_explained(tmp_path, monkeypatch, capsys):
    from mi_spec.tracking import ui

    started = []
    monkeypatch.setattr(ui, "_run_until_stopped", lambda cmd: started.append(cmd) or 0)
    uri = f"sqlite:///{tmp_path}/new.db"
    assert main(["ui", "--tracking-uri", uri, "--host", "0.0.0.0", "--port", str(free_port())]) == 0
    out = capsys.readouterr().out
    assert out.startswith("warning: serving the MLflow UI on 0.0.0.0: reachable from the network")
    assert "/#/experiments\n" in out and "no experiment 'mi_spec'" in out
    (cmd,) = started
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--backend-store-uri") + 1] == uri
    assert not (tmp_path / "new.db").exists()  # looking up the experiment created nothing
