"""References to Python objects written in hypothesis files as "package.module:attr.path"."""

from __future__ import annotations

import importlib
import re
from typing import Any

from mi_spec.errors import ResolveError

_NAME = r"[^\W\d]\w*"
_REF = re.compile(rf"{_NAME}(?:\.{_NAME})*:{_NAME}(?:\.{_NAME})*")


def is_ref(s: str) -> bool:
    """Whether `s` has the form "package.module:attr" (attr may be dotted, e.g. "m:Cls.method")."""
    return isinstance(s, str) and _REF.fullmatch(s) is not None


def import_ref(ref: str) -> Any:
    """The object `ref` ("package.module:attr.path") names; ResolveError if it does not import."""
    if not is_ref(ref):
        raise ResolveError(f"invalid reference {ref!r}: expected 'package.module:attribute'")
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ResolveError(f"cannot import {ref!r}: no module named {err.name!r}") from err
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
