"""Turn validation failures into `SpecIssue`s located at file:line:col in the hypothesis files."""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from mi_spec.errors import SpecIssue
from mi_spec.spec.load import SET_FILE, FieldPath, LoadedDoc, Mark

_MAX_SHOWN = 60
_DETAIL = re.compile(r", (?:unable to|got|invalid) .*$")
_CUSTOM_PREFIXES = ("Value error, ", "Assertion failed, ")


def issues_from_validation_error(
    err: ValidationError, doc: LoadedDoc, model: type[BaseModel] | None = None
) -> list[SpecIssue]:
    """One located issue per pydantic error; `model` (the validated class) enables suggestions."""
    return [_from_error(error, doc, model) for error in err.errors(include_url=False)]


def issue_at(
    doc: LoadedDoc, path: Sequence[str | int], message: str, *, at_key: bool = False
) -> SpecIssue:
    """An issue about the value at `path`, located at the deepest part of `path` in the files.

    A scalar value is located where the value starts, anything else where its key (or list item)
    was written; `at_key` always picks the key. A missing path falls back to its nearest parent.
    """
    path = tuple(path)
    dotted = ".".join(map(str, path))
    mark = _locate(doc, path, at_key=at_key)
    if mark is None:
        return SpecIssue(message, path=dotted)
    if mark[0] == SET_FILE:
        index = mark[2]
        source = doc.overrides[index] if 0 <= index < len(doc.overrides) else "?"
        return SpecIssue(message, path=dotted, file=f"--set {source}")
    return SpecIssue(message, path=dotted, file=mark[0], line=mark[1], col=mark[2])


def data_path(data: Any, loc: Sequence[str | int], *, keep_missing_last: bool = False) -> FieldPath:
    """The part of a pydantic `loc` that names keys and items present in `data`.

    Segments that are not keys at their level (union tags, validator labels) are dropped; a final
    segment naming a missing key of a mapping is kept when `keep_missing_last` is set.
    """
    out: list[str | int] = []
    current = data
    for i, segment in enumerate(loc):
        if isinstance(current, dict) and segment in current:
            out.append(segment)
            current = current[segment]
        elif isinstance(current, list) and _is_index(segment) and 0 <= int(segment) < len(current):
            out.append(segment)
            current = current[int(segment)]
        elif keep_missing_last and i == len(loc) - 1 and isinstance(current, dict):
            out.append(segment)
    return tuple(out)


# --- locating --------------------------------------------------------------------------------


def _is_index(segment: Any) -> bool:
    return isinstance(segment, int) and not isinstance(segment, bool)


def _value_at(data: Any, path: FieldPath) -> Any:
    for segment in path:
        data = data[segment]
    return data


def _locate(doc: LoadedDoc, path: FieldPath, *, at_key: bool) -> Mark | None:
    for n in range(len(path), -1, -1):
        prefix = path[:n]
        if prefix not in doc.marks:
            continue
        is_scalar = not isinstance(_value_at(doc.data, prefix), dict | list)
        if n == len(path) and is_scalar and not at_key:
            return doc.value_marks.get(prefix, doc.marks[prefix])
        return doc.marks[prefix]
    return None


# --- messages --------------------------------------------------------------------------------


def _from_error(error: ErrorDetails, doc: LoadedDoc, model: type[BaseModel] | None) -> SpecIssue:
    kind = error["type"]
    loc = tuple(error["loc"])
    path = data_path(doc.data, loc, keep_missing_last=kind == "missing")
    if kind == "extra_forbidden":
        parent = _value_at(doc.data, path[:-1]) if path else {}
        message = _unknown_field(loc, model, parent)
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        path, message = _tag_message(error, path)
    else:
        message = _message(error)
    return issue_at(doc, path, message, at_key=kind == "extra_forbidden")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _message(error: ErrorDetails) -> str:
    """'expected X, found Y' wording for a pydantic error (other than an unknown field)."""
    if error["type"] == "missing":
        return "required field is missing"
    msg, value = error["msg"], error.get("input")
    scalar = not isinstance(value, Mapping | list | tuple | set)
    if msg.startswith("Input should be "):
        expected = _DETAIL.sub("", msg[len("Input should be ") :])
        return f"expected {expected}, found {_show(value)}"
    for prefix in _CUSTOM_PREFIXES:
        msg = msg.removeprefix(prefix)
    shown = _show(value)
    if scalar and shown not in msg:
        return f"{msg}, found {shown}"
    return msg


def _tag_message(error: ErrorDetails, path: FieldPath) -> tuple[FieldPath, str]:
    """Path and message for a discriminated union whose tag field is missing or unknown."""
    ctx = error.get("ctx") or {}
    key = str(ctx.get("discriminator", "")).strip("'")
    if error["type"] == "union_tag_not_found":
        return (*path, key), "required field is missing"
    expected = ctx.get("expected_tags", "")
    return (*path, key), f"expected one of {expected}, found {_show(ctx.get('tag'))}"


def _unknown_field(loc: tuple[str | int, ...], model: type[BaseModel] | None, parent: Any) -> str:
    name = loc[-1]
    message = f"unknown field {str(name)!r}"
    if model is None or not isinstance(name, str):
        return message
    present = set(parent) if isinstance(parent, dict) else set()
    allowed = sorted(_field_names(model, loc[:-1]) - present)
    matches = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    return f"{message}; did you mean {matches[0]!r}?" if matches else message


# --- model fields along a loc ----------------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _matches_tag(tp: Any, segment: str | int) -> bool:
    """Whether a union member is the one a pydantic loc segment (tag or class name) names."""
    if not (_is_model(tp) and isinstance(segment, str)):
        return False
    if tp.__name__ == segment:
        return True
    return any(
        get_origin(f.annotation) is Literal and segment in get_args(f.annotation)
        for f in tp.model_fields.values()
    )


def _step(tp: Any, segment: str | int) -> list[Any]:
    """The types found one loc segment below `tp`."""
    tp = _unwrap(tp)
    if _is_union(tp):
        members = [_unwrap(m) for m in get_args(tp)]
        tagged = [m for m in members if _matches_tag(m, segment)]
        return tagged or [t for m in members for t in _step(m, segment)]
    if _is_model(tp):
        return [f.annotation for name, f in tp.model_fields.items() if segment in (name, f.alias)]
    origin, args = get_origin(tp), get_args(tp)
    if origin is tuple and args:
        if args[-1] is Ellipsis:
            return [args[0]]
        return [args[segment]] if _is_index(segment) and int(segment) < len(args) else []
    if isinstance(origin, type) and issubclass(origin, Mapping) and len(args) == 2:
        return [args[1]]
    if isinstance(origin, type) and issubclass(origin, Sequence | set | frozenset) and args:
        return [args[0]]
    return []


def _field_names(model: type[BaseModel], loc: Sequence[str | int]) -> set[str]:
    """The field names (and aliases) of the models found at `loc` below `model`."""
    found: list[Any] = [model]
    for segment in loc:
        found = [t for tp in found for t in _step(tp, segment)]
    names: set[str] = set()
    for tp in found:
        tp = _unwrap(tp)
        for member in get_args(tp) if _is_union(tp) else (tp,):
            member = _unwrap(member)
            if _is_model(member):
                for name, info in member.model_fields.items():
                    names.add(name)
                    if isinstance(info.alias, str):
                        names.add(info.alias)
    return names
