"""Datasets: rows of token ids plus named columns, from a generator or a data file.

Files: ``.jsonl``, ``.csv``, ``.parquet`` or a Hugging Face ``datasets`` folder (``save_to_disk``,
read offline with pyarrow). ``data.columns`` maps the names a hypothesis uses to the file's columns.
Text rows are tokenized once at load; a counterfactual column may hold text too, tokenized with the
same tokenizer and flags on first use (``Dataset.token_rows``). Torch-free: the executor turns rows
into tensors. A dataset is deterministic for its spec, so a Plan carries row indices and the data
hash, never the data itself.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from mi_spec.errors import ResolveError
from mi_spec.spec.refs import call_ref, import_ref, is_ref
from mi_spec.spec.sections import DataSection

Encode = Callable[[str], list[int]]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Token rows (unpadded) and per-row columns.

    ``pad_id`` fills padding; ``padding_side`` says where the engine puts it (batches are built
    right-padded and roles are indices into each row's own tokens; the engine moves the padding).
    ``encode`` tokenizes text in counterfactual columns with the base text's tokenizer and flags.
    """

    tokens: tuple[tuple[int, ...], ...]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    pad_id: int = 0
    padding_side: str = "right"
    encode: Encode | None = field(default=None, repr=False)
    origin: tuple[int, ...] = ()  # a derived dataset (counterfactuals): its rows' data rows
    _token_cache: dict[str, list[list[int] | None]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def where(self, i: int) -> str:
        """How errors name row ``i``: ``data row 7`` or ``the counterfactual of data row 7``."""
        return (
            f"the counterfactual of data row {self.origin[i]}" if self.origin else f"data row {i}"
        )

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i`` as a dict: its columns plus ``tokens``."""
        return {"tokens": list(self.tokens[i]), **{k: v[i] for k, v in self.columns.items()}}

    def padded(self, rows: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        """Right-padded token ids and attention mask for ``rows`` (the engine applies
        ``padding_side``; positions everywhere else index each row's own tokens)."""
        width = max(len(self.tokens[r]) for r in rows)
        ids = [list(self.tokens[r]) + [self.pad_id] * (width - len(self.tokens[r])) for r in rows]
        mask = [[1] * len(self.tokens[r]) + [0] * (width - len(self.tokens[r])) for r in rows]
        return ids, mask

    def token_rows(self, column: str, rows: Sequence[int]) -> list[list[int]]:
        """Column ``column`` of ``rows`` as token ids: lists of ids pass through, text is
        tokenized like the base text. A bad value is a ResolveError naming the row."""
        if column not in self.columns:
            raise ResolveError(
                f"no column {column!r} in the data; columns: {', '.join(sorted(self.columns))}"
            )
        cache = self._token_cache.setdefault(column, [None] * len(self))
        out = []
        for r in rows:
            if cache[r] is None:
                cache[r] = self._as_tokens(column, r)
            out.append(list(cache[r] or ()))
        return out

    def token_id(self, value: Any, where: str) -> int:
        """A target given as a token id, or as text that is exactly one token (no special
        tokens added), e.g. a name in an IOI row. ``where`` names the cell in errors."""
        if _is_id(value):
            return value
        if isinstance(value, str) and isinstance(self.encode, _Encoder):
            ids = self.encode.tok(value, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                return int(ids[0])
            raise ResolveError(f"{where}: {value!r} is {len(ids)} tokens, expected one")
        raise ResolveError(f"{where}: expected a token id or one token of text, found {value!r}")

    def _as_tokens(self, column: str, r: int) -> list[int]:
        value = self.columns[column][r]
        if isinstance(value, str) and self.encode is not None:
            tokens = self.encode(value)
            if not tokens:
                raise ResolveError(f"data row {r}: column {column!r} tokenizes to no tokens")
            return tokens
        if isinstance(value, str):
            if not all(t.lstrip("-").isdigit() for t in value.split()):
                raise ResolveError(
                    f"data row {r}: column {column!r} holds text, but the data has no tokenizer "
                    "(set data.text, and data.tokenizer unless the model is an hf folder)"
                )
            value = [int(t) for t in value.split()]
        if not isinstance(value, list) or not value or not all(_is_id(t) for t in value):
            raise ResolveError(
                f"data row {r}: column {column!r} must hold text or a non-empty list of token "
                f"ids, found {str(value)[:40]!r}"
            )
        return value

    def content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([list(t) for t in self.tokens]).encode())
        h.update(json.dumps(self.columns, sort_keys=True, default=str).encode())
        if self.padding_side != "right":  # right-padded datasets keep their earlier hash
            h.update(self.padding_side.encode())
        return h.hexdigest()[:16]


def load_dataset(section: DataSection, base_dir: Path, model_dir: str | None = None) -> Dataset:
    """Materialize the dataset a data section describes (cached per process)."""
    return _load(section.model_dump_json(), str(base_dir), model_dir)


@lru_cache(maxsize=8)
def _load(section_json: str, base_dir: str, model_dir: str | None) -> Dataset:
    section = DataSection.model_validate_json(section_json)
    rows = _map_columns(_read_rows(section, Path(base_dir)), section.columns)
    if section.limit is not None:
        rows = rows[: section.limit]
    if not rows:
        raise ResolveError("the dataset has no rows")
    encode = None
    _require_column(rows, section.text or section.tokens, "text" if section.text else "tokens")
    if section.text is not None:
        encode, pad_id = _tokenizer(section, Path(base_dir), model_dir)
        tokens = []
        for i, r in enumerate(rows):
            value = r.get(section.text)
            if not isinstance(value, str) or not (ids := encode(value)):
                raise ResolveError(
                    f"data row {i}: column {section.text!r} must hold non-empty text, "
                    f"found {str(value)[:40]!r}",
                    ("text",),
                )
            tokens.append(ids)
    else:
        tokens, pad_id = [_token_list(r, section.tokens, i) for i, r in enumerate(rows)], 0
    names = sorted({k for r in rows for k in r} - {section.tokens})
    columns = {k: [r.get(k) for r in rows] for k in names}
    return Dataset(tuple(tuple(t) for t in tokens), columns, pad_id, section.padding_side, encode)


def _require_column(rows: list[dict[str, Any]], column: str, field: str) -> None:
    """The column the tokens come from must be in the data (an error lists its columns)."""
    if not any(column in r for r in rows):
        present = sorted({k for r in rows for k in r})
        raise ResolveError(
            f"no column {column!r} in the data; its columns: {', '.join(present)}"
            + (" (map yours with data.columns)" if present else ""),
            (field,),
        )


def _map_columns(rows: list[dict[str, Any]], mapping: dict[str, str]) -> list[dict[str, Any]]:
    """Rename file columns to the hypothesis's names (``{name: file_column}``)."""
    if not mapping:
        return rows
    present = {k for r in rows for k in r}
    missing = sorted(v for v in mapping.values() if v not in present)
    if missing:
        raise ResolveError(
            f"data.columns maps to {', '.join(map(repr, missing))}, not in the data; its "
            f"columns: {', '.join(sorted(present))}",
            ("columns",),
        )
    renamed = set(mapping.values())
    return [
        {
            **{k: v for k, v in r.items() if k not in renamed},
            **{n: r.get(c) for n, c in mapping.items()},
        }
        for r in rows
    ]


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
        return _arrow_folder_rows(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
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


def _pyarrow() -> Any:
    try:
        import pyarrow  # optional: only for Parquet and datasets folders
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ResolveError(
            "reading Parquet or a datasets folder needs pyarrow (pip install pyarrow)", ("path",)
        ) from None
    return pyarrow


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    pa = _pyarrow()
    try:
        return pa.parquet.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise ResolveError(f"{path}: not a readable Parquet file ({e})", ("path",)) from None


def _arrow_folder_rows(path: Path) -> list[dict[str, Any]]:
    """A folder written by ``datasets.Dataset.save_to_disk``: ``state.json`` lists Arrow stream
    files, read in order (what ``load_from_disk`` does, without needing ``datasets``)."""
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ResolveError(
            f"data.path {path} holds a DatasetDict; point it at one split "
            f"({', '.join(f'{path.name}/{s}' for s in splits)})",
            ("path",),
        )
    state = path / "state.json"
    if not state.exists():
        raise ResolveError(
            f"data.path {path} is a directory without state.json; expected a .jsonl, .csv or "
            ".parquet file or a folder written by datasets' save_to_disk",
            ("path",),
        )
    pa = _pyarrow()
    try:
        files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        tables = []
        for name in files:
            with pa.memory_map(str(path / name)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        return pa.concat_tables(tables).to_pylist() if tables else []
    except (OSError, KeyError, TypeError, json.JSONDecodeError, pa.ArrowException) as e:
        raise ResolveError(f"{path}: not a readable datasets folder ({e})", ("path",)) from None


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


def _tokenizer(section: DataSection, base_dir: Path, model_dir: str | None) -> tuple[Encode, int]:
    """The encode function for text (the data section's flags applied) and the pad id."""
    where = section.tokenizer or model_dir
    if where is None:
        raise ResolveError(
            "data.text needs data.tokenizer (a local directory or a 'pkg.mod:fn' returning a "
            "tokenizer) or an hf model",
            ("text",),
        )
    if section.tokenizer and tokenizer_is_ref(section.tokenizer, base_dir):
        directory: Path | str = section.tokenizer
        tok = _tokenizer_from_ref(section.tokenizer, base_dir)
    else:
        directory = resolve_path(where, base_dir, "tokenizer") if section.tokenizer else Path(where)
        tok = _tokenizer_from_folder(directory, bool(section.tokenizer))
    bos = tok.bos_token_id
    if section.prepend_bos and bos is None:
        raise ResolveError(
            f"data.prepend_bos: the tokenizer from {directory} defines no BOS token",
            ("prepend_bos",),
        )
    return _Encoder(tok, section.add_special_tokens, bos if section.prepend_bos else None), int(
        tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    )


def tokenizer_is_ref(value: str, base_dir: Path) -> bool:
    """Whether ``data.tokenizer`` names code (``pkg.mod:fn``) rather than a folder."""
    return is_ref(value) and not (base_dir / value).exists()


def _tokenizer_from_ref(ref: str, base_dir: Path) -> Any:
    """The tokenizer ``ref`` returns when called without arguments."""
    try:
        fn = import_ref(ref, search=[base_dir])
    except ResolveError as e:
        raise ResolveError(str(e), ("tokenizer",)) from None
    tok = call_ref(fn, ref, "data.tokenizer", {}, ("tokenizer",), ("tokenizer",))
    if not callable(tok) or not hasattr(tok, "bos_token_id"):
        raise ResolveError(
            f"data.tokenizer {ref} must return a Hugging Face tokenizer, got {type(tok).__name__}",
            ("tokenizer",),
        )
    return tok


def _tokenizer_from_folder(directory: Path, located: bool) -> Any:
    from transformers import AutoTokenizer  # heavy: only for text datasets

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # a folder without tokenizer files, a corrupt one, ...
        raise ResolveError(
            f"cannot load a tokenizer from {directory}: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}",
            ("tokenizer",) if located else (),
        ) from None


@dataclass(frozen=True)
class _Encoder:
    """Text -> ids with the data section's flags (a class, so a Dataset pickles)."""

    tok: Any
    add_special_tokens: bool
    bos: int | None  # prepended when the tokenizer did not put it first

    def __call__(self, text: str) -> list[int]:
        ids = list(self.tok(text, add_special_tokens=self.add_special_tokens)["input_ids"])
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids = [self.bos, *ids]
        return ids


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
