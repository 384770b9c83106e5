"""A safe expression evaluator for high-level variables (no ``eval``, no attribute access).

Allowed: literals, names (dataset columns, ``tokens``, ``pos``, other variables), arithmetic,
comparisons, ``and``/``or``/``not``, ``x if c else y``, subscripts and slices, list/tuple literals,
``in``, and calls to a few pure functions (len, min, max, abs, int, float, bool, sum, any, all,
sorted, tuple, list, round). Anything else is rejected when the expression is parsed, with its
position, before any data is touched.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

FUNCTIONS: dict[str, Any] = {
    f.__name__: f
    for f in (len, min, max, abs, int, float, bool, sum, any, all, sorted, tuple, list, round)
}
_BIN = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
}
_CMP = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_ALLOWED = (
    ast.Expression, ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.UnaryOp, ast.BoolOp,
    ast.Compare, ast.IfExp, ast.Subscript, ast.Slice, ast.List, ast.Tuple, ast.Call,
    ast.And, ast.Or, *_BIN, *_CMP, *_UNARY,
)  # fmt: skip


class ExpressionError(ValueError):
    """An expression that is not allowed, or that failed on a row."""


@lru_cache(maxsize=512)
def parse(expr: str) -> ast.Expression:
    """Parse and vet an expression; raises ExpressionError naming the offending construct."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ExpressionError(
            f"invalid expression {expr!r}: {e.msg} at column {e.offset}"
        ) from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise ExpressionError(
                f"expression {expr!r}: {type(node).__name__} is not allowed "
                f"(column {getattr(node, 'col_offset', 0) + 1})"
            )
        if isinstance(node, ast.Call) and (
            not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords
        ):
            raise ExpressionError(
                f"expression {expr!r}: only calls to {', '.join(sorted(FUNCTIONS))} are allowed"
            )
    return tree


def names(expr: str) -> set[str]:
    """The free names an expression reads (its dependencies), minus the allowed functions."""
    return {
        n.id for n in ast.walk(parse(expr)) if isinstance(n, ast.Name) and n.id not in FUNCTIONS
    }


def evaluate(expr: str, env: Mapping[str, Any]) -> Any:
    """Evaluate ``expr`` with names bound from ``env``."""
    try:
        return _eval(parse(expr).body, env)
    except ExpressionError:
        raise
    except Exception as e:
        raise ExpressionError(f"expression {expr!r} failed: {type(e).__name__}: {e}") from None


def _eval(node: ast.AST, env: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in FUNCTIONS:
            return FUNCTIONS[node.id]
        if node.id not in env:
            raise ExpressionError(f"unknown name {node.id!r}; known: {', '.join(sorted(env))}")
        return env[node.id]
    if isinstance(node, ast.BinOp):
        return _BIN[type(node.op)](_eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, env))
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            result: Any = True
            for v in node.values:
                result = _eval(v, env)
                if not result:
                    return result
            return result
        result = False
        for v in node.values:
            result = _eval(v, env)
            if result:
                return result
        return result
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env)
        for op, comp in zip(node.ops, node.comparators, strict=True):
            right = _eval(comp, env)
            if not _CMP[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, env) else node.orelse, env)
    if isinstance(node, ast.Subscript):
        return _eval(node.value, env)[_eval(node.slice, env)]
    if isinstance(node, ast.Slice):
        parts = (node.lower, node.upper, node.step)
        return slice(*(None if p is None else _eval(p, env) for p in parts))
    if isinstance(node, ast.List | ast.Tuple):
        items = [_eval(e, env) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Call):
        return _eval(node.func, env)(*(_eval(a, env) for a in node.args))
    raise ExpressionError(f"{type(node).__name__} is not allowed")
