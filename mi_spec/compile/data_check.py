"""validate's promise: every row of the data is checked against what the plan will ask of it.

Token ids against the model's vocabulary, row lengths against its context, every role a job or the
metric uses (resolved in every row, the same number of positions in each), the metric's target and
wrong columns, counterfactual token columns and the high-level variables. A file that passes does
not fail in ``run`` because of its input. Each problem is located at the field that asked for it
and names the first few offending rows (all rows are checked, also rows a study does not sample).
Pure Python over the dataset: no model, no forward pass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mi_spec.data.positions import (
    BUILTIN,
    aligned,
    resolve_role,
    source_data,
    source_metric_positions,
)
from mi_spec.errors import MiSpecError, SpecIssue
from mi_spec.plan.ir import Plan
from mi_spec.spec.locate import issue_at

from .resolve import Study

MAX_LISTED = 5  # offending rows named per problem


@dataclass
class _Rows:
    """Offending rows of one check: row number -> what is wrong there."""

    what: str
    bad: dict[int, str] = field(default_factory=dict)
    whole: bool = False  # a problem of the field itself, not of particular rows

    @classmethod
    def field_problem(cls, what: str) -> _Rows:
        return cls(what, {0: ""}, whole=True)

    def add(self, row: int, detail: str) -> None:
        self.bad.setdefault(row, detail)

    def message(self, n_rows: int) -> str:
        """``what: rows 3, 7: detail; row 9: other detail; ... (N of M rows)``."""
        if self.whole:
            return self.what
        shown = list(self.bad.items())[:MAX_LISTED]
        groups: dict[str, list[int]] = {}
        for r, detail in shown:
            groups.setdefault(detail, []).append(r)
        parts = [
            f"row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}: {detail}"
            for detail, rows in groups.items()
        ]
        more = f"; ... ({len(self.bad)} of {n_rows} rows)" if len(self.bad) > MAX_LISTED else ""
        return f"{self.what}: {'; '.join(parts)}{more}"


def check_data(study: Study, plan: Plan) -> list[SpecIssue]:
    """Every problem the dataset would cause in ``run``, located in the hypothesis file."""
    issues = [
        issue_at(study.doc, where, found.message(len(study.data)))
        for where, found in [
            *_token_checks(study, plan),
            *_role_checks(study, plan),
            *_source_checks(study, plan),
        ]
        if found.bad
    ]
    issues += _variable_checks(study)
    return issues


def _data_field(study: Study) -> tuple[str, ...]:
    data = study.spec.data
    return ("data", "path" if data.path is not None else "generator")


def _token_checks(study: Study, plan: Plan) -> Iterator[tuple[tuple, _Rows]]:
    """Base rows and counterfactual token columns: ids in the vocabulary, lengths in context."""
    yield _data_field(study), _token_rows(study, study.data.tokens, "token ids")
    columns = sorted({j.source_column for j in plan.jobs if j.source_column})
    for column in columns:
        where = _first_mention(study, column) or ("experiments",)
        values = study.data.columns.get(column)
        found = _Rows(f"source column {column!r}")
        if values is None:
            columns = ", ".join(sorted(study.data.columns)) or "none"
            yield (
                where,
                _Rows.field_problem(f"no column {column!r} in the data; columns: {columns}"),
            )
            continue
        lists: list[Any] = []
        for r in range(len(values)):
            try:  # token ids, or text tokenized like the base text
                lists.append(study.data.token_rows(column, [r])[0])
            except MiSpecError as e:
                found.add(r, str(e).replace(f"data row {r}: column {column!r} ", ""))
                lists.append([])
        yield where, found
        yield where, _token_rows(study, lists, f"source column {column!r}")


def _token_rows(study: Study, rows: Iterable[Iterable[int]], what: str) -> _Rows:
    """Ids below the input embedding's size (when the model has one); lengths within context."""
    vocab, n_ctx = study.model.n_input_ids, study.model.n_ctx
    found = _Rows(f"{what} must lie in 0..{(vocab or 0) - 1} (the model's vocabulary)")
    too_long = _Rows(f"rows longer than the model's context of {n_ctx} tokens")
    for r, tokens in enumerate(rows):
        tokens = list(tokens)
        bad = [(p, t) for p, t in enumerate(tokens) if vocab and not 0 <= t < vocab]
        if bad:
            p, t = bad[0]
            found.add(
                r, f"{t} at position {p}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
            )
        if n_ctx is not None and len(tokens) > n_ctx:
            too_long.add(r, f"{len(tokens)} tokens")
    if too_long.bad and not found.bad:
        return too_long
    if too_long.bad:
        found.what += f"; and {len(too_long.bad)} rows are longer than the context ({n_ctx})"
    return found


def _role_checks(study: Study, plan: Plan) -> Iterator[tuple[tuple, _Rows]]:
    """Every role a job or the metric uses, in every row; the metric's columns."""
    metric = study.spec.metric
    positions = yield from _check_role(study, metric.at, ("metric", "at"), same_count=False)
    if metric.target is None and positions is not None:
        found = _Rows(f"metric {metric.kind} at {metric.at!r} scores the next token")
        every = metric.at == "all" and study.positions.get("all") == BUILTIN["all"]
        for r, ps in enumerate(positions):
            n = study.data.lengths[r]
            if every and n < 2:
                found.add(r, "1 token, so no next token anywhere")
            elif not every and ps and max(ps) + 1 >= n:
                found.add(r, f"no token after position {max(ps)} (length {n})")
        found.what += ", which these rows lack; score an earlier position or give metric.target"
        yield ("metric", "at"), found
    for name in ("target", "wrong"):
        column = getattr(metric, name)
        if column is not None and positions is not None:
            yield ("metric", name), _metric_column(study, column, positions)
    for role in sorted(_plan_roles(study, plan) - {metric.at}, key=str):
        where = _first_mention(study, role) or ("data", "positions", str(role))
        yield from _check_role(study, role, where)


def _check_role(
    study: Study, role: str | int, where: tuple, same_count: bool = True
) -> Iterator[tuple[tuple, _Rows]]:
    """Resolve ``role`` in every row; yields what failed, returns the positions (None if any
    failed). ``same_count``: the role must give every row the same number of positions."""
    if isinstance(role, str) and role not in study.positions:
        known = ", ".join(sorted(study.positions))
        yield where, _Rows.field_problem(f"unknown position {role!r}; named positions: {known}")
        return None
    found = _Rows(f"position {role!r}")
    out: list[list[int]] = []
    for r in range(len(study.data)):
        try:
            out.append(resolve_role(role, study.positions, study.data, [r])[0])
        except MiSpecError as e:
            found.add(r, str(e).replace(f"position {role!r} ", "").replace(f" in data row {r}", ""))
            out.append([])
    if found.bad:
        yield where, found
        return None
    counts: dict[int, list[int]] = {}
    for r, ps in enumerate(out):
        counts.setdefault(len(ps), []).append(r)
    if same_count and len(counts) > 1 and role != "all":
        mixed = _Rows(
            f"position {role!r} resolves to different numbers of positions across rows "
            f"({sorted(counts)}); a role must have the same shape in every row"
        )
        common = max(counts, key=lambda k: len(counts[k]))
        for k, rows in counts.items():
            for r in rows if k != common else ():
                mixed.add(r, f"{k} positions (most rows: {common})")
        yield where, mixed
        return None
    return out


def _source_checks(study: Study, plan: Plan) -> Iterator[tuple[tuple, _Rows]]:
    """Every (base row, source) pair a job patches: each intervention role lines up (as many
    positions in both; every-position patches need equal lengths) and the source run can be
    scored (the metric role resolves in the source)."""
    table, data, metric = study.positions, study.data, study.spec.metric
    index = {e.label: i for i, e in enumerate(study.spec.experiments)}
    seen: dict[tuple, _Rows] = {}
    for job in plan.jobs:
        if job.source not in ("rows", "column") or job.experiment not in index:
            continue
        where = ("experiments", index[job.experiment])
        column = job.source_column if job.source == "column" else None
        try:
            src, src_rows = source_data(data, table, list(job.rows), column, job.source_rows)
        except MiSpecError:
            continue  # reported by the source column's own check
        roles = {i.pos for v in job.variants for i in v.interventions}
        for r, s in zip(job.rows, src_rows, strict=True):
            for role in sorted(roles, key=str):
                key = (*where, "role", str(role))
                if role is None:
                    found = seen.setdefault(key, _Rows(_WHOLE))
                    if data.lengths[r] != src.lengths[s]:
                        found.add(r, f"{data.lengths[r]} tokens, its source {src.lengths[s]}")
                    continue
                found = seen.setdefault(key, _Rows(f"source of position {role!r}"))
                try:
                    aligned(role, table, data, [r], src, [s])
                except MiSpecError as e:
                    found.add(r, _short(str(e), r))
            if job.op in ("patch", "path_patch", "attribution"):
                found = seen.setdefault((*where, "metric"), _Rows("the source run's metric"))
                try:
                    source_metric_positions(metric, table, data, [r], src, [s])
                except MiSpecError as e:
                    found.add(r, _short(str(e), r))
    for key, found in seen.items():
        yield key[:2], found


_WHOLE = (
    "patching every position ('all') from a source of another length would shift positions; "
    "patch roles (named positions), which align by role"
)


def _short(message: str, row: int) -> str:
    """An error message about data row ``row`` without the row (the report names it)."""
    return message.replace(f" in data row {row}", "").replace(f"data row {row}", "the row")


def _metric_column(study: Study, column: str, positions: list[list[int]]) -> _Rows:
    found = _Rows(f"metric column {column!r} must hold a token id (or one per position)")
    values = study.data.columns.get(column)
    if values is None:
        columns = ", ".join(sorted(study.data.columns)) or "none"
        return _Rows.field_problem(f"no column {column!r} in the data; columns: {columns}")
    if study.spec.metric.numeric:  # mse/mae: a number per row (or per position)
        found = _Rows(f"metric column {column!r} must hold a number (or one per position)")
        for r, (value, ps) in enumerate(zip(values, positions, strict=True)):
            nums = value if isinstance(value, list) else [value]
            ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in nums)
            if not ok or (isinstance(value, list) and len(nums) != len(ps)):
                found.add(r, f"found {str(value)[:40]!r} for {len(ps)} position(s)")
        return found
    vocab = study.dims.d_vocab
    for r, (value, ps) in enumerate(zip(values, positions, strict=True)):
        ids = value if isinstance(value, list) else [value]
        if study.data.encode is not None:  # text targets: one token each
            try:
                ids = [study.data.token_id(v, "") if isinstance(v, str) else v for v in ids]
            except MiSpecError as e:
                found.add(r, str(e).lstrip(": "))
                continue
        if not all(_is_id(v) for v in ids) or (isinstance(value, list) and len(ids) != len(ps)):
            found.add(r, f"found {str(value)[:40]!r} for {len(ps)} position(s)")
        elif not all(0 <= v < vocab for v in ids):
            found.add(r, f"{value!r} is outside the vocabulary 0..{vocab - 1}")
    return found


def _variable_checks(study: Study) -> list[SpecIssue]:
    """Each high-level variable evaluated on every row: the first failure per variable."""
    if study.causal is None or not study.causal.order:
        return []
    failed: dict[tuple, SpecIssue] = {}
    for r in range(len(study.data)):
        try:
            study.causal.compute(study.data.row(r))
        except MiSpecError as e:
            where = ("variables", *getattr(e, "field", ()))
            if where not in failed:
                failed[where] = issue_at(study.doc, where, f"data row {r}: {e}")
            if len(failed) >= len(study.causal.order):
                break
    return list(failed.values())


def _plan_roles(study: Study, plan: Plan) -> set[str | int]:
    """Roles the jobs name: intervention positions and role names inside op params."""
    roles: set[str | int] = set()
    for job in plan.jobs:
        for variant in job.variants:
            roles |= {i.pos for i in variant.interventions if i.pos is not None}
        roles |= {s for s in _strings(job.params) if s in study.positions}
    return roles


def _first_mention(study: Study, value: str | int) -> tuple | None:
    """The field path of the first experiment field naming ``value`` (alone or as ``site@value``)."""
    for i, exp in enumerate(study.spec.experiments):
        for path, leaf in _leaves(exp.model_dump(mode="json"), ("experiments", i)):
            if leaf == value or (isinstance(leaf, str) and leaf.endswith(f"@{value}")):
                return path
    return None


def _leaves(obj: Any, path: tuple) -> Iterator[tuple[tuple, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    else:
        yield path, obj


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _strings(obj: Any) -> set[str]:
    """Every string in JSON-able ``obj`` (keys included). Through one ``json.dumps``: a scrub
    job's params hold millions of ints, too many to walk in Python."""
    return {json.loads(m) for m in _JSON_STRING.findall(json.dumps(obj, default=str))}


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
