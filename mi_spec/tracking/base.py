"""Tracking interface: where a study's results go. No MLflow here (see `mlflow_tracker`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from mi_spec.analysis.report import ExperimentReport, StudyRecord

log = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "FAILED"]

PARAM_VALUE_LIMIT = 500  # well under MLflow's 6000-char param limit; keeps the UI readable


@runtime_checkable
class Tracker(Protocol):
    """Receives one study: `check` first, `start` once, `log_experiment` per experiment,
    `finish` once.

    `check` raises `MiSpecError` when the tracker cannot record anything (an unreachable store);
    it runs before the model is loaded, so such a study fails before any compute.
    `finish` must be safe to call after a failed or missing `start` (it then does nothing).
    `log_experiment` may be given the experiment's compute time in seconds (`compute_s`: the sum
    of its jobs' ``seconds``); a tracker that records durations uses it, others ignore it.
    """

    def check(self) -> None: ...

    def start(self, study: StudyRecord) -> None: ...

    def log_experiment(self, report: ExperimentReport, compute_s: float | None = None) -> None: ...

    def finish(self, status: RunStatus, error: str | None = None) -> None: ...


@contextmanager
def tracking(tracker: Tracker, study: StudyRecord) -> Iterator[Tracker]:
    """Start `tracker` for `study`, yield it, and always finish it.

    The tracker finishes ``FINISHED`` on normal exit and ``FAILED`` (with
    ``"<ExceptionType>: <message>"``) on any exception, KeyboardInterrupt included (and so
    SIGTERM/SIGHUP, which the CLI turns into `mi_spec.cli.signals.Terminated`: "Terminated:
    terminated by SIGTERM"), even one that cuts ``finish("FINISHED")`` short; the exception is
    re-raised. A failure while finishing a failed run is logged, not raised, so it never masks
    the original error.
    """
    try:
        tracker.start(study)
        yield tracker
        tracker.finish("FINISHED")
    except BaseException as e:
        try:
            tracker.finish("FAILED", error=f"{type(e).__name__}: {e}")
        except Exception:
            log.exception("tracker failed to record the failure of study %r", study.name)
        raise


def truncate(text: str, limit: int = PARAM_VALUE_LIMIT) -> str:
    """`text` cut to at most `limit` characters, ending in "…" when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists/tuples → ``{"a.b.0.c": "value"}`` with stringified, truncated values.

    Empty containers are kept as ``"{}"`` / ``"[]"`` so the key does not vanish.
    """
    out: dict[str, str] = {}
    for key, value in d.items():
        _flatten_into(out, f"{prefix}.{key}" if prefix else str(key), value)
    return out


def _flatten_into(out: dict[str, str], key: str, value: Any) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    elif isinstance(value, list | tuple) and value:
        for i, v in enumerate(value):
            _flatten_into(out, f"{key}.{i}", v)
    elif isinstance(value, Mapping):
        out[key] = "{}"
    elif isinstance(value, list | tuple):
        out[key] = "[]"
    else:
        out[key] = truncate(str(value))


@dataclass
class InMemoryTracker:
    """Keeps everything in memory, for tests. `status` is None until `finish`."""

    study: StudyRecord | None = None
    reports: list[ExperimentReport] = field(default_factory=list)
    compute_s: dict[str, float | None] = field(default_factory=dict)  # report name -> seconds
    status: RunStatus | None = None
    error: str | None = None
    started: bool = False

    def check(self) -> None:
        """Nothing to check: memory is always there."""

    def start(self, study: StudyRecord) -> None:
        """Record the study; a tracker is used for one study only."""
        if self.started:
            raise RuntimeError("InMemoryTracker.start called twice")
        self.study, self.started = study, True

    def log_experiment(self, report: ExperimentReport, compute_s: float | None = None) -> None:
        """Record one report (and its compute time, when given)."""
        if not self.started or self.status is not None:
            raise RuntimeError("log_experiment outside start()/finish()")
        self.reports.append(report)
        self.compute_s[report.name] = compute_s

    def finish(self, status: RunStatus, error: str | None = None) -> None:
        """Record the final status (no-op if never started)."""
        if self.started:
            self.status, self.error = status, error

    @property
    def params(self) -> dict[str, str]:
        """The study's params, flattened as a tracker would log them."""
        return flatten_params(self.study.params) if self.study else {}

    def report(self, name: str) -> ExperimentReport:
        """The logged report called `name`."""
        for r in self.reports:
            if r.name == name:
                return r
        raise KeyError(name)
