"""Safe YAML to a tree of marked values: every value remembers where it was written.

The node tree is composed with `yaml.SafeLoader` and converted here, so no object is ever
constructed. Only plain-data tags are accepted; anything else is an issue at file:line:col.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml
import yaml.constructor
import yaml.reader

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


def text_mark(text: str, index: int, file: str) -> Mark:
    """The mark of character `index` of `text` (line and column 1-based, in characters)."""
    line_start = text.rfind("\n", 0, index) + 1
    return (file, text.count("\n", 0, index) + 1, index - line_start + 1)


def decode(data: bytes, file: str) -> str:
    """A file's bytes as text; anything but UTF-8 is an issue at the first bad byte's line:col."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            message = (
                "the file is UTF-16 (it starts with a UTF-16 byte order mark); save it as UTF-8"
            )
            raise SpecError([SpecIssue(message, file=file, line=1, col=1)]) from None
        start = err.start
        line_start = data.rfind(b"\n", 0, start) + 1
        line = data.count(b"\n", 0, start) + 1
        col = len(data[line_start:start].decode("utf-8", errors="replace")) + 1
        message = f"invalid UTF-8 byte 0x{data[start]:02x}; save the file as UTF-8"
        raise SpecError([SpecIssue(message, file=file, line=line, col=col)]) from None


def _at(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, col {mark.column + 1}"


# PyYAML's token names, as a user would say them.
_TOKENS = {
    "'<stream end>'": "the end of the file",
    "<stream end>": "the end of the file",
    "'<scalar>'": "a value",
    "'<block mapping start>'": "a more indented key",
    "'<block sequence start>'": "a more indented list",
    "'<block end>'": "a less indented line",
}
_CLOSERS = {"[": "]", "{": "}", '"': '"', "'": "'"}
_BLOCK_END = "expected <block end>, but found "
_RAN_OUT = ("found unexpected end of stream", "found unexpected document separator")
# A line inside a quoted string that looks like a YAML key: the quote probably never closed.
_KEY_LINE = re.compile(r"\n[ \t]*(?:- +)?[A-Za-z_][\w.-]*:(?:[ \t]|$)")


def _words(problem: str, text_name: str) -> str:
    for token, words in _TOKENS.items():
        problem = problem.replace(token, words.replace("file", text_name))
    return problem


def _runaway_quote(text: str, before: int) -> yaml.Mark | None:
    """The start of a quoted string ending before `before` that swallowed lines looking like keys."""
    found = None
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if token.start_mark.index >= before:
                break
            if (
                isinstance(token, yaml.ScalarToken)
                and token.style in ("'", '"')
                and _KEY_LINE.search(text, token.start_mark.index, token.end_mark.index)
            ):
                found = token.start_mark
    except yaml.YAMLError:
        pass
    return found


def yaml_issue(
    err: yaml.YAMLError, file: str, text: str = "", text_name: str = "file"
) -> SpecIssue:
    """A SpecIssue for a YAML reader/scanner/parser/composer error in `text`.

    A quote, `[` or `{` that never closes is located where it opens, with where the scan ended.
    `text_name` names the text in messages ("file", or "value" for a `--set` value).
    """
    if isinstance(err, yaml.reader.ReaderError) and isinstance(err.character, int):
        message = (
            f"invalid YAML: found the control character {chr(err.character)!r} "
            f"(U+{err.character:04X}), which YAML does not allow; remove it"
        )
        return issue(message, text_mark(text, min(err.position, len(text)), file))
    where = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if not isinstance(err, yaml.MarkedYAMLError) or where is None:
        return SpecIssue(f"invalid YAML: {err}", file=file)
    problem, context, start = err.problem or "", err.context or "", err.context_mark
    in_file = text_name == "file"
    ended_at = f" at {_at(where)}" if in_file else ""
    opener = text[start.index] if start is not None and start.index < len(text) else ""
    ran_out = problem in _RAN_OUT or "<stream end>" in problem
    if start is not None and opener in _CLOSERS and ran_out:
        what = "quoted string" if opener in "'\"" else repr(opener)
        end = f"the end of the {text_name}"
        if "separator" in problem:
            end = f"a document separator {text[where.index : where.index + 3]!r}"
        message = (
            f"expected a closing {_CLOSERS[opener]!r} for the {what} that starts here, "
            f"found {end}{ended_at}"
        )
        return issue(f"invalid YAML: {message}", mark_of(start, file))
    if problem.startswith("found character '\\t'"):
        message = "found a tab character; indent with spaces, not tabs"
        return issue(f"invalid YAML: {message}", mark_of(where, file))
    message = _words(problem, text_name) or context
    if problem.startswith(_BLOCK_END) and start is not None:
        found = _words(problem.removeprefix(_BLOCK_END), text_name)
        block = "mapping" if "mapping" in context else "list"
        message = (
            f"bad indentation: expected the indentation of the {block} that starts at "
            f"{_at(start)} (or less), found {found}"
        )
    elif problem and context:
        since = ""
        if in_file and start is not None and start.index != where.index:
            since = f" started at {_at(start)}"
        message += f" ({context}{since})"
    if problem.startswith("found unknown escape character"):
        message += "; in double quotes a backslash starts an escape: use single quotes"
    elif problem == "mapping values are not allowed here":
        message += "; quote a value that contains ': ', or check the indentation"
    runaway = _runaway_quote(text, where.index) if in_file else None
    if runaway is not None:
        message = (
            f"expected a closing {text[runaway.index]!r} for the quoted string that starts here, "
            f"found lines that look like keys inside it; the file stops parsing at {_at(where)}: "
            f"{message}"
        )
        return issue(f"invalid YAML: {message}", mark_of(runaway, file))
    return issue(f"invalid YAML: {message}", mark_of(where, file))


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


def compose_node(text: str, file: str, text_name: str = "file") -> yaml.Node | None:
    """The composed node tree of `text` (None if empty); a YAML error is a located SpecError."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise SpecError([yaml_issue(err, file, text, text_name)]) from None


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
