"""Named positions are roles, resolved per row from its own length and columns.

A role that does not resolve in some row (out of range, missing column) is an error naming the row,
never a silent shift. Roles an intervention uses must resolve to the same number of positions in
every row; a metric role may differ per row (``all``, ranges over rows of different lengths).

Sources are aligned by role: a role resolves in the base row *and* in its source (another row, or a
counterfactual of another length), and the source's k-th position of the role is patched into the
base's k-th. An int or range role resolves by each row's own length (``-1`` is the last token of
each); a column role reads its ``counterfactual`` column in counterfactual rows, and without one is
defined only where the counterfactual has its base row's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mi_spec.data.dataset import Dataset
from mi_spec.errors import ResolveError
from mi_spec.spec.sections import MetricSection, PosColumn, PositionSpec, PosRange

BUILTIN: dict[str, PositionSpec] = {"last": -1, "all": PosRange(start=0)}


def position_table(named: dict[str, PositionSpec]) -> dict[str, PositionSpec]:
    """The data section's named positions plus the built-ins (user names win)."""
    return {**BUILTIN, **named}


def resolve_role(
    name: str | int,
    table: dict[str, PositionSpec],
    data: Dataset,
    rows: Sequence[int],
    same_count: bool = True,
) -> list[list[int]]:
    """Positions of role ``name`` for each row in ``rows`` (indices into each row's tokens).

    ``same_count``: every row must give the same number of positions (what an intervention
    needs); metrics pass False and score each row over its own positions.
    """
    spec = role_spec(name, table)
    out = [_resolve_one(spec, data, r, name) for r in rows]
    counts = {len(p) for p in out}
    if same_count and len(counts) > 1 and name != "all":
        raise ResolveError(
            f"position {name!r} resolves to different numbers of positions across rows "
            f"({sorted(counts)}); a role an intervention uses must have the same shape in "
            "every row"
        )
    return out


def role_spec(name: str | int, table: dict[str, PositionSpec]) -> PositionSpec:
    if isinstance(name, int):
        return name
    if name in table:
        return table[name]
    raise ResolveError(f"unknown position {name!r}; named positions: {', '.join(sorted(table))}")


def source_data(
    data: Dataset,
    table: dict[str, PositionSpec],
    rows: Sequence[int],
    column: str | None,
    source_rows: Sequence[int],
) -> tuple[Dataset, list[int]]:
    """The source input of base ``rows`` as (dataset, its rows): the counterfactual rows of
    ``column`` (token ids or text), or the dataset's ``source_rows``."""
    if column is None:
        return data, list(source_rows)
    tokens = data.token_rows(column, rows)
    columns = {k: [v[r] for r in rows] for k, v in data.columns.items()}
    for spec in table.values():
        if not isinstance(spec, PosColumn) or spec.column not in data.columns:
            continue
        if spec.counterfactual is not None and spec.counterfactual in data.columns:
            columns[spec.column] = [data.columns[spec.counterfactual][r] for r in rows]
        else:
            columns[spec.column] = [
                v if len(t) == data.lengths[r] else Unaligned(len(t), data.lengths[r])
                for v, t, r in zip(columns[spec.column], tokens, rows, strict=True)
            ]
    return (
        Dataset(
            tuple(tuple(t) for t in tokens),
            columns,
            data.pad_id,
            data.padding_side,
            data.encode,
            origin=tuple(rows),
        ),
        list(range(len(rows))),
    )


def aligned(
    name: str | int | None,
    table: dict[str, PositionSpec],
    base: Dataset,
    rows: Sequence[int],
    src: Dataset,
    src_rows: Sequence[int],
) -> None:
    """Check role ``name`` (None: every position) lines up in each base row and its source: the
    same number of positions (for None: the same length). An error names the first bad row."""
    if name is None:
        for r, s in zip(rows, src_rows, strict=True):
            if base.lengths[r] != src.lengths[s]:
                raise ResolveError(
                    f"patching every position of data row {r} ({base.lengths[r]} tokens) from "
                    f"{src.where(s)} ({src.lengths[s]} tokens) would shift positions; patch "
                    "named positions (roles), which align by role"
                )
        return
    mine = resolve_role(name, table, base, rows)
    theirs = resolve_role(name, table, src, src_rows)
    for r, s, a, b in zip(rows, src_rows, mine, theirs, strict=True):
        if len(a) != len(b):
            raise ResolveError(
                f"position {name!r} has {len(a)} position(s) in data row {r} but {len(b)} in "
                f"{src.where(s)}; a role must have as many positions in the source as in the base"
            )


@dataclass(frozen=True)
class Unaligned:
    """A column role's value in a counterfactual row of another length (no position known)."""

    length: int
    base_length: int


def _resolve_one(spec: PositionSpec, data: Dataset, row: int, name: str | int) -> list[int]:
    n = data.lengths[row]
    if isinstance(spec, int):
        raw = [spec]
    elif isinstance(spec, PosRange):
        start = spec.start + n if spec.start < 0 else spec.start
        stop = n if spec.stop is None else (spec.stop + n if spec.stop < 0 else spec.stop)
        raw = list(range(start, stop))
        if not raw:
            raise ResolveError(f"position {name!r} is empty in {data.where(row)} (length {n})")
    else:
        raw = _column_positions(spec, data, row, name)
    out = [p + n if p < 0 else p for p in raw]
    bad = [p for p in out if not 0 <= p < n]
    if bad:
        raise ResolveError(
            f"position {name!r} resolves to {bad} in {data.where(row)}, outside its {n} tokens"
        )
    return out


def _column_positions(spec: PosColumn, data: Dataset, row: int, name: str | int) -> list[int]:
    if spec.column not in data.columns:
        raise ResolveError(
            f"position {name!r}: no column {spec.column!r}; columns: {', '.join(data.columns)}"
        )
    value = data.columns[spec.column][row]
    if isinstance(value, Unaligned):
        raise ResolveError(
            f"position {name!r} (column {spec.column!r}) is not known in {data.where(row)}: it "
            f"has {value.length} tokens, its base row {value.base_length}; give "
            f"data.positions.{name}.counterfactual: <column with its positions there>"
        )
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) for v in values):
        raise ResolveError(
            f"position {name!r}: column {spec.column!r} in {data.where(row)} must hold int(s), "
            f"found {value!r}"
        )
    return values


def metric_positions(
    metric: MetricSection, table: dict[str, PositionSpec], data: Dataset, rows: Sequence[int]
) -> list[list[int]]:
    """The positions the metric scores in each row (counts may differ per row). For a next-token
    target, ``all`` means every position that has a next token; any other role must have one."""
    pos = resolve_role(metric.at, table, data, rows, same_count=False)
    if metric.target is not None:
        return pos
    every = metric.at == "all" and table.get("all") == BUILTIN["all"]
    out = []
    for r, ps in zip(rows, pos, strict=True):
        n = data.lengths[r]
        if every:
            ps = [p for p in ps if p + 1 < n]
        if not ps:
            raise ResolveError(
                f"metric {metric.kind} at 'all': {data.where(r)} has 1 token, so no next token "
                "to score"
            )
        if max(ps) + 1 >= n:
            raise ResolveError(
                f"metric {metric.kind} at {metric.at!r}: {data.where(r)} has no next token after "
                f"position {max(ps)}; score an earlier position or give metric.target"
            )
        out.append(ps)
    return out


def source_metric_positions(
    metric: MetricSection,
    table: dict[str, PositionSpec],
    base: Dataset,
    rows: Sequence[int],
    src: Dataset,
    src_rows: Sequence[int],
) -> tuple[list[list[int]], list[bool]]:
    """Where the source run is scored, aligned by role, row by row: (positions in each source
    row, whether they score the base row's targets). Where the metric role has as many positions
    in the source as in the base, the source is scored on the base's targets; otherwise (``all``
    over a prompt of another length) a next-token metric scores the source's own next tokens, and
    any other metric is an error naming the row."""
    mine = metric_positions(metric, table, base, rows)
    theirs = metric_positions(metric, table, src, src_rows)
    same = [len(a) == len(b) for a, b in zip(mine, theirs, strict=True)]
    if all(same) or (metric.target is None and metric.kind != "kl"):
        return theirs, same
    i = same.index(False)
    raise ResolveError(
        f"metric {metric.kind} at {metric.at!r} scores {len(mine[i])} position(s) in data row "
        f"{rows[i]} but {len(theirs[i])} in its source, {src.where(src_rows[i])}: the source run "
        "cannot be scored on the base's targets; use a role with as many positions in both"
    )
