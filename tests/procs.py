"""Processes started by tests: each in a process group of its own, all of it ended whatever happens.

``spawn(cmd)`` starts ``cmd`` with ``start_new_session=True`` and, on leaving the ``with`` block (a
pass, a failed assert, a timeout, Ctrl-C), ends it with :func:`stop`: SIGTERM to its process group
and to every descendant seen, a poll until all are gone (``stop_s``), then SIGKILL. Descendants are
found with psutil: the children of the leader, recursively; the members of its group and of every
group a descendant leads (one that lost its parent is still there); and every process
:func:`family` saw earlier (one that left both, after its parent died, e.g. a server's workers
when the test SIGKILLs the command that started the server). ``run(cmd)`` is ``subprocess.run``
on top of it. ``wait_until`` / ``wait_http`` poll for readiness: no fixed sleeps, generous limits
(importing mlflow in several processes on a loaded 2-core CI machine takes most of a minute).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import requests

START_S = 180.0  # readiness: mlflow's UI took ~50 s to answer on a loaded 2-core machine
RUN_S = 300.0  # a short command run to completion under load
STOP_S = 30.0  # grace after SIGTERM before SIGKILL
POLL_S = 0.2

T = TypeVar("T")


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; only its exit status waits to be read)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def family(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The live processes ``proc`` started, itself included (until reaped): pid -> process.
    Everything found is remembered on ``proc`` for :func:`stop`."""
    seen: dict[int, psutil.Process] = getattr(proc, "_seen", {})
    groups: set[int] = getattr(proc, "_groups", {proc.pid})
    if proc.returncode is None:  # once reaped, its pid may name another process
        with contextlib.suppress(psutil.Error):
            seen.setdefault(proc.pid, psutil.Process(proc.pid))
    for _ in range(2):  # a group's members' children, and the groups those children lead
        for p in list(seen.values()):
            with contextlib.suppress(psutil.Error):
                for child in p.children(recursive=True):
                    seen.setdefault(child.pid, child)
        groups |= {pid for pid, p in seen.items() if alive(p) and _pgid(pid) == pid}
        groups.discard(os.getpgid(0))  # never the test runner's own group
        for p in psutil.process_iter():
            if _pgid(p.pid) in groups:
                seen.setdefault(p.pid, p)
    proc._seen, proc._groups = seen, groups  # type: ignore[attr-defined]
    return {pid: p for pid, p in seen.items() if alive(p)}


def _signal(proc: subprocess.Popen, targets: list[psutil.Process], sig: int) -> None:
    groups = getattr(proc, "_groups", {proc.pid})
    pgids = {p.pid: _pgid(p.pid) for p in targets}
    for pgid in groups & set(pgids.values()):  # a group id is reused only when empty
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for p in targets:
        if pgids[p.pid] not in groups:  # one that left the groups: on its own
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)  # psutil checks that the pid still names that process


def stop(proc: subprocess.Popen, stop_s: float = STOP_S) -> list[int]:
    """End ``proc`` and everything it started (see the module doc); returns the pids that needed
    SIGKILL. ``proc`` was started with ``start_new_session=True``: its group id is its pid."""
    left = list(family(proc).values())
    _signal(proc, left, signal.SIGTERM)
    deadline = time.monotonic() + stop_s
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        proc.poll()  # reap the leader, our child
        left = list(family(proc).values())
    killed = [p.pid for p in left]
    for _ in range(100):  # SIGKILL cannot be ignored: a respawning parent dies with its child
        if not left:
            break
        _signal(proc, left, signal.SIGKILL)
        time.sleep(POLL_S)
        proc.poll()
        left = list(family(proc).values())
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=stop_s)
    return killed


@contextlib.contextmanager
def spawn(cmd: list[str], *, stop_s: float = STOP_S, **popen: Any) -> Iterator[subprocess.Popen]:
    """``Popen(cmd, start_new_session=True, **popen)``, ended with everything it started when the
    block exits, whatever happens."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        stop(proc, stop_s)


def run(
    cmd: list[str],
    *,
    timeout: float = RUN_S,
    input: str | bytes | None = None,
    capture_output: bool = True,
    text: bool = True,
    check: bool = False,
    **popen: Any,
) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a process group of its own: on a timeout (``TimeoutExpired``, as
    ``subprocess.run``) or any error, all of it is ended, not only the direct child."""
    if capture_output:
        popen |= {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    if input is not None:
        popen["stdin"] = subprocess.PIPE
    with spawn(cmd, text=text, **popen) as proc:
        out, err = proc.communicate(input, timeout=timeout)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def wait_until(
    ready: Callable[[], T | None],
    what: str,
    timeout: float = START_S,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> T:
    """Poll ``ready()`` until it returns something other than None (or False); fail, with the
    tail of ``log``, after ``timeout`` s or as soon as ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}{_tail(log)}")
        got = ready()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s{_tail(log)}")
        time.sleep(POLL_S)


def wait_http(
    url: str,
    timeout: float = START_S,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> requests.Response:
    """The first 200 answer from ``url`` (a server is up), polled until ``timeout`` s."""

    def ready() -> requests.Response | None:
        try:
            got = requests.get(url, timeout=30)
        except requests.RequestException:  # not listening yet, or too busy to answer
            return None
        return got if got.status_code == 200 else None

    return wait_until(ready, f"no answer from {url}", timeout, proc, log)


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return ":\n" + log.read_text(errors="replace")[-3000:]
