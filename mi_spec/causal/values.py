"""A safe expression evaluator for high-level variables (no ``eval``, no attribute access).

Allowed: literals, names (dataset columns, ``tokens``, ``pos``, other variables), arithmetic,
comparisons, ``and``/``or``/``not``, ``x if c else y``, subscripts and slices, list/tuple literals,
``in``, and calls to a few pure functions (len, min, max, abs, int, float, bool, sum, any, all,
sorted, tuple, list, round). Anything else (attributes, dunders, lambdas, comprehensions, keyword
arguments, ``<<``, ``%``-formatting of strings) is rejected when the expression is parsed, with its
position, before any data is touched.

Expressions come from hypothesis files, which may be untrusted, so their cost is bounded. Each
limit below is checked *before* the work it guards is done, and an expression that would go over
one fails at once with an `ExpressionError` (a `LimitError`) naming the limit and its value:

- ``MAX_LENGTH`` (2000): characters of expression text.
- ``MAX_DEPTH`` (50): nesting depth of the expression's syntax tree (``a + b`` has depth 2; a
  chain ``a + b + c + ...`` of n terms has depth n).
- ``MAX_NODES`` (500): sub-expressions (names, literals, operations) in one expression.
- ``MAX_INT_BITS`` (4096): bits of an integer made by ``*`` or ``**`` (``a ** b`` is refused when
  ``b * log2(|a|)`` exceeds it), or of the power of ten that ``round(int, -n)`` computes. Float
  arithmetic is not limited (it cannot grow), but an overflow is a clean error.
- ``MAX_SIZE`` (100_000): elements of a string, list or tuple made by repetition (``seq * n``),
  concatenation (``a + b``) or a list/tuple literal, counting the elements of nested lists and
  tuples too (``[[0] * 1000] * 1000`` has size 1_001_000), so that comparing, sorting or
  searching any value an expression builds stays cheap.

Sub-expressions without free names (``9 ** 9 ** 9``, ``'a' * 10 ** 10``) are evaluated when the
expression is parsed, so an over-limit constant fails at parse time (``mi-spec validate``), not on
the first row. ``sum`` adds numbers only.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Iterable, Mapping
from functools import lru_cache
from itertools import compress
from typing import Any

from mi_spec.errors import ResolveError

MAX_LENGTH = 2000
MAX_DEPTH = 50
MAX_NODES = 500
MAX_INT_BITS = 4096
MAX_SIZE = 100_000

_SEQUENCES = (str, bytes, list, tuple)
_CONTAINERS = frozenset({list, tuple, dict})
_LOG2_10 = math.log2(10)


class ExpressionError(ResolveError, ValueError):
    """An expression that is not allowed, or that failed on a row.

    A `ResolveError` (exit code 2, located by ``field``); still a ``ValueError`` for callers that
    caught it as one.
    """


class LimitError(ExpressionError):
    """An expression that would go over one of the module's cost limits."""


def _show(expr: str, width: int = 80) -> str:
    return repr(expr if len(expr) <= width else expr[:width] + "...")


def _sum(iterable: Iterable[Any], start: Any = 0) -> Any:
    items = list(iterable)
    if isinstance(start, _SEQUENCES) or any(isinstance(i, _SEQUENCES) for i in items):
        raise ExpressionError("sum() adds numbers only; join sequences with +")
    return sum(items, start)


def _round(number: Any, ndigits: Any = None) -> Any:
    if ndigits is None:
        return round(number)
    n = operator.index(ndigits)
    if isinstance(number, int) and n < 0 and -n * _LOG2_10 > MAX_INT_BITS:
        raise LimitError(
            f"round(x, {n}) on an integer computes 10 ** {-n}, about {-n * _LOG2_10:.3g} bits; "
            f"the limit is MAX_INT_BITS = {MAX_INT_BITS}"
        )
    return round(number, n)


FUNCTIONS: dict[str, Any] = {
    **{
        f.__name__: f for f in (len, min, max, abs, int, float, bool, any, all, sorted, tuple, list)
    },
    "sum": _sum,
    "round": _round,
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


@lru_cache(maxsize=512)
def parse(expr: str) -> ast.Expression:
    """Parse and vet an expression; raises ExpressionError naming the offending construct/limit."""
    if len(expr) > MAX_LENGTH:
        raise LimitError(
            f"expression {_show(expr)} is {len(expr)} characters long; "
            f"the limit is MAX_LENGTH = {MAX_LENGTH}"
        )
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        where = f" at column {e.offset}" if e.offset is not None else ""
        raise ExpressionError(f"invalid expression {_show(expr)}: {e.msg}{where}") from None
    except (RecursionError, MemoryError, ValueError) as e:  # too deep for the parser; NUL bytes
        raise ExpressionError(
            f"invalid expression {_show(expr)}: {type(e).__name__}: {e}"
        ) from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise ExpressionError(
                f"expression {_show(expr)}: {type(node).__name__} is not allowed "
                f"(column {getattr(node, 'col_offset', 0) + 1})"
            )
        if isinstance(node, ast.Call) and (
            not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords
        ):
            raise ExpressionError(
                f"expression {_show(expr)}: only calls to {', '.join(sorted(FUNCTIONS))} "
                "are allowed, with positional arguments"
            )
    _check_shape(tree, expr)
    _check_constants(tree, expr)
    return tree


def _check_shape(tree: ast.Expression, expr: str) -> None:
    """MAX_DEPTH and MAX_NODES, iteratively (a deep tree must not overflow our own stack)."""
    count = 0
    stack = [(tree.body, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise LimitError(
                f"expression {_show(expr)} is nested more than {MAX_DEPTH} deep; "
                f"the limit is MAX_DEPTH = {MAX_DEPTH}"
            )
        if count > MAX_NODES:
            raise LimitError(
                f"expression {_show(expr)} has more than {MAX_NODES} terms and operations; "
                f"the limit is MAX_NODES = {MAX_NODES}"
            )
        stack.extend((c, depth + 1) for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr))


def _check_constants(tree: ast.Expression, expr: str) -> None:
    """Evaluate each largest sub-expression without free names, so over-limit constants fail now.

    Only limit errors are raised: ``1 / 0`` in a branch that is never taken is not an error.
    """
    free: dict[ast.AST, bool] = {}
    order = []
    stack: list[ast.AST] = [tree.body]
    while stack:  # pre-order; reversed, children come before parents
        node = stack.pop()
        order.append(node)
        stack.extend(ast.iter_child_nodes(node))
    for node in reversed(order):
        free[node] = (isinstance(node, ast.Name) and node.id not in FUNCTIONS) or any(
            free[c] for c in ast.iter_child_nodes(node)
        )
    stack = [tree.body]
    while stack:
        node = stack.pop()
        if free[node]:
            stack.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr))
        elif not isinstance(node, ast.Constant | ast.Name):
            try:
                _eval(node, {})
            except LimitError as e:
                raise LimitError(f"expression {_show(expr)}: {e}") from None
            except Exception:
                pass


def names(expr: str) -> set[str]:
    """The free names an expression reads (its dependencies), minus the allowed functions."""
    return {
        n.id for n in ast.walk(parse(expr)) if isinstance(n, ast.Name) and n.id not in FUNCTIONS
    }


def evaluate(expr: str, env: Mapping[str, Any]) -> Any:
    """Evaluate ``expr`` with names bound from ``env``."""
    tree = parse(expr)
    try:
        return _eval(tree.body, env)
    except ExpressionError as e:
        raise type(e)(f"expression {_show(expr)}: {e}") from None
    except Exception as e:
        raise ExpressionError(f"expression {_show(expr)} failed: {type(e).__name__}: {e}") from None


def _size(value: Any, budget: int) -> int:
    """Elements of ``value``, counting through nested lists/tuples/dicts; stops past ``budget``."""
    total = 0
    stack = [value]
    while stack and total <= budget:
        v = stack.pop()
        if isinstance(v, str | bytes):
            total += len(v)
        elif isinstance(v, list | tuple | dict):
            total += len(v)
            if total <= budget:
                items = v.values() if isinstance(v, dict) else v
                stack.extend(compress(items, map(_CONTAINERS.__contains__, map(type, items))))
    return total


def _check_size(size: int, what: str) -> None:
    if size > MAX_SIZE:
        raise LimitError(
            f"{what} would hold more than {MAX_SIZE} elements; the limit is MAX_SIZE = {MAX_SIZE}"
        )


def _index(value: Any) -> int | None:
    if isinstance(value, _SEQUENCES):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _binop(op: type, a: Any, b: Any) -> Any:
    """``a <op> b``, refused before it is computed when it would go over a limit."""
    if op is ast.Add and isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
        sa = _size(a, MAX_SIZE)
        _check_size(sa + _size(b, MAX_SIZE - sa), "the concatenation a + b")
    elif op is ast.Mult:
        if isinstance(a, int) and isinstance(b, int):
            if a.bit_length() + b.bit_length() > MAX_INT_BITS:
                raise LimitError(
                    f"a * b would have about {a.bit_length() + b.bit_length()} bits; "
                    f"the limit is MAX_INT_BITS = {MAX_INT_BITS}"
                )
        else:
            seq, n = (a, _index(b)) if isinstance(a, _SEQUENCES) else (b, _index(a))
            if isinstance(seq, _SEQUENCES) and n is not None and n > 1:
                size = _size(seq, MAX_SIZE)
                if size * n > MAX_SIZE:
                    _check_size(size * n, "the repetition seq * n")
    elif op is ast.Pow and isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        bits = b * math.log2(abs(a))
        if bits > MAX_INT_BITS:
            raise LimitError(
                f"a ** b would have about {bits:.3g} bits; "
                f"the limit is MAX_INT_BITS = {MAX_INT_BITS}"
            )
    elif op is ast.Mod and isinstance(a, str | bytes):
        raise ExpressionError("%-formatting of strings is not allowed")
    return _BIN[op](a, b)


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
        return _binop(type(node.op), _eval(node.left, env), _eval(node.right, env))
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
        _check_size(_size(items, MAX_SIZE), f"this {type(node).__name__.lower()} literal")
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Call):
        return _eval(node.func, env)(*(_eval(a, env) for a in node.args))
    raise ExpressionError(f"{type(node).__name__} is not allowed")
