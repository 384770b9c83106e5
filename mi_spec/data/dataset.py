"""Datasets: rows of token ids plus named columns, from a generator or a .jsonl/.csv file.

Torch-free: the executor turns rows into tensors. A dataset is deterministic for its spec, so a
Plan carries row indices and the data hash, never the data itself.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from mi_spec.errors import ResolveError
from mi_spec.spec.refs import call_ref, import_ref
from mi_spec.spec.sections import DataSection


@dataclass(frozen=True, eq=False)
class Dataset:
    """Token rows (unpadded) and per-row columns. ``pad_id`` fills right padding."""

    tokens: tuple[tuple[int, ...], ...]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i`` as a dict: its columns plus ``tokens``."""
        return {"tokens": list(self.tokens[i]), **{k: v[i] for k, v in self.columns.items()}}

    def padded(self, rows: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        """Right-padded token ids and attention mask for ``rows``."""
        width = max(len(self.tokens[r]) for r in rows)
        ids = [list(self.tokens[r]) + [self.pad_id] * (width - len(self.tokens[r])) for r in rows]
        mask = [[1] * len(self.tokens[r]) + [0] * (width - len(self.tokens[r])) for r in rows]
        return ids, mask

    def content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([list(t) for t in self.tokens]).encode())
        h.update(json.dumps(self.columns, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]


def load_dataset(section: DataSection, base_dir: Path, model_dir: str | None = None) -> Dataset:
    """Materialize the dataset a data section describes (cached per process)."""
    return _load(section.model_dump_json(), str(base_dir), model_dir)


@lru_cache(maxsize=8)
def _load(section_json: str, base_dir: str, model_dir: str | None) -> Dataset:
    section = DataSection.model_validate_json(section_json)
    rows = _read_rows(section, Path(base_dir))
    if section.limit is not None:
        rows = rows[: section.limit]
    if not rows:
        raise ResolveError("the dataset has no rows")
    if section.text is not None:
        tokens, pad_id = _tokenize(rows, section, Path(base_dir), model_dir)
    else:
        tokens, pad_id = [_token_list(r, section.tokens, i) for i, r in enumerate(rows)], 0
    names = sorted({k for r in rows for k in r} - {section.tokens})
    columns = {k: [r.get(k) for r in rows] for k in names}
    return Dataset(tuple(tuple(t) for t in tokens), columns, pad_id)


def _read_rows(section: DataSection, base_dir: Path) -> list[dict[str, Any]]:
    if section.generator is not None:
        try:
            fn = import_ref(section.generator, search=[base_dir])
        except ResolveError as e:
            raise ResolveError(str(e), ("generator",)) from None
        rows = call_ref(
            fn, section.generator, "data.generator", section.params, ("generator",), ("params",)
        )
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ResolveError(
                f"data.generator {section.generator} must return a list of row dicts, "
                f"got {type(rows).__name__}",
                ("generator",),
            )
        return rows
    path = resolve_path(section.path or "", base_dir)
    if path.is_dir():
        raise ResolveError(
            f"data.path {path} is a directory, expected a .jsonl or .csv file", ("path",)
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ResolveError(f"{path}:{line}: not UTF-8 text ({e.reason})", ("path",)) from None
    except OSError as e:
        raise ResolveError(f"cannot read {path}: {e.strerror or e}", ("path",)) from None
    if path.suffix == ".jsonl":
        return _jsonl_rows(text, path)
    return _csv_rows(text, path)


def _jsonl_rows(text: str, path: Path) -> list[dict[str, Any]]:
    """One JSON object per non-blank line; a bad line is an error naming the file and line."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ResolveError(
                f"{path}:{number}:{e.colno}: invalid JSON ({e.msg}); each line must be one "
                "JSON object",
                ("path",),
            ) from None
        if not isinstance(row, dict):
            raise ResolveError(
                f"{path}:{number}: expected a JSON object (a row), found {type(row).__name__}",
                ("path",),
            )
        rows.append(row)
    return rows


def _csv_rows(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        for row in reader:
            if None in row:  # more cells than the header has names
                raise ResolveError(
                    f"{path}:{reader.line_num}: {len(row[None]) + len(reader.fieldnames or [])} "
                    f"cells, but the header names {len(reader.fieldnames or [])} columns",
                    ("path",),
                )
            rows.append({k: _parse_cell(v) for k, v in row.items()})
        return rows
    except csv.Error as e:
        raise ResolveError(f"{path}:{reader.line_num}: invalid CSV ({e})", ("path",)) from None


def resolve_path(path: str, base_dir: Path, field: str = "path") -> Path:
    """A path relative to the hypothesis file's folder (absolute paths pass through)."""
    p = Path(path)
    p = p if p.is_absolute() else base_dir / p
    if not p.exists():
        raise ResolveError(f"file not found: {p}", (field,))
    return p


def _parse_cell(value: str) -> Any:
    """CSV cells: JSON where they parse (lists, numbers), else the string."""
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def _token_list(row: dict[str, Any], column: str, i: int) -> list[int]:
    value = row.get(column)
    if isinstance(value, str):
        value = [int(t) for t in value.split()]
    if not isinstance(value, list) or not value or not all(isinstance(t, int) for t in value):
        raise ResolveError(
            f"data row {i}: column {column!r} must be a non-empty list of token ids, "
            f"found {str(value)[:60]!r}"
        )
    return value


def _tokenize(
    rows: list[dict[str, Any]], section: DataSection, base_dir: Path, model_dir: str | None
) -> tuple[list[list[int]], int]:
    from transformers import AutoTokenizer  # heavy: only for text datasets

    where = section.tokenizer or model_dir
    if where is None:
        raise ResolveError("data.text needs data.tokenizer (a local directory) or an hf model")
    directory = resolve_path(where, base_dir, "tokenizer") if section.tokenizer else Path(where)
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # a folder without tokenizer files, a corrupt one, ...
        raise ResolveError(
            f"cannot load a tokenizer from {directory}: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}",
            ("tokenizer",) if section.tokenizer else (),
        ) from None
    texts = [str(r.get(section.text or "")) for r in rows]
    tokens = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return tokens, int(pad)
