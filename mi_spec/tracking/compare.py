"""``mi-spec compare``: experiment runs from an MLflow store as rows, rendered as a table, CSV
or JSON.

One row per experiment (child) run, newest first: run name, hypothesis, kind, status, start time,
metrics (the run's headline metrics by default, see ``mi_spec.headline``) with their CIs, and the
parent run id.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mlflow.tracking import MlflowClient

from mi_spec.errors import MiSpecError
from mi_spec.tracking.mlflow_tracker import (
    CI_SUFFIXES,
    DEFAULT_EXPERIMENT,
    HEADLINE_TAG,
    HYPOTHESIS_TAG,
    KIND_TAG,
    experiment_label,
    probe_http,
    resolve_tracking_uri,
)

FORMATS = ("table", "csv", "json")
FIXED = ("run", "hypothesis", "kind", "status", "start_time")
PAGE = 1000  # runs per search request
MAX_CELL = 32  # table cells longer than this are cut, ending in "…"
_GLOB = set("*?[")


@dataclass
class Query:
    """Which runs, and which of their metrics. Empty filters match everything.

    ``hypotheses`` and ``kinds`` are names or shell globs (any one matches); ``tags`` must all
    match exactly; ``metrics`` are globs over metric names (the CI companions follow their metric).
    """

    experiment: str = DEFAULT_EXPERIMENT
    hypotheses: Sequence[str] = ()
    kinds: Sequence[str] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    metrics: Sequence[str] = ()
    all_metrics: bool = False


@dataclass
class Row:
    """One experiment run: fixed fields, metrics as name -> (estimate, ci_low, ci_high)."""

    run_id: str
    run: str
    hypothesis: str
    kind: str
    status: str
    start_time: datetime | None
    parent_run_id: str
    metrics: dict[str, tuple[float, float | None, float | None]]

    def flat(self) -> dict[str, Any]:
        """The row as one flat mapping: ``x``, ``x.ci_low``, ``x.ci_high`` per metric."""
        out: dict[str, Any] = {
            "run": self.run,
            "hypothesis": self.hypothesis,
            "kind": self.kind,
            "status": self.status,
            "start_time": self.start_time.isoformat() if self.start_time else None,
        }
        for name, (est, low, high) in self.metrics.items():
            out[name] = est
            if low is not None:
                out[f"{name}.ci_low"] = low
            if high is not None:
                out[f"{name}.ci_high"] = high
        out["run_id"] = self.run_id
        out["parent_run_id"] = self.parent_run_id
        return out


def parse_tags(items: Iterable[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; MiSpecError on an item without ``=``."""
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MiSpecError(f"--tag {item!r}: expected KEY=VALUE, e.g. mi_spec.runner=local")
        tags[key.strip()] = value.strip()
    return tags


def fetch_rows(tracking_uri: str | None, query: Query) -> list[Row]:
    """Experiment runs matching `query`, newest first. MiSpecError if the store is unreachable."""
    uri = resolve_tracking_uri(tracking_uri)
    client = open_store(uri)
    try:
        exp = client.get_experiment_by_name(query.experiment)
        if exp is None:
            return []
        runs = _search(client, exp.experiment_id, _filter_string(query))
    except MiSpecError:
        raise
    except Exception as e:
        raise MiSpecError(
            f"cannot read MLflow tracking store {uri!r}: {type(e).__name__}: {e}"
        ) from e
    rows = [_row(run, query) for run in runs]
    return [r for r in rows if _matches(r, query)]


def open_store(uri: str) -> MlflowClient:
    """A client for an existing store: http(s) stores must answer, sqlite files must exist
    (so that looking never creates an empty store)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = sqlite_path(uri)
        if path is not None and not path.exists():
            raise MiSpecError(
                f"no MLflow store at {path} (tracking URI {uri!r}); run `mi-spec run` first, "
                "or pass --tracking-uri (or set MLFLOW_TRACKING_URI)"
            )
    elif parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path) if parsed.scheme else uri)
        if not path.exists():
            raise MiSpecError(f"no MLflow store at {path} (tracking URI {uri!r})")
    probe_http(uri)
    return MlflowClient(tracking_uri=uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for in-memory databases)."""
    path = urlparse(uri).path
    if path in ("", "/", "/:memory:"):
        return None
    return Path(unquote(path[1:]))  # sqlite:///rel.db -> "/rel.db"; sqlite:////abs -> "//abs"


def _filter_string(query: Query) -> str:
    """Server-side filter: experiment runs only, plus the exact single-valued filters."""
    clauses = [f"tags.`{KIND_TAG}` LIKE '%'"]
    exact = dict(query.tags)
    for key, values in ((HYPOTHESIS_TAG, query.hypotheses), (KIND_TAG, query.kinds)):
        if len(values) == 1 and not _GLOB & set(values[0]):
            exact.setdefault(key, values[0])
    return " AND ".join(clauses + [tag_clause(k, v) for k, v in exact.items()])


def tag_clause(key: str, value: str) -> str:
    """``tags.`key` = 'value'`` in MLflow's search syntax, which has no escape character: the
    key goes in backticks or double quotes, the value in single or double quotes, whichever it
    does not contain; MiSpecError when it contains both."""
    key_q = next((q for q in '`"' if q not in key), None)
    value_q = next((q for q in "'\"" if q not in value), None)
    if key_q is None or value_q is None:
        raise MiSpecError(
            f"--tag {key}={value}: MLflow's search syntax cannot quote a tag "
            + ('name holding both ` and "' if key_q is None else "value holding both ' and \"")
            + "; filter on another tag"
        )
    return f"tags.{key_q}{key}{key_q} = {value_q}{value}{value_q}"


def _search(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string,
            max_results=PAGE,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _row(run: Any, query: Query) -> Row:
    tags, metrics = run.data.tags, run.data.metrics
    names = _metric_names(metrics, tags.get(HEADLINE_TAG, ""), query)
    start = run.info.start_time
    return Row(
        run_id=run.info.run_id,
        run=run.info.run_name or run.info.run_id,
        hypothesis=tags.get(HYPOTHESIS_TAG, ""),
        kind=tags.get(KIND_TAG, ""),
        status=run.info.status,
        start_time=datetime.fromtimestamp(start / 1000, tz=UTC) if start else None,
        parent_run_id=tags.get("mlflow.parentRunId", ""),
        metrics={
            n: (metrics[n], metrics.get(f"{n}.ci_low"), metrics.get(f"{n}.ci_high")) for n in names
        },
    )


def _metric_names(metrics: Mapping[str, float], headline: str, query: Query) -> list[str]:
    """Headline names (as tagged), or every metric matching ``--metric`` / ``--all-metrics``."""
    base = [k for k in metrics if not k.endswith(CI_SUFFIXES)]
    if query.all_metrics:
        return sorted(base)
    if query.metrics:
        return sorted(k for k in base if any(fnmatch.fnmatchcase(k, g) for g in query.metrics))
    return [k for k in headline.split(",") if k in metrics]


def _matches(row: Row, query: Query) -> bool:
    if query.hypotheses and not any(
        fnmatch.fnmatchcase(row.hypothesis, h) for h in query.hypotheses
    ):
        return False
    return not query.kinds or any(fnmatch.fnmatchcase(row.kind, k) for k in query.kinds)


# -- rendering -------------------------------------------------------------------------------


def render(rows: Sequence[Row], fmt: str, width: int | None = None) -> str:
    """`rows` as ``table`` (fits `width` columns, default: the terminal's), ``csv`` or ``json``."""
    if fmt == "json":
        return json.dumps([r.flat() for r in rows], indent=2)
    if fmt == "csv":
        return _csv(rows)
    if fmt == "table":
        return _tables(rows, width or shutil.get_terminal_size((120, 24)).columns)
    raise MiSpecError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _csv(rows: Sequence[Row]) -> str:
    flats = [r.flat() for r in rows]
    fields = list(FIXED)
    fields += [k for k in dict.fromkeys(k for f in flats for k in f) if k not in fields]
    fields = [k for k in fields if k not in ("run_id", "parent_run_id")]
    fields += ["run_id", "parent_run_id"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(flats)
    return buf.getvalue()


def _tables(rows: Sequence[Row], width: int) -> str:
    """One table per experiment kind (so each has only its own metric columns)."""
    by_kind: dict[str, list[Row]] = {}
    for r in rows:
        by_kind.setdefault(r.kind, []).append(r)
    parts = []
    for kind, group in by_kind.items():
        n = len(group)
        parts.append(f"{kind} ({n} run{'s' if n != 1 else ''})")
        parts.append(_table(group, width))
    return "\n\n".join(parts)


Column = tuple[str, list[str]]  # header, cells (already cut to MAX_CELL)


def _table(rows: Sequence[Row], width: int) -> str:
    """Experiment (the run name less its hypothesis), hypothesis, status, start, parent id, then
    the metrics; metric columns that do not fit in `width` go to panels below, each led by the
    experiment and hypothesis columns (so v1's rows stay apart from v2's)."""
    started = [
        r.start_time.astimezone().strftime("%Y-%m-%d %H:%M") if r.start_time else "" for r in rows
    ]
    lead = [
        _column("experiment", [experiment_label(r.run, r.hypothesis) for r in rows]),
        _column("hypothesis", [r.hypothesis for r in rows]),
    ]
    group = [
        *lead,
        _column("status", [r.status for r in rows]),
        _column("started", started),
        _column("parent", [r.parent_run_id[:8] for r in rows]),
    ]
    names = list(dict.fromkeys(m for r in rows for m in r.metrics))
    panels = []
    for name in names:
        col = _column(name, [_estimate(r.metrics.get(name)) for r in rows])
        if len(group) > len(lead) and _width([*group, col]) > width:
            panels.append(group)
            group = list(lead)
        group.append(col)
    panels.append(group)
    return "\n\n".join(_lines(p) for p in panels)


def _column(header: str, cells: list[str]) -> Column:
    return header, [c if len(c) <= MAX_CELL else c[: MAX_CELL - 1] + "…" for c in cells]


def _estimate(value: tuple[float, float | None, float | None] | None) -> str:
    if value is None:
        return ""
    est, low, high = value
    if low is None or high is None:
        return _num(est)
    return f"{_num(est)} [{_num(low)}, {_num(high)}]"


def _num(x: float) -> str:
    """4 significant digits, trailing zeros kept (1.000, 0.02950, 4.730, 1235)."""
    return f"{x:#.4g}".rstrip(".")


def _col_width(col: Column) -> int:
    return max([len(col[0]), *(len(c) for c in col[1])])


def _width(cols: Sequence[Column]) -> int:
    return sum(_col_width(c) for c in cols) + 2 * (len(cols) - 1)


def _lines(cols: Sequence[Column]) -> str:
    widths = [_col_width(c) for c in cols]
    table = [[c[0] for c in cols], ["-" * w for w in widths]]
    table += [list(cells) for cells in zip(*(c[1] for c in cols), strict=True)]
    lines = ("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)) for line in table)
    return "\n".join(line.rstrip() for line in lines)
