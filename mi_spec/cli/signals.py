"""SIGTERM and SIGHUP end a study the way Ctrl-C does.

``timeout``, ``scancel``, ``docker stop`` and Kubernetes stop a program with SIGTERM; closing its
terminal (or losing the SSH session) sends SIGHUP. Python's default for both is to die on the
spot: no ``finally`` runs, so the study's MLflow runs stay RUNNING forever and an embedded Dask
cluster is not closed. `terminating` turns them into `Terminated`, a `KeyboardInterrupt`, so every
path that already handles Ctrl-C (the tracker marks its runs FAILED, the Dask runner cancels its
futures and closes its cluster, finished results are already cached) handles them too. The CLI
then exits with ``128 + signum`` (143 for SIGTERM, 129 for SIGHUP), as a shell reports a program
killed by that signal.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

HANDLED = ("SIGTERM", "SIGHUP")  # by name: SIGHUP does not exist on Windows
REDELIVER_S = 0.01  # a Terminated lost in a __del__ is delivered again after this long


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by ``signum``; handled like Ctrl-C, exits ``128 + signum``."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def terminating(enabled: bool = True) -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Terminated` in the main thread.

    The first signal raises; later ones are ignored, so that a second SIGTERM (GNU ``timeout``
    signals the program, then its whole process group; Slurm every process of the step) cannot
    cut short the cleanup the first one started (SIGKILL still ends the process). Python drops an
    exception raised inside a ``__del__`` or a weakref callback (they run wherever the garbage
    collector happens to run them): a `Terminated` lost there is delivered again a moment later.
    The previous handlers are restored on exit. A signal this process ignores (``nohup`` ignores
    SIGHUP) stays ignored. Outside the main thread (where Python cannot install handlers), or with
    ``enabled=False``, this does nothing.
    """
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    main = threading.main_thread().ident
    state = {"armed": True, "active": True}
    lock = threading.Lock()  # no redelivery once the handlers are being restored

    def handler(signum: int, frame: FrameType | None) -> None:
        if state["armed"]:
            state["armed"] = False
            raise Terminated(signum)

    def redeliver(signum: int) -> None:
        with lock:
            if not state["active"]:
                return
            state["armed"] = True
            if hasattr(signal, "pthread_kill") and main is not None:
                signal.pthread_kill(main, signum)  # also wakes the main thread from a sleep
            else:
                signal.raise_signal(signum)

    def unraisable(args: Any) -> None:
        if isinstance(args.exc_value, Terminated) and state["active"]:
            # from another thread: raised here, in the hook, it would be lost again
            timer = threading.Timer(REDELIVER_S, redeliver, (args.exc_value.signum,))
            timer.daemon = True
            timer.start()
        else:
            previous_hook(args)

    previous = {}
    for name in HANDLED:
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:  # nohup
            previous[signum] = signal.signal(signum, handler)
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        with lock:
            state["active"] = False
        sys.unraisablehook = previous_hook
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
