"""``mi-spec ui``: the MLflow UI on the project's tracking store.

For a file or sqlite store it runs ``python -m mlflow ui --backend-store-uri <uri> --host <host>
--port <port>`` in its own process group, prints the runs-table URL, and blocks until Ctrl-C (or
SIGTERM), which stops the UI and its workers. For an http(s) store the server already runs: the
URL is printed and nothing is started.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from urllib.parse import urlparse

from mi_spec.errors import MiSpecError
from mi_spec.tracking.mlflow_tracker import probe_http, resolve_tracking_uri

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
STOP_TIMEOUT_S = 10.0


def runs_url(base: str, experiment_id: str | None) -> str:
    """The UI page listing an experiment's runs (the experiments page without an id)."""
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line for `tracking_uri` (one worker: a UI for one person)."""
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", tracking_uri,
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def experiment_id(tracking_uri: str, experiment: str) -> str | None:
    """The id of `experiment` in an existing store, or None (no store yet, no such experiment)."""
    from mi_spec.tracking.compare import open_store

    try:
        exp = open_store(tracking_uri).get_experiment_by_name(experiment)
    except Exception:
        return None
    return exp.experiment_id if exp is not None else None


def serve(
    tracking_uri: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    experiment: str = "mi_spec",
    say: Callable[[str], None] | None = None,
) -> int:
    """Run the MLflow UI until interrupted; returns its exit code (0 when stopped by a signal)."""
    say = say or _say
    uri = resolve_tracking_uri(tracking_uri)
    if urlparse(uri).scheme in ("http", "https"):
        probe_http(uri)
        say(f"MLflow UI: {runs_url(uri, experiment_id(uri, experiment))}")
        say("(a tracking server: its UI is already running; nothing started)")
        return 0
    if not is_loopback(host):
        say(f"warning: serving the MLflow UI on {host}: reachable from the network, no login")
    _check_port_free(host, port)
    exp_id = experiment_id(uri, experiment)
    url = runs_url(f"http://{_bracket(host)}:{port}", exp_id)
    say(f"MLflow UI: {url}")
    if exp_id is None:
        say(f"(no experiment {experiment!r} in {uri} yet: run `mi-spec run` into it)")
    say("Ctrl-C to stop")
    return _run_until_stopped(ui_command(uri, host, port))


def _say(text: str) -> None:
    print(text, flush=True)  # before blocking, also when stdout is a pipe


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise MiSpecError(
                f"cannot serve the MLflow UI on {host}:{port}: {e.strerror or e}; "
                "pick another port with --port"
            ) from None


def _run_until_stopped(cmd: list[str]) -> int:
    """Run `cmd` in a new process group; on Ctrl-C or SIGTERM stop the whole group."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread: no handler, Ctrl-C still works
        signal.signal(signal.SIGTERM, on_term)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        return 0
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it if still there after a grace period (POSIX)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):  # the leader's leftovers, or the leader itself
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
