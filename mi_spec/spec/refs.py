"""References to Python objects written in hypothesis files as "package.module:attr.path".

A reference is looked up on the normal import path first, then in the hypothesis file's own folder
(``search``), so a ``planted_induction.py`` beside the YAML file is found without setting
PYTHONPATH. Calling the referenced code goes through ``call_ref``, which turns anything it raises
into a ``ResolveError`` naming the reference and the exception.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mi_spec.errors import ResolveError

_NAME = r"[^\W\d]\w*"
_REF = re.compile(rf"{_NAME}(?:\.{_NAME})*:{_NAME}(?:\.{_NAME})*")


def is_ref(s: str) -> bool:
    """Whether `s` has the form "package.module:attr" (attr may be dotted, e.g. "m:Cls.method")."""
    return isinstance(s, str) and _REF.fullmatch(s) is not None


def module_file(module_name: str, folders: Sequence[str | Path]) -> Path | None:
    """The file that would define ``module_name`` under one of ``folders`` (nothing is imported)."""
    parts = module_name.split(".")
    for folder in folders:
        base = Path(folder).joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _add_search_path(module_name: str, search: Sequence[str | Path]) -> None:
    """Put the first folder of ``search`` that holds ``module_name`` on ``sys.path``."""
    top = module_name.split(".")[0]
    for folder in search:
        if module_file(top, [folder]) is not None:
            entry = str(Path(folder).resolve())
            if entry not in sys.path:
                sys.path.insert(0, entry)
            importlib.invalidate_caches()
            return


def import_ref(ref: str, search: Sequence[str | Path] = ()) -> Any:
    """The object `ref` ("package.module:attr.path") names; ResolveError if it does not import.

    ``search``: folders (the hypothesis file's) tried after ``sys.path`` for the module.
    """
    if not is_ref(ref):
        raise ResolveError(f"invalid reference {ref!r}: expected 'package.module:attribute'")
    module_name, _, attr_path = ref.partition(":")
    try:
        found = importlib.util.find_spec(module_name.split(".")[0]) is not None
    except (ImportError, ValueError):
        found = False
    if not found and search:
        _add_search_path(module_name, search)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        where = ", ".join(str(Path(s)) for s in search)
        hint = f" on sys.path or in {where}" if where else " on sys.path"
        raise ResolveError(
            f"cannot import {ref!r}: no module named {err.name!r}{hint}; put the module beside "
            "the hypothesis file, install its package, or add its folder to PYTHONPATH"
        ) from err
    except Exception as err:
        raise ResolveError(
            f"cannot import {ref!r}: importing {module_name!r} failed: {type(err).__name__}: {err}"
        ) from err
    owner = f"module {module_name!r}"
    done: list[str] = []
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ResolveError(
                f"cannot import {ref!r}: {owner} has no attribute {attr!r}"
            ) from None
        done.append(attr)
        owner = repr(f"{module_name}:{'.'.join(done)}")
    return obj


def call_ref(
    fn: Callable[..., Any],
    ref: str,
    role: str,
    kwargs: Mapping[str, Any],
    ref_field: tuple[str, ...],
    kwargs_field: tuple[str, ...],
) -> Any:
    """``fn(**kwargs)``; a ResolveError located at ``kwargs_field`` when the arguments do not fit
    its signature, at ``ref_field`` when the call raises (``role``: e.g. "model.factory")."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: just call it
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as e:
            raise ResolveError(
                f"{role} {ref}{signature}: {e}; given {sorted(kwargs) or 'no arguments'}",
                kwargs_field,
            ) from None
    try:
        return fn(**kwargs)
    except Exception as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ResolveError(
            f"{role} {ref} raised {type(e).__name__}" + (f": {message}" if message else ""),
            ref_field,
        ) from None
