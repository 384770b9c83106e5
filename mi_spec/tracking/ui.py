"""``mi-spec ui``: the MLflow UI on the project's tracking store.

For a file or sqlite store it runs ``python -m mlflow ui --backend-store-uri <uri> --host <host>
--port <port>`` in its own process group, prints the runs-table URL, and blocks until Ctrl-C (or
SIGTERM / SIGHUP), which stops the UI and every process it started (uvicorn workers, the job
runner and its huey consumers): SIGTERM, then SIGKILL for what is left after a grace period. For an http(s) store the server already runs: the
URL is printed and nothing is started.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from urllib.parse import urlparse

import psutil

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
    """Run `cmd` in a process group of its own (a terminal's Ctrl-C reaches only this process,
    which then stops the UI in order); on Ctrl-C, SIGTERM or SIGHUP, when the UI exits by itself,
    or on any error, end the group and every descendant (:func:`_stop`). On Linux the UI also
    gets SIGTERM when this process dies without cleaning up (SIGKILL): see :func:`_tied`."""
    stoppers = (signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.getsignal(s) for s in stoppers}

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for s in stoppers:
        with contextlib.suppress(ValueError):  # not the main thread: Ctrl-C still works
            signal.signal(s, on_signal)
    proc = None
    try:
        proc = subprocess.Popen(_tied(cmd), start_new_session=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        try:
            if proc is not None:
                _stop(proc)  # also when the leader is gone: its workers may not be
        finally:
            for s, handler in previous.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(s, handler)


# Exec'd in front of the UI on Linux: SIGTERM when the parent (this process) dies, however it dies.
_TIE = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)  # the parent died before the tie: do not start\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _tied(cmd: list[str]) -> list[str]:
    """`cmd`, started through a tiny Python that makes the kernel SIGTERM it if this process dies
    (``PR_SET_PDEATHSIG`` survives ``exec``); the UI then stops its own workers. Linux only."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _TIE, str(os.getpid()), shutil.which(cmd[0]) or cmd[0], *cmd[1:]]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _Family:
    """What the UI started: the leader (until reaped), its descendants, the members of its
    process group and of groups its descendants lead (a worker that lost its parent is still in
    its group; one that left the group is still a descendant), and all that was seen before."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.seen, self.groups = proc, {}, {proc.pid}

    def alive(self) -> list[psutil.Process]:
        self.proc.poll()  # reap the leader, our child; once reaped its pid may name another
        if self.proc.returncode is None:
            with contextlib.suppress(psutil.Error):
                self.seen.setdefault(self.proc.pid, psutil.Process(self.proc.pid))
        for _ in range(2):
            for p in list(self.seen.values()):
                with contextlib.suppress(psutil.Error):
                    for child in p.children(recursive=True):
                        self.seen.setdefault(child.pid, child)
            self.groups |= {pid for pid, p in self.seen.items() if _pgid(pid) == pid}
            self.groups.discard(os.getpgid(0))
            for p in psutil.process_iter():
                if _pgid(p.pid) in self.groups:
                    self.seen.setdefault(p.pid, p)
        return [p for p in self.seen.values() if _alive(p)]

    def signal(self, procs: list[psutil.Process], sig: int) -> None:
        pgids = {p.pid: _pgid(p.pid) for p in procs}
        for pgid in self.groups & set(pgids.values()):  # a group id is reused only when empty
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        for p in procs:
            if pgids[p.pid] not in self.groups:  # one that left the groups: on its own
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)  # psutil checks that the pid still names that process


def _stop(proc: subprocess.Popen, grace: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the UI's process group and everything it started, poll until all is gone, SIGKILL
    what is left after `grace` s (at once on a second Ctrl-C / SIGTERM), and reap the leader."""
    hurry: list[int] = []
    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # a second signal: no more grace, no traceback
            previous[s] = signal.signal(s, lambda signum, frame: hurry.append(signum))
    try:
        family = _Family(proc)
        left = family.alive()
        family.signal(left, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline and not hurry:
            time.sleep(0.1)
            left = family.alive()  # workers may start workers while stopping: seen, then ended
        for _ in range(100):  # SIGKILL cannot be ignored: a few rounds at most
            if not left:
                break
            family.signal(left, signal.SIGKILL)
            time.sleep(0.1)
            left = family.alive()
        proc.wait()
    finally:
        for s, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(s, handler)
