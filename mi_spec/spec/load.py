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
3. Relative paths: a file or folder named in a hypothesis (the fields of `PATH_FIELDS`) is
   relative to the folder of the file that declares it. Code downstream resolves every relative
   path against the main file's folder (`doc.path.parent`), so a relative path whose winning
   value was written in an `extends` base in another folder is rewritten here to name the same
   file relative to the main file's folder (or absolute, when no relative path exists, e.g. on
   another drive). Absolute paths, values written in the main file (or in a base in the same
   folder) and `--set` values are left as they are: a `--set` path is relative to the main file's
   folder like everything else, not to the working directory. Marks and provenance still say
   where the value was written.

Every value in the result keeps a `Mark` (file, line, col; both 1-based) for the place where the
winning value was written. Values set by `--set` carry the mark `("<--set>", 0, i)`, `i` being the
0-based position of the override in the list.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mi_spec.errors import SpecError, SpecIssue
from mi_spec.spec.refs import is_ref
from mi_spec.spec.yaml_tree import (
    Converter,
    Entry,
    FieldPath,
    Mark,
    compose,
    compose_node,
    decode,
    issue,
    plain,
    wrap,
)

__all__ = [
    "PATH_FIELDS",
    "SET_FILE",
    "FieldPath",
    "LoadedDoc",
    "Mark",
    "PathField",
    "deep_merge",
    "dump_yaml",
    "load_yaml",
    "set_path",
]

SET_FILE = "<--set>"  # the file of a mark for a value set by an override
SET_SOURCE = "--set"  # the provenance of a value set by an override


def _any_path(value: str) -> bool:
    return True


def _is_yaml_file(value: str) -> bool:
    """`model.adapter`: a declarative adapter file, not a built-in adapter's name ("gpt2")."""
    return value.endswith((".yaml", ".yml"))


def _is_rotation_file(value: str) -> bool:
    """A DAS `init`: a saved rotation file, not one of the keywords."""
    return value not in ("random", "identity")


def _is_folder_not_ref(value: str) -> bool:
    """A tokenizer folder, not a ``pkg.mod:fn`` that builds one."""
    return not is_ref(value)


@dataclass(frozen=True)
class PathField:
    """A field whose string value names a file or folder relative to the file that declares it."""

    path: tuple[str, ...]  # "*" matches every item of a list
    is_path: Callable[[str], bool] = _any_path  # which values are paths (others are names)


# Every field of a hypothesis that names a file or folder, i.e. every value read with
# `mi_spec.data.dataset.resolve_path` or otherwise joined to the hypothesis' folder downstream
# (models/load.py, data/dataset.py, sites/declarative.py, execute/das_op.py). `load_yaml` rewrites
# the relative ones that come from an `extends` base in another folder (rule 3 above); a new path
# field must be added here.
PATH_FIELDS: tuple[PathField, ...] = (
    PathField(("model", "checkpoint")),  # a state_dict .pt file
    PathField(("model", "hf")),  # a local Hugging Face model folder
    PathField(("model", "adapter"), _is_yaml_file),  # a declarative adapter .yaml file
    PathField(("data", "path")),  # a .jsonl / .csv file
    PathField(("data", "tokenizer"), _is_folder_not_ref),  # a local tokenizer folder
    PathField(("experiments", "*", "init"), _is_rotation_file),  # DAS: a saved rotation file
)


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


def load_yaml(
    path: str | Path,
    overrides: Sequence[str] = (),
    path_fields: Sequence[PathField] = PATH_FIELDS,
) -> LoadedDoc:
    """Load `path`, resolve its `extends` chain and apply `overrides` ("a.b.0=value").

    Relative paths in `path_fields` that come from a base in another folder are rewritten to be
    relative to the main file's folder (see the module's docstring, rule 3).
    """
    main = Path(path)
    loader = _Loader()
    root = loader.load(main, (), None, ())
    for index, override in enumerate(overrides):
        _apply_override(root, override, index)
    for path_field in path_fields:
        _rebase_paths(root, path_field.path, path_field, main)
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


def _read(path: Path, origin: Mark | None, named_at: FieldPath) -> str:
    """The file's text. A problem with the main file names the file; one with an extended file is
    located at `origin` (its name in the `extends` list, at field `named_at`)."""

    def fail(message: str) -> SpecError:
        """`message`, " {file}" naming the extended file (a main file is named by the location)."""
        if origin is None:
            return SpecError([SpecIssue(message.replace(" {file}", ""), file=str(path))])
        return SpecError([issue(message.replace("{file}", repr(str(path))), origin, named_at)])

    if path.is_dir():
        raise fail("expected a YAML file, found the directory {file}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise fail(
            "file not found" if origin is None else "extended file not found: {file}"
        ) from None
    except OSError as err:
        raise fail(f"cannot read the file {{file}}: {err.strerror or err}") from None
    return decode(data, str(path))


class _Loader:
    """Loads a file and its `extends` chain, recording the files in merge order."""

    def __init__(self) -> None:
        self.files: list[Path] = []
        self.main_text = ""

    def load(
        self, path: Path, stack: tuple[Path, ...], origin: Mark | None, named_at: FieldPath
    ) -> Entry:
        resolved = [p.resolve() for p in stack]
        if path.resolve() in resolved:
            cycle = [*stack[resolved.index(path.resolve()) :], path]
            message = "extends cycle: " + " -> ".join(map(str, cycle))
            raise SpecError([issue(message, origin, named_at)])
        text = _read(path, origin, named_at)
        if not stack:
            self.main_text = text
        root = compose(text, str(path))
        merged: Entry | None = None
        for base, mark, base_named_at in _bases(root, path):
            tree = self.load(base, (*stack, path), mark, base_named_at)
            merged = tree if merged is None else _merge(merged, tree)
        if path not in self.files:
            self.files.append(path)
        return root if merged is None else _merge(merged, root)


def _bases(root: Entry, path: Path) -> list[tuple[Path, Mark, FieldPath]]:
    """Pop the top-level `extends` entry; the files it names, each with where it was written."""
    entry = root.value.pop("extends", None)
    if entry is None:
        return []
    items: list[tuple[Entry, FieldPath]] = [(entry, ("extends",))]
    if isinstance(entry.value, list):
        items = [(item, ("extends", i)) for i, item in enumerate(entry.value)]
    for item, named_at in items:
        if not isinstance(item.value, str) or not item.value.strip():
            found = _describe(plain(item))
            message = f"expected a file name or a list of file names, found {found}"
            raise SpecError([issue(message, item.value_mark, named_at)])
    return [(path.parent / item.value, item.value_mark, named_at) for item, named_at in items]


def _describe(value: Any) -> str:
    """A short description of a plain value, for 'found ...'."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else repr(value)


# --- relative paths from other folders -----------------------------------------------------------


def _rebase_paths(
    entry: Entry, pattern: tuple[str, ...], path_field: PathField, main: Path
) -> None:
    """Rewrite the relative paths matching `pattern` below `entry` written in other folders."""
    container = entry.value
    head, rest = pattern[0], pattern[1:]
    if isinstance(container, dict):
        keys: Sequence[str | int] = [head] if head in container else []
    elif isinstance(container, list) and head == "*":
        keys = range(len(container))
    else:
        return
    for key in keys:
        child = container[key]
        if rest:
            _rebase_paths(child, rest, path_field, main)
        else:
            container[key] = _rebased(child, path_field, main)


def _rebased(entry: Entry, path_field: PathField, main: Path) -> Entry:
    """`entry` with its path relative to the main file's folder instead of its own file's."""
    value, file = entry.value, entry.value_mark[0]
    if (
        not isinstance(value, str)
        or not value
        or file in (SET_FILE, str(main))
        or not path_field.is_path(value)
        or Path(value).is_absolute()
    ):
        return entry
    own_dir, main_dir = Path(file).parent.resolve(), main.parent.resolve()
    if own_dir == main_dir:
        return entry
    try:
        rebased = str(Path(os.path.relpath(own_dir, main_dir), value))
    except ValueError:  # no relative path between them (Windows: another drive)
        rebased = str(own_dir / value)
    return Entry(rebased, entry.mark, entry.value_mark)


def _merge(base: Entry, child: Entry) -> Entry:
    """`child` over `base`: mappings merge recursively, anything else is replaced whole."""
    if not (isinstance(base.value, dict) and isinstance(child.value, dict)):
        return child
    merged = dict(base.value)
    for key, entry in child.value.items():
        merged[key] = _merge(merged[key], entry) if key in merged else entry
    return Entry(merged, child.mark, child.value_mark)


# --- overrides -------------------------------------------------------------------------------


def _override_error(override: str, reason: str, path: str = "") -> SpecError:
    """An issue located like the others set by `--set`: at `--set PATH=VALUE`."""
    return SpecError(
        [SpecIssue(f"invalid override: {reason}", path=path, file=f"--set {override}")]
    )


def _parse_value(raw: str, override: str, path: str) -> Any:
    """The override's value, parsed as a safe YAML flow value."""
    try:
        node = compose_node(raw, SET_FILE, text_name="value")
    except SpecError as err:
        message = err.issues[0].message.replace("invalid YAML:", "invalid YAML value:", 1)
        raise _override_error(override, message, path) from None
    if node is None:
        return None
    converter = Converter(SET_FILE)
    entry = converter.convert(node, (), (SET_FILE, 0, 0))
    if converter.issues:
        raise _override_error(override, converter.issues[0].message, path)
    return plain(entry)


def _apply_override(root: Entry, override: str, index: int) -> None:
    name, sep, raw = override.partition("=")
    name = name.strip()
    segments = name.split(".")
    if not sep:
        raise _override_error(override, "expected 'dotted.path=value', found no '='")
    if not all(segments):
        found = "an empty path" if not name else f"an empty segment in {name!r}"
        raise _override_error(override, f"expected 'dotted.path=value', found {found}")
    mark: Mark = (SET_FILE, 0, index)
    value = wrap(_parse_value(raw, override, name), mark)
    try:
        _set_in(root.value, segments, value, lambda: Entry({}, mark, mark), lambda e: e.value)
    except ValueError as err:
        raise _override_error(override, str(err), name) from None


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
        raise ValueError(f"{where} is a list: expected an integer index, found {segment!r}")
    if not 0 <= segment <= length:
        raise ValueError(
            f"index {segment} is out of range for {where}: expected 0 to {length} "
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
            shown = repr(container) if len(repr(container)) <= 40 else repr(container)[:37] + "..."
            kind = "null" if container is None else f"{type(container).__name__} {shown}"
            raise ValueError(f"expected {where} to be a mapping or a list, found {kind}")


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
