"""``mi-spec ui``: starts the MLflow UI on a sqlite store (loopback), prints the runs-table URL,
serves the logged runs and figures, and stops cleanly on Ctrl-C: every process it started ends,
also on SIGTERM / SIGHUP, and on SIGKILL (Linux) the UI is told to stop. Every process a test
starts is ended by ``procs.spawn`` whatever happens; waits are polls with generous limits."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import time

import procs
import psutil
import pytest
import requests

from mi_spec.analysis.report import ExperimentReport, StudyRecord
from mi_spec.cli.main import main
from mi_spec.tracking import ui
from mi_spec.tracking.base import tracking
from mi_spec.tracking.mlflow_tracker import MlflowTracker
from mi_spec.tracking.ui import is_loopback, runs_url, ui_command

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
REQUEST_S = 60  # one request to a UI that a loaded machine serves slowly
# A stand-in for a server: a leader, a worker in its process group, a worker in a session of its
# own; "deaf": all ignore SIGTERM (inherited), so only SIGKILL ends them.
FAMILY = (
    "import signal, subprocess, sys, time\n"
    "if sys.argv[1:] == ['deaf']:\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "sleep = [sys.executable, '-c', 'import time; time.sleep(600)']\n"
    "subprocess.Popen(sleep)\n"
    "subprocess.Popen(sleep, start_new_session=True)\n"
    "time.sleep(600)\n"
)
UNTIL_STOPPED = (
    "import sys\n"
    "from mi_spec.tracking.ui import _run_until_stopped\n"
    "sys.exit(_run_until_stopped(sys.argv[1:]))\n"
)


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


def family_of(proc, n: int) -> dict | None:
    """``proc``'s live processes once there are ``n`` of them."""
    found = procs.family(proc)
    return found if len(found) == n else None


def has_huey(proc) -> bool:
    """Whether one of ``proc``'s processes is a huey consumer (mlflow 3's job workers)."""
    for p in procs.family(proc).values():
        with contextlib.suppress(psutil.Error):
            if "huey_consumer" in " ".join(p.cmdline()):
                return True
    return False


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
    with (
        out.open("w") as stdout,
        log.open("w") as stderr,
        procs.spawn(cmd, stdout=stdout, stderr=stderr) as proc,  # ends it all, whatever happens
    ):
        base = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        procs.wait_http(f"{base}/health", proc=proc, log=log)
        up_s = time.monotonic() - t0
        printed = out.read_text()
        expected = (
            f"{base}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
        )
        assert f"MLflow UI: {expected}\n" in printed
        assert requests.get(base, timeout=REQUEST_S).status_code == 200  # the UI page itself
        api = f"{base}/ajax-api/2.0/mlflow"
        runs = requests.post(
            f"{api}/runs/search",
            json={"experiment_ids": [tracker.experiment_id]},
            timeout=REQUEST_S,
        ).json()["runs"]
        assert {r["info"]["run_name"] for r in runs} == {"induction", "heads@induction"}
        figure = requests.get(
            f"{base}/get-artifact",
            params={"path": "heads/heatmap.png", "run_uuid": tracker.parent_run_id},
            timeout=REQUEST_S,
        )
        assert figure.status_code == 200 and figure.content == PNG  # figures show in the UI
        with contextlib.suppress(pytest.fail.Exception):  # its job workers, if this mlflow has any
            procs.wait_until(lambda: has_huey(proc), "huey consumers", timeout=60, proc=proc)
        started = procs.family(proc)  # mi-spec ui, mlflow ui, uvicorn, job runner, consumers
        assert len(started) >= 3, [p.cmdline() for p in started.values()]

        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=procs.START_S) == 0
        stop_s = time.monotonic() - t0
        left = [p.cmdline() for p in started.values() if procs.alive(p)]
        assert not left, f"outlived mi-spec ui: {left}"
        assert procs.family(proc) == {}  # nothing in the UI's process group either
        assert servers_on(port) == [], "the UI's server processes outlived mi-spec ui"
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{base}/health", timeout=REQUEST_S)
        print(f"UI up in {up_s:.1f} s, {len(started)} processes, stopped in {stop_s:.1f} s")


def test_stop_ends_the_group_and_a_worker_that_left_it():
    """A deaf server (SIGTERM ignored): SIGKILL after the grace period, for the group and for a
    descendant in a session of its own."""
    with procs.spawn([sys.executable, "-c", FAMILY, "deaf"]) as proc:
        started = procs.wait_until(lambda: family_of(proc, 3), "the server's workers")
        handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
        t0 = time.monotonic()
        ui._stop(proc, grace=1.0)
        assert proc.returncode == -signal.SIGKILL
        assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
        assert time.monotonic() - t0 < procs.STOP_S
        assert not [p.pid for p in started.values() if procs.alive(p)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_stops_everything(sig):
    cmd = [sys.executable, "-c", UNTIL_STOPPED, sys.executable, "-c", FAMILY]
    with procs.spawn(cmd) as proc:
        started = procs.wait_until(lambda: family_of(proc, 4), "the UI", proc=proc)
        proc.send_signal(sig)
        assert proc.wait(timeout=procs.START_S) == 0
        assert not [p.cmdline() for p in started.values() if procs.alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_ui_stops_when_mi_spec_ui_is_killed():
    """SIGKILL leaves no time to clean up: the kernel sends the UI SIGTERM (it then stops its own
    workers, as ``mlflow ui`` does)."""
    cmd = [sys.executable, "-c", UNTIL_STOPPED, sys.executable, "-c", FAMILY]
    with procs.spawn(cmd) as proc:
        procs.wait_until(lambda: len(procs.family(proc)) == 4, "the UI", proc=proc)
        (server,) = psutil.Process(proc.pid).children()
        proc.kill()
        proc.wait(timeout=procs.START_S)
        procs.wait_until(lambda: not procs.alive(server), "the UI to get SIGTERM")


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
