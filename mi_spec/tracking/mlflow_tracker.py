"""MLflow tracker: one parent run per study, one nested child run per experiment.

Layout of what gets logged:

* parent run (named after the study): flattened study params, study tags (``mi_spec.*``: the
  hypothesis, file and spec hashes, git commit, model, runner), the dataset as a run input
  (``log_inputs``: name, digest = data hash, source, row count, column schema), the study's
  artifacts (``resolved.yaml``, ``plan.json``…) at the artifact root, every experiment's headline
  metrics, and a copy of every experiment's figures under ``<experiment>/<file>.png``;
* child run per experiment (named ``report.name``, tagged ``mlflow.parentRunId``): params,
  metrics, tables as CSV, figures as PNG, ``warnings.txt``; tags: the study's ``mi_spec.*`` tags
  (so searches like ``tags.`mi_spec.hypothesis` = 'x'`` find children), ``mi_spec.kind``,
  ``mi_spec.warnings`` (the count) and ``mi_spec.headline`` (the headline metric names, comma
  separated, without their ``.ci_low``/``.ci_high`` companions).

Parent metric names: every headline metric is logged on the parent as ``<experiment>/<metric>``,
where ``<experiment>`` is the experiment's label (its run name without ``@<hypothesis>``)
sanitized to ``[A-Za-z0-9_.-]`` (other characters become ``_``), e.g. ``heads/patch.max_effect``.
The key does not name the hypothesis, so the same experiment of two hypotheses (v1 and v2 of a
study) shares one key and lands on one chart of the MLflow UI. The same name is the folder of the
experiment's figures on the parent.

Also logged: the hypothesis's ``description`` as the parent's note (``mlflow.note.content``);
each table a second time with ``log_table`` (``<table>.json``, which the UI's evaluation view
compares across runs; MLflow writes it to 10 decimal places, the CSV stays exact); and, when
`log_experiment` is given the experiment's compute time, child run start/end times that span it
(end = when it was logged, start = end − compute time).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shlex
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mi_spec.analysis.report import ExperimentReport, StudyRecord
from mi_spec.errors import MiSpecError
from mi_spec.tracking.base import RunStatus, flatten_params, truncate

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "mi_spec"
BATCH_LIMIT = 100  # MLflow allows 100 params/tags per log_batch call
ERROR_TAG_LIMIT = 5000
KEY_LIMIT = 250  # MLflow's max param/metric/tag key length
TAG_VALUE_LIMIT = 5000  # under MLflow's 8000

KIND_TAG = "mi_spec.kind"
HYPOTHESIS_TAG = "mi_spec.hypothesis"
HEADLINE_TAG = "mi_spec.headline"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
CI_SUFFIXES = (".ci_low", ".ci_high")

_PROBE_TIMEOUT_S = 10.0


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """Explicit argument > ``MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db`` (current directory)."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def resolve_experiment(experiment: str | None = None) -> str:
    """Explicit argument > ``MLFLOW_EXPERIMENT_NAME`` > ``mi_spec``."""
    return experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def experiment_label(run_name: str, hypothesis: str) -> str:
    """A child run's name without its ``@<hypothesis>`` (``heads@induction`` → ``heads``,
    ``heads@induction#2`` → ``heads#2``); other names unchanged."""
    name, at, rest = run_name.rpartition("@")
    if at and hypothesis and (rest == hypothesis or rest.startswith(f"{hypothesis}#")):
        return name + rest[len(hypothesis) :]
    return run_name


def sanitize_name(name: str) -> str:
    """`name` as a file/prefix-safe token: characters outside ``[A-Za-z0-9_.-]`` become ``_``."""
    out = re.sub(r"[^A-Za-z0-9_.\-]", "_", name).strip(".")
    return out or "_"


def mlflow_key(key: str) -> str:
    """`key` made acceptable to MLflow as a param/metric/tag name (charset, no path tricks)."""
    s = re.sub(r"[^\w.\- /]", "_", key)
    s = "/".join(p for p in s.split("/") if p not in ("", ".", ".."))
    return s[:KEY_LIMIT] or "_"


class MlflowTracker:
    """Logs a study to MLflow. See the module docstring for the run/artifact layout.

    Attributes set by `start` (and kept after `finish`): `parent_run_id`, `experiment_id`;
    `child_run_ids` maps each logged child run's name to its id.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment = resolve_experiment(experiment)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._client: MlflowClient | None = None
        self._parent_open = False
        self._child_run_id: str | None = None
        self._child_names: set[str] = set()
        self.child_run_ids: dict[str, str] = {}
        self._study_tags: dict[str, str] = {}
        self._hypothesis = ""

    # -- lifecycle -------------------------------------------------------------------------

    def check(self) -> None:
        """Connect to the store (creating the experiment if needed); MiSpecError if unreachable."""
        if self._client is None:
            self._client = self._connect()

    def start(self, study: StudyRecord) -> None:
        """Check the store, open the parent run, log the study's params, tags, dataset, artifacts."""
        if self.parent_run_id is not None:
            raise RuntimeError("MlflowTracker.start called twice")
        self.check()
        tags = {mlflow_key(k): truncate(str(v), TAG_VALUE_LIMIT) for k, v in study.tags.items()}
        self._study_tags = {k: v for k, v in tags.items() if not k.startswith("mlflow.")}
        self._hypothesis = str(study.tags.get(HYPOTHESIS_TAG, study.name))
        description = str(study.params.get("description") or "")
        if description and NOTE_TAG not in tags:
            tags[NOTE_TAG] = truncate(description, TAG_VALUE_LIMIT)
        run = self._client.create_run(
            self.experiment_id, run_name=study.name, tags=resolve_tags(tags)
        )
        self.parent_run_id = run.info.run_id
        self._parent_open = True
        try:
            self._log_params(self.parent_run_id, flatten_params(study.params))
            if study.dataset:
                self._client.log_inputs(self.parent_run_id, [dataset_input(study.dataset)])
            self._log_files(self.parent_run_id, {n: t.encode() for n, t in study.artifacts.items()})
        except BaseException as e:
            with contextlib.suppress(Exception):  # never mask the original error
                self.finish("FAILED", error=f"{type(e).__name__}: {e}")
            raise

    def log_experiment(self, report: ExperimentReport, compute_s: float | None = None) -> None:
        """Log `report` as a finished child run; copy its headline metrics and figures to the parent.

        `compute_s`, the experiment's compute time (its jobs' seconds), makes the child run span
        that long, ending now; without it the run spans the logging itself.
        """
        client, parent = self._require_started()
        name = self._unique_child_name(report.name)
        end_ms = int(time.time() * 1000)
        start_ms = end_ms - round(compute_s * 1000) if compute_s is not None else None
        run = client.create_run(
            self.experiment_id,
            start_time=start_ms,
            run_name=name,
            tags={
                **self._study_tags,
                MLFLOW_PARENT_RUN_ID: parent,
                KIND_TAG: report.kind,
                "mi_spec.warnings": str(len(report.warnings)),
                HEADLINE_TAG: truncate(",".join(headline_names(report.headline)), TAG_VALUE_LIMIT),
            },
        )
        self._child_run_id = self.child_run_ids[name] = child = run.info.run_id
        try:
            self._log_params(child, flatten_params(report.params))
            self._log_metrics(child, report.metrics)
            self._log_series(child, report.series)
            self._log_files(child, _report_files(report))
            self._log_tables(child, report.tables)
            client.set_terminated(child, "FINISHED", end_time=None if start_ms is None else end_ms)
            self._child_run_id = None
            label = sanitize_name(experiment_label(name, self._hypothesis))
            self._log_metrics(parent, parent_headline(label, report.headline))
            figures = {f"{label}/{_png_name(n)}": b for n, b in report.figures.items()}
            self._log_files(parent, figures)
        except BaseException:
            self._end_child("FAILED")
            raise

    def finish(self, status: RunStatus, error: str | None = None) -> None:
        """End the open child (if any) and the parent with `status`; record `error` on FAILED.

        Idempotent, and a no-op before a successful `start`. Runs are always terminated, even
        when recording the error fails. A call cut short before the parent run was terminated
        (the store failed, or SIGTERM/Ctrl-C arrived meanwhile) leaves it open, so that a second
        call (``tracking`` then finishes it FAILED) still ends it.
        """
        if self._client is None or self.parent_run_id is None or not self._parent_open:
            return
        parent = self.parent_run_id
        try:
            if status == "FAILED" and error:
                self._client.set_tag(parent, "mi_spec.error", truncate(error, ERROR_TAG_LIMIT))
                self._log_files(parent, {"error.txt": error.encode()})
        finally:
            try:
                self._end_child(status)
            finally:
                self._client.set_terminated(parent, status)
                self._parent_open = False

    # -- links -----------------------------------------------------------------------------

    def run_url(self) -> str | None:
        """Where to look at the study's runs, or None before `start` / for other stores.

        http(s) stores: the UI URL of the experiment's runs table. sqlite/file stores: the
        ``mi-spec ui --tracking-uri <uri>`` command, then the same page on the local UI.
        """
        if self.experiment_id is None:
            return None
        fragment = f"#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"
        scheme = urlparse(self.tracking_uri).scheme
        if scheme in ("http", "https"):
            return f"{self.tracking_uri.rstrip('/')}/{fragment}"
        if scheme in ("sqlite", "file", "") or _is_windows_path(self.tracking_uri):
            cmd = f"mi-spec ui --tracking-uri {shlex.quote(self.tracking_uri)}"
            if self.experiment != DEFAULT_EXPERIMENT:
                cmd += f" --experiment {shlex.quote(self.experiment)}"
            return f"{cmd}  # then open http://127.0.0.1:5000/{fragment}"
        return None

    # -- internals -------------------------------------------------------------------------

    def _connect(self) -> MlflowClient:
        """A client whose store answered: the experiment exists (created if needed)."""
        uri = self.tracking_uri
        # MLflow prints "View run ..." per terminated run on http stores (and fetches the run to
        # do so); `run_url` gives the one link that matters, the runs table.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        try:
            check_sqlite_path(uri)
            probe_http(uri)
            client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._get_or_create_experiment(client)
        except MiSpecError:
            raise
        except Exception as e:
            raise MiSpecError(
                f"cannot use MLflow tracking store {uri!r}: {type(e).__name__}: {e}\n"
                "Point the tracking URI (or MLFLOW_TRACKING_URI) at a reachable store."
            ) from e
        return client

    def _get_or_create_experiment(self, client: MlflowClient) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return client.create_experiment(
                    self.experiment, artifact_location=self._default_artifact_location()
                )
            except MlflowException:
                exp = client.get_experiment_by_name(self.experiment)  # created concurrently
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise MiSpecError(
                f"MLflow experiment {self.experiment!r} is deleted in {self.tracking_uri!r}; "
                "restore it (mlflow experiments restore) or pick another experiment name."
            )
        return exp.experiment_id

    def _default_artifact_location(self) -> str | None:
        """For sqlite stores: ``<db dir>/mlartifacts/<experiment>``, so artifacts sit by the db."""
        parsed = urlparse(self.tracking_uri)
        if parsed.scheme != "sqlite" or parsed.path in ("", "/", "/:memory:"):
            return None
        db = Path(parsed.path[1:]).resolve()  # sqlite:///rel.db → "/rel.db"; ////abs → "//abs"
        return (db.parent / "mlartifacts" / sanitize_name(self.experiment)).as_uri()

    def _require_started(self) -> tuple[MlflowClient, str]:
        if self._client is None or self.parent_run_id is None or not self._parent_open:
            raise RuntimeError("MlflowTracker.log_experiment called outside start()/finish()")
        return self._client, self.parent_run_id

    def _unique_child_name(self, name: str) -> str:
        unique, i = name, 1
        while unique in self._child_names:
            i += 1
            unique = f"{name}#{i}"
        self._child_names.add(unique)
        return unique

    def _end_child(self, status: RunStatus) -> None:
        if self._child_run_id is not None and self._client is not None:
            child, self._child_run_id = self._child_run_id, None
            self._client.set_terminated(child, status)

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        entries = [Param(k, v) for k, v in {mlflow_key(k): v for k, v in params.items()}.items()]
        for chunk in _chunks(entries, BATCH_LIMIT):
            self._client.log_batch(run_id, params=chunk)

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        entries = [Metric(mlflow_key(k), float(v), now, 0) for k, v in metrics.items()]
        for chunk in _chunks(entries, BATCH_LIMIT):
            self._client.log_batch(run_id, metrics=chunk)

    def _log_series(self, run_id: str, series: Mapping[str, list[float]]) -> None:
        """Per-step metrics (training curves): value i is logged at step i."""
        now = int(time.time() * 1000)
        entries = [
            Metric(mlflow_key(k), float(v), now, step)
            for k, values in series.items()
            for step, v in enumerate(values)
        ]
        for chunk in _chunks(entries, BATCH_LIMIT):
            self._client.log_batch(run_id, metrics=chunk)

    def _log_tables(self, run_id: str, tables: Mapping[str, list[dict[str, Any]]]) -> None:
        """Each table as an MLflow table (``<name>.json``), comparable across runs in the UI."""
        for name, rows in tables.items():
            if rows:
                stem = name[:-4] if name.lower().endswith(".csv") else name
                self._client.log_table(run_id, _table_frame(rows), f"{sanitize_name(stem)}.json")

    def _log_files(self, run_id: str, files: Mapping[str, bytes]) -> None:
        """Upload `files` (relative path → bytes) in one call, keeping their folders."""
        if not files:
            return
        with tempfile.TemporaryDirectory(prefix="mi_spec_artifacts_") as tmp:
            for rel, data in files.items():
                path = Path(tmp, *(sanitize_name(p) for p in rel.split("/") if p))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            self._client.log_artifacts(run_id, tmp)


def parent_headline(experiment: str, headline: Mapping[str, float]) -> dict[str, float]:
    """Headline metrics as named on the parent: ``<experiment>/<metric>`` (see the module doc)."""
    return {mlflow_key(f"{experiment}/{k}"): v for k, v in headline.items()}


def headline_names(headline: Mapping[str, float]) -> list[str]:
    """The headline metrics' names as logged, without their CI companions, in order."""
    keys = [mlflow_key(k) for k in headline]
    return [k for k in keys if not k.endswith(CI_SUFFIXES)]


def dataset_input(dataset: Mapping[str, Any]) -> DatasetInput:
    """A `StudyRecord.dataset` as an MLflow dataset input (context ``eval``)."""
    columns = [
        {**kind, "name": name, "required": True}
        for name, kind in dataset.get("columns", {}).items()
    ]
    entity = Dataset(
        name=str(dataset["name"]),
        digest=str(dataset["digest"]),
        source_type=str(dataset["source_type"]),
        source=json.dumps(dataset["source"], default=str),
        schema=json.dumps({"mlflow_colspec": columns}) if columns else None,
        profile=json.dumps({"num_rows": int(dataset["n_rows"])}),
    )
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", "eval")])


def _report_files(report: ExperimentReport) -> dict[str, bytes]:
    """A report's artifacts: tables as CSV, figures as PNG, warnings as text."""
    files = {_suffixed(n, ".csv"): _csv_bytes(rows) for n, rows in report.tables.items()}
    files |= {_png_name(n): data for n, data in report.figures.items()}
    files |= dict(report.files)
    if report.warnings:
        files["warnings.txt"] = ("\n".join(report.warnings) + "\n").encode()
    return files


def _table_frame(rows: list[dict[str, Any]]) -> Any:
    """Rows as a pandas DataFrame, columns in first-seen order (as in the CSV)."""
    import pandas as pd

    columns = list(dict.fromkeys(k for row in rows for k in row))
    return pd.DataFrame.from_records(rows, columns=columns)


def _csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    """Rows as CSV; the header is the union of keys in first-seen order."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _suffixed(name: str, suffix: str) -> str:
    return name if name.lower().endswith(suffix) else name + suffix


def _png_name(name: str) -> str:
    return _suffixed(name, ".png")


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _is_windows_path(uri: str) -> bool:
    return bool(re.match(r"^[A-Za-z]:[\\/]", uri))


def check_sqlite_path(uri: str) -> None:
    """Fail fast (`MiSpecError`, one line) when a sqlite store cannot be a database file here.

    MLflow retries opening such a store for about two minutes: a directory instead of a file, a
    file where a folder of the path should be, a database or folder this user cannot write (sqlite
    writes its journal beside the database). A missing folder is fine: MLflow creates it.
    """
    parsed = urlparse(uri)
    raw = parsed.path[1:]  # sqlite:///rel.db -> "rel.db"; sqlite:////abs.db -> "/abs.db"
    if parsed.scheme != "sqlite" or raw in ("", ":memory:") or raw.startswith("file:"):
        return

    def fail(cause: str) -> None:
        raise MiSpecError(f"cannot use MLflow tracking store {uri!r}: {cause}")

    path = Path(raw)
    if path.is_dir():
        fail(f"{path} is a directory, not a database file (e.g. sqlite:///{path / 'mlflow.db'})")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # MLflow creates missing folders
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        fail(f"{folder} is a file, not a folder")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        fail(f"{path} is not writable by this user")
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        fail(f"the folder {folder} is not writable by this user")


def probe_http(uri: str) -> None:
    """Fail fast when an http(s) store refuses connections, instead of MLflow's long retries.

    Any HTTP answer counts as reachable; only connection errors and timeouts fail.
    """
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import requests

    timeout = min(float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")), _PROBE_TIMEOUT_S)
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise MiSpecError(
            f"cannot reach MLflow tracking server {uri!r}: {type(e).__name__}: {e}\n"
            "Is `mlflow server` running there? Otherwise point the tracking URI elsewhere."
        ) from e
