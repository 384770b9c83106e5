"""Load hypothesis YAML files into plain data, remembering where every value was written.

Loading is safe: the node tree is composed with `yaml.SafeLoader` and converted to plain Python
(`mi_spec.spec.yaml_tree`), so no object is ever constructed. Only the standard plain-data tags are accepted (mapping,
sequence, str, int, float, bool, null); any other tag (`!!python/object`, `!function`, `!!set`,
...) is an error located at file:line:col. Timestamps are kept as their source text, and mapping
keys are strings or ints (any other scalar key, e.g. `on:` or `1.5:`, keeps its source text).
Anchors, aliases and `<<` merge keys work as in ordinary YAML.

Composition, top to bottom:

1. `extends: base.yaml` (or a list of files, applied in order) at the top level of a file names
   files relative to that file's directory. They are loaded first (recursively), then the
   including file is deep-merged over them: mappings merge key by key, the child's keys winning;
   lists and scalars are replaced whole; a child's `null` simply sets the value to null.
2. `--set a.b.0.c=value` overrides are applied in order. The path is dotted; integer segments
   index into lists (an index equal to the list's length appends); missing intermediate keys
   create mappings. The value is parsed as a YAML flow value (`3`, `true`, `[0, 1]`, `foo`).

Every value in the result keeps a `Mark` (file, line, col; both 1-based) for the place where the
winning value was written. Values set by `--set` carry the mark `("<--set>", 0, i)`, `i` being the
0-based position of the override in the list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mi_spec.errors import SpecError, SpecIssue
from mi_spec.spec.yaml_tree import (
    Converter,
    Entry,
    FieldPath,
    Mark,
    compose,
    compose_node,
    issue,
    plain,
    wrap,
)

__all__ = [
    "SET_FILE",
    "FieldPath",
    "LoadedDoc",
    "Mark",
    "deep_merge",
    "dump_yaml",
    "load_yaml",
    "set_path",
]

SET_FILE = "<--set>"  # the file of a mark for a value set by an override
SET_SOURCE = "--set"  # the provenance of a value set by an override


@dataclass
class LoadedDoc:
    """A hypothesis file after `extends` and overrides, with the source of every value."""

    data: dict[str, Any]  # the merged plain data, without the `extends` key
    marks: dict[FieldPath, Mark]  # path -> where its key (mapping) or item (sequence) was written
    provenance: dict[FieldPath, str]  # leaf path -> the file (or "--set") its value came from
    files: list[Path]  # the extends chain, bases first, the main file last
    path: Path  # the main file
    text: str  # the main file's text
    # path -> where its value starts (for a mapping entry, after the key)
    value_marks: dict[FieldPath, Mark] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # the `--set` strings, in order


# --- public API ------------------------------------------------------------------------------


def load_yaml(path: str | Path, overrides: Sequence[str] = ()) -> LoadedDoc:
    """Load `path`, resolve its `extends` chain and apply `overrides` ("a.b.0=value")."""
    main = Path(path)
    loader = _Loader()
    root = loader.load(main, (), None)
    for index, override in enumerate(overrides):
        _apply_override(root, override, index)
    found = _Index()
    data = _collect(root, (), found)
    return LoadedDoc(
        data=data,
        marks=found.marks,
        provenance=found.provenance,
        files=loader.files,
        path=main,
        text=loader.main_text,
        value_marks=found.value_marks,
        overrides=list(overrides),
    )


def dump_yaml(data: dict[str, Any]) -> str:
    """The data as YAML text, keys in their original order."""
    return yaml.dump(
        data, Dumper=yaml.SafeDumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )


def deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`child` merged over `base` with the `extends` rules (mappings merge, the rest is replaced)."""
    mark: Mark = ("", 0, 0)
    return plain(_merge(wrap(base, mark), wrap(child, mark)))


def set_path(data: Any, path: Sequence[str | int], value: Any) -> None:
    """Set `value` at `path` inside `data` in place, with the `--set` rules; ValueError if invalid."""
    _set_in(data, path, value, dict, lambda container: container)


# --- extends ---------------------------------------------------------------------------------


def _read(path: Path, origin: Mark | None) -> str:
    """The file's text; a missing file is located at `origin` (the `extends` value) if given."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if origin is None:
            raise SpecError([SpecIssue("file not found", file=str(path))]) from None
        raise SpecError([issue(f"extended file not found: {str(path)!r}", origin)]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError([issue(f"cannot read {str(path)!r}: {err}", origin)]) from None


class _Loader:
    """Loads a file and its `extends` chain, recording the files in merge order."""

    def __init__(self) -> None:
        self.files: list[Path] = []
        self.main_text = ""

    def load(self, path: Path, stack: tuple[Path, ...], origin: Mark | None) -> Entry:
        resolved = [p.resolve() for p in stack]
        if path.resolve() in resolved:
            cycle = [*stack[resolved.index(path.resolve()) :], path]
            message = "extends cycle: " + " -> ".join(map(str, cycle))
            raise SpecError([issue(message, origin)])
        text = _read(path, origin)
        if not stack:
            self.main_text = text
        root = compose(text, str(path))
        merged: Entry | None = None
        for base, mark in _bases(root, path):
            tree = self.load(base, (*stack, path), mark)
            merged = tree if merged is None else _merge(merged, tree)
        if path not in self.files:
            self.files.append(path)
        return root if merged is None else _merge(merged, root)


def _bases(root: Entry, path: Path) -> list[tuple[Path, Mark]]:
    """Pop the top-level `extends` entry; the files it names, with where each was written."""
    entry = root.value.pop("extends", None)
    if entry is None:
        return []
    items = [entry] if isinstance(entry.value, str) else entry.value
    if not isinstance(items, list) or not all(isinstance(i.value, str) for i in items):
        message = "'extends' must be a file name or a list of file names"
        raise SpecError([issue(message, entry.value_mark, ("extends",))])
    return [(path.parent / item.value, item.value_mark) for item in items]


def _merge(base: Entry, child: Entry) -> Entry:
    """`child` over `base`: mappings merge recursively, anything else is replaced whole."""
    if not (isinstance(base.value, dict) and isinstance(child.value, dict)):
        return child
    merged = dict(base.value)
    for key, entry in child.value.items():
        merged[key] = _merge(merged[key], entry) if key in merged else entry
    return Entry(merged, child.mark, child.value_mark)


# --- overrides -------------------------------------------------------------------------------


def _override_error(override: str, reason: str) -> SpecError:
    return SpecError([SpecIssue(f"invalid override --set {override!r}: {reason}")])


def _parse_value(raw: str, override: str) -> Any:
    """The override's value, parsed as a safe YAML flow value."""
    try:
        node = compose_node(raw, SET_FILE)
    except SpecError as err:
        raise _override_error(override, err.issues[0].message) from None
    if node is None:
        return None
    converter = Converter(SET_FILE)
    entry = converter.convert(node, (), (SET_FILE, 0, 0))
    if converter.issues:
        raise _override_error(override, converter.issues[0].message)
    return plain(entry)


def _apply_override(root: Entry, override: str, index: int) -> None:
    name, sep, raw = override.partition("=")
    segments = name.strip().split(".")
    if not sep or not all(segments):
        raise _override_error(override, "expected 'dotted.path=value'")
    mark: Mark = (SET_FILE, 0, index)
    value = wrap(_parse_value(raw, override), mark)
    try:
        _set_in(root.value, segments, value, lambda: Entry({}, mark, mark), lambda e: e.value)
    except ValueError as err:
        raise _override_error(override, str(err)) from None


def _dict_key(container: dict[Any, Any], segment: str | int) -> str | int:
    """The key `segment` names: itself, or its int form when only that is present."""
    if segment in container or not isinstance(segment, str):
        return segment
    if segment.isascii() and segment.isdigit() and int(segment) in container:
        return int(segment)
    return segment


def _list_index(segment: str | int, length: int, where: str) -> int:
    if isinstance(segment, str) and segment.isascii() and segment.isdigit():
        segment = int(segment)
    if not isinstance(segment, int) or isinstance(segment, bool):
        raise ValueError(f"{where} is a list: expected an integer index, got {segment!r}")
    if not 0 <= segment <= length:
        raise ValueError(
            f"index {segment} is out of range for {where} "
            f"(a list of {length} items; index {length} appends)"
        )
    return segment


def _set_in(
    root: Any,
    path: Sequence[str | int],
    leaf: Any,
    new_mapping: Callable[[], Any],
    inner: Callable[[Any], Any],
) -> None:
    """Set `leaf` at `path` below `root`; `inner` unwraps a stored value into its container."""
    if not path:
        raise ValueError("empty path")
    container = root
    for i, segment in enumerate(path):
        last = i == len(path) - 1
        where = repr(".".join(map(str, path[:i]))) if i else "the top level"
        if isinstance(container, dict):
            key = _dict_key(container, segment)
            if last:
                container[key] = leaf
                return
            if key not in container or inner(container[key]) is None:
                container[key] = new_mapping()
            container = inner(container[key])
        elif isinstance(container, list):
            index = _list_index(segment, len(container), where)
            if index == len(container):
                container.append(leaf if last else new_mapping())
            elif last:
                container[index] = leaf
            elif inner(container[index]) is None:
                container[index] = new_mapping()
            if last:
                return
            container = inner(container[index])
        else:
            kind = "null" if container is None else type(container).__name__
            raise ValueError(f"{where} is {kind}, not a mapping or a list")


# --- flattening ------------------------------------------------------------------------------


@dataclass
class _Index:
    marks: dict[FieldPath, Mark] = field(default_factory=dict)
    value_marks: dict[FieldPath, Mark] = field(default_factory=dict)
    provenance: dict[FieldPath, str] = field(default_factory=dict)


def _collect(entry: Entry, path: FieldPath, index: _Index) -> Any:
    """The plain value of `entry`, recording marks and leaf provenance into `index`."""
    index.marks[path] = entry.mark
    index.value_marks[path] = entry.value_mark
    value = entry.value
    if isinstance(value, dict) and value:
        return {k: _collect(e, (*path, k), index) for k, e in value.items()}
    if isinstance(value, list) and value:
        return [_collect(e, (*path, i), index) for i, e in enumerate(value)]
    index.provenance[path] = SET_SOURCE if entry.mark[0] == SET_FILE else entry.mark[0]
    if isinstance(value, dict | list):
        return type(value)()
    return value
