"""Safe YAML to a tree of marked values: every value remembers where it was written.

The node tree is composed with `yaml.SafeLoader` and converted here, so no object is ever
constructed. Only plain-data tags are accepted; anything else is an issue at file:line:col.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
import yaml.constructor

from mi_spec.errors import SpecError, SpecIssue

Mark = tuple[str, int, int]
FieldPath = tuple[str | int, ...]

_STD = "tag:yaml.org,2002:"
_MAP_TAG, _SEQ_TAG, _MERGE_TAG = f"{_STD}map", f"{_STD}seq", f"{_STD}merge"
_TIMESTAMP_TAG = f"{_STD}timestamp"
_SCALAR_TAGS = frozenset(f"{_STD}{name}" for name in ("str", "int", "float", "bool", "null"))
_MAX_NODES = 1_000_000  # guards against alias bombs ("billion laughs")
_CONSTRUCTOR = yaml.constructor.SafeConstructor()


@dataclass
class Entry:
    """A value with its marks; containers hold `Entry` children."""

    value: Any  # a scalar, dict[str | int, Entry] or list[Entry]
    mark: Mark  # where the key (mapping entry) or the item (sequence) was written
    value_mark: Mark  # where the value itself starts


def mark_of(mark: yaml.Mark, file: str) -> Mark:
    return (file, mark.line + 1, mark.column + 1)


def issue(message: str, mark: Mark | None, path: FieldPath = ()) -> SpecIssue:
    dotted = ".".join(map(str, path))
    if mark is None:
        return SpecIssue(message, path=dotted)
    return SpecIssue(message, path=dotted, file=mark[0], line=mark[1], col=mark[2])


def yaml_issue(err: yaml.YAMLError, file: str) -> SpecIssue:
    """A SpecIssue for a YAML reader/scanner/parser/composer error."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return SpecIssue(f"invalid YAML: {err}", file=file)
    problem = err.problem or err.context or str(err)
    extra = f" ({err.context})" if err.problem and err.context else ""
    where = err.problem_mark or err.context_mark
    return issue(f"invalid YAML: {problem}{extra}", None if where is None else mark_of(where, file))


def short_tag(tag: str) -> str:
    return "!!" + tag[len(_STD) :] if tag.startswith(_STD) else tag


class Converter:
    """Turns a composed node tree into `Entry` values, collecting every issue found."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.issues: list[SpecIssue] = []
        self._active: set[int] = set()
        self._count = 0

    def convert(self, node: yaml.Node, path: FieldPath, mark: Mark) -> Entry:
        value_mark = mark_of(node.start_mark, self.file)
        self._count += 1
        if self._count > _MAX_NODES:
            raise SpecError([issue("document too large (alias expansion?)", value_mark, path)])
        if id(node) in self._active:
            self.issues.append(issue("recursive alias", mark, path))
            return Entry(None, mark, value_mark)
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                value: Any = self._mapping(node, path)
            elif isinstance(node, yaml.SequenceNode):
                value = self._sequence(node, path)
            else:
                value = self._scalar(node, path)
        finally:
            self._active.discard(id(node))
        return Entry(value, mark, value_mark)

    def _check_tag(self, node: yaml.Node, allowed: str, path: FieldPath) -> None:
        if node.tag != allowed:
            message = f"unsupported YAML tag {short_tag(node.tag)!r}: only plain data is allowed"
            self.issues.append(issue(message, mark_of(node.start_mark, self.file), path))

    def _scalar(self, node: yaml.Node, path: FieldPath) -> Any:
        if node.tag == _TIMESTAMP_TAG:
            return node.value
        if node.tag not in _SCALAR_TAGS:
            self._check_tag(node, f"{_STD}str", path)
            return node.value
        try:
            return _CONSTRUCTOR.yaml_constructors[node.tag](_CONSTRUCTOR, node)
        except (yaml.YAMLError, ValueError):
            message = f"cannot read {node.value!r} as {short_tag(node.tag)}"
            self.issues.append(issue(message, mark_of(node.start_mark, self.file), path))
            return node.value

    def _key(self, node: yaml.Node, path: FieldPath) -> str | int | None:
        if not isinstance(node, yaml.ScalarNode):
            message = "mapping keys must be plain scalars"
            self.issues.append(issue(message, mark_of(node.start_mark, self.file), path))
            return None
        key = self._scalar(node, path)
        if isinstance(key, bool) or not isinstance(key, str | int):
            return str(node.value)
        return key

    def _mapping(self, node: yaml.MappingNode, path: FieldPath) -> dict[str | int, Entry]:
        self._check_tag(node, _MAP_TAG, path)
        result: dict[str | int, Entry] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            key = self._key(key_node, path)
            if key is None:
                continue
            key_mark = mark_of(key_node.start_mark, self.file)
            if key in result:
                first = result[key].mark
                message = (
                    f"duplicate key {key!r} (first defined at line {first[1]}, col {first[2]})"
                )
                self.issues.append(issue(message, key_mark, (*path, key)))
                continue
            result[key] = self.convert(value_node, (*path, key), key_mark)
        for merge in merges:
            for source in self._merge_sources(merge, path):
                for key, entry in source.items():
                    result.setdefault(key, entry)
        return result

    def _merge_sources(self, node: yaml.Node, path: FieldPath) -> list[dict[str | int, Entry]]:
        """The mappings a `<<` merge key names, highest precedence first."""
        nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if not all(isinstance(n, yaml.MappingNode) for n in nodes):
            message = "a '<<' merge key needs a mapping or a list of mappings"
            self.issues.append(issue(message, mark_of(node.start_mark, self.file), path))
            return []
        mark = mark_of(node.start_mark, self.file)
        entries = [self.convert(n, path, mark) for n in nodes]
        return [e.value for e in entries if isinstance(e.value, dict)]

    def _sequence(self, node: yaml.SequenceNode, path: FieldPath) -> list[Entry]:
        self._check_tag(node, _SEQ_TAG, path)
        return [
            self.convert(item, (*path, i), mark_of(item.start_mark, self.file))
            for i, item in enumerate(node.value)
        ]


def compose_node(text: str, file: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise SpecError([yaml_issue(err, file)]) from None


def compose(text: str, file: str) -> Entry:
    """The `Entry` tree of one file's text; the top level must be a mapping."""
    node = compose_node(text, file)
    if node is None:
        raise SpecError(
            [SpecIssue("the file is empty: expected a mapping", file=file, line=1, col=1)]
        )
    mark = mark_of(node.start_mark, file)
    if not isinstance(node, yaml.MappingNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else f"{node.value!r}"
        raise SpecError([issue(f"the top level must be a mapping, found {kind}", mark)])
    converter = Converter(file)
    root = converter.convert(node, (), mark)
    if converter.issues:
        raise SpecError(converter.issues)
    return root


def wrap(value: Any, mark: Mark) -> Entry:
    """Plain data as an `Entry` tree, every part marked with `mark`."""
    if isinstance(value, dict):
        value = {k: wrap(v, mark) for k, v in value.items()}
    elif isinstance(value, list):
        value = [wrap(v, mark) for v in value]
    return Entry(value, mark, mark)


def plain(entry: Entry) -> Any:
    if isinstance(entry.value, dict):
        return {k: plain(e) for k, e in entry.value.items()}
    if isinstance(entry.value, list):
        return [plain(e) for e in entry.value]
    return entry.value
