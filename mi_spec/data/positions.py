"""Named positions are roles, resolved per row from its own length and columns.

A role that does not resolve in some row (out of range, missing column) is an error naming the row,
never a silent shift. Every row must resolve a role to the same number of positions, so batched
interventions line base and source up role by role.
"""

from __future__ import annotations

from mi_spec.data.dataset import Dataset
from mi_spec.errors import ResolveError
from mi_spec.spec.sections import PosColumn, PositionSpec, PosRange

BUILTIN: dict[str, PositionSpec] = {"last": -1, "all": PosRange(start=0)}


def position_table(named: dict[str, PositionSpec]) -> dict[str, PositionSpec]:
    """The data section's named positions plus the built-ins (user names win)."""
    return {**BUILTIN, **named}


def resolve_role(
    name: str | int, table: dict[str, PositionSpec], data: Dataset, rows: list[int]
) -> list[list[int]]:
    """Positions of role ``name`` for each row in ``rows`` (absolute indices, same count per row)."""
    if isinstance(name, int):
        spec: PositionSpec = name
    elif name in table:
        spec = table[name]
    else:
        raise ResolveError(
            f"unknown position {name!r}; named positions: {', '.join(sorted(table))}"
        )
    out = [_resolve_one(spec, data, r, name) for r in rows]
    counts = {len(p) for p in out}
    if len(counts) > 1 and name != "all":
        raise ResolveError(
            f"position {name!r} resolves to different numbers of positions across rows "
            f"({sorted(counts)}); a role must have the same shape in every row"
        )
    return out


def _resolve_one(spec: PositionSpec, data: Dataset, row: int, name: str | int) -> list[int]:
    n = data.lengths[row]
    if isinstance(spec, int):
        raw = [spec]
    elif isinstance(spec, PosRange):
        start = spec.start + n if spec.start < 0 else spec.start
        stop = n if spec.stop is None else (spec.stop + n if spec.stop < 0 else spec.stop)
        raw = list(range(start, stop))
        if not raw:
            raise ResolveError(f"position {name!r} is empty in data row {row} (length {n})")
    else:
        raw = _column_positions(spec, data, row, name)
    out = [p + n if p < 0 else p for p in raw]
    bad = [p for p in out if not 0 <= p < n]
    if bad:
        raise ResolveError(
            f"position {name!r} resolves to {bad} in data row {row}, outside its {n} tokens"
        )
    return out


def _column_positions(spec: PosColumn, data: Dataset, row: int, name: str | int) -> list[int]:
    if spec.column not in data.columns:
        raise ResolveError(
            f"position {name!r}: no column {spec.column!r}; columns: {', '.join(data.columns)}"
        )
    value = data.columns[spec.column][row]
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) for v in values):
        raise ResolveError(
            f"position {name!r}: column {spec.column!r} in row {row} must hold int(s), "
            f"found {value!r}"
        )
    return values
