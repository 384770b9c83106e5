"""Expressions have bounded cost, and a bad one is a located error, never a traceback or a hang."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from mi_spec.causal import values
from mi_spec.causal.graph import CausalModel
from mi_spec.causal.values import (
    MAX_DEPTH,
    MAX_INT_BITS,
    MAX_LENGTH,
    MAX_NODES,
    MAX_SIZE,
    ExpressionError,
    LimitError,
    evaluate,
    parse,
)
from mi_spec.cli.main import main
from mi_spec.compile.resolve import load_spec
from mi_spec.errors import MiSpecError, ResolveError, SpecError
from mi_spec.spec.sections import Variable

BAD = Path(__file__).resolve().parents[1] / "spec" / "bad"
ENV = {"tokens": [5, 6, 7, 5], "tok": [5, 6, 7, 5], "pos": 1, "a": 1, "b": 1, "c": 2, "d": 3}
FAST_S = 2.0  # "well under a second", with room for a loaded machine


def fails_fast(expr: str, match: str, env: dict | None = None, exc=LimitError) -> str:
    start = time.monotonic()
    with pytest.raises(exc, match=match) as err:
        evaluate(expr, ENV if env is None else env)
    assert time.monotonic() - start < FAST_S, expr[:80]
    return str(err.value)


def test_expression_errors_are_resolve_errors():
    assert issubclass(ExpressionError, ResolveError) and issubclass(ExpressionError, MiSpecError)
    assert issubclass(LimitError, ExpressionError)
    assert issubclass(ExpressionError, ValueError)  # callers that caught ValueError still do
    assert ExpressionError("x").exit_code == 2


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("tokens[pos-1]", 5),
        ("(a==b)==(c==d)", False),
        ("2**10", 1024),
        ("2**4096 > 0", True),
        ("(-1) ** (10**100)", 1),
        ("2 ** -3", 0.125),
        ("1.5 ** 1000", 1.5**1000),
        ("[0]*8", [0] * 8),
        ("'ab' * 3", "ababab"),
        ("3 * (1, 2)", (1, 2, 1, 2, 1, 2)),
        ("tokens[1:3] + [max(tokens)]", [6, 7, 7]),
        ("sum(tokens) + sum(tokens, 1)", 47),
        ("round(2.567, 2)", 2.57),
        ("round(1234, -2)", 1200),
        ("x if False else 1", 1),
        ("tokens[0] if True else 1 / 0", 5),  # an untaken failing branch is not an error
    ],
)
def test_normal_expressions_still_work(expr, expected):
    assert evaluate(expr, {**ENV, "x": 0}) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "__import__('os')",
        "tokens.__class__",
        "tokens.__class__.__mro__",
        "().__class__.__base__.__subclasses__()",
        "[x for x in tokens]",
        "{x: 1 for x in tokens}",
        "(x for x in tokens)",
        "lambda: 1",
        "open('f')",
        "sorted(tokens, key=abs)",
        "tokens[0] << 3",
        "f'{tokens}'",
        "'%s' % tokens",
    ],
)
def test_unsafe_constructs_are_still_refused(bad):
    with pytest.raises(ExpressionError):
        evaluate(bad, ENV)


def test_pow_bomb_is_refused_before_it_is_computed():
    msg = fails_fast("9**9**9", "MAX_INT_BITS")
    assert str(MAX_INT_BITS) in msg
    fails_fast("tok[pos] + 2**10000000", f"MAX_INT_BITS = {MAX_INT_BITS}")
    fails_fast("a ** n", "MAX_INT_BITS", {"a": 3, "n": 10**9})  # not foldable: checked per row
    fails_fast("round(5, -10**7)", "MAX_INT_BITS")


def test_float_overflow_is_a_clean_error():
    fails_fast("2.0 ** 5000", "OverflowError", exc=ExpressionError)


def test_big_int_multiplication_is_refused():
    fails_fast("x * x", f"MAX_INT_BITS = {MAX_INT_BITS}", {"x": 2**4000})
    fails_fast("(2**4000) * (2**4000) * (2**4000)", "MAX_INT_BITS")


def test_repetition_is_bounded():
    msg = fails_fast("'a' * 10**10", "MAX_SIZE")
    assert str(MAX_SIZE) in msg
    fails_fast("10**10 * [0]", "MAX_SIZE")
    fails_fast("tok * n", "MAX_SIZE", {"tok": [1, 2], "n": 10**12})
    fails_fast("[[0] * 1000] * 1000", "MAX_SIZE")  # nested elements count


def test_concatenation_and_literals_are_bounded():
    big = [0] * 60_000
    fails_fast("x + x", "MAX_SIZE", {"x": big})
    fails_fast("s + s", "MAX_SIZE", {"s": "a" * 60_000})
    fails_fast("[x, x]", "MAX_SIZE", {"x": big})
    fails_fast("sum(x, [])", "numbers only", {"x": [[0]] * 10}, exc=ExpressionError)
    # variables built on variables cannot double their way past the bound either
    m = CausalModel({f"v{i + 1}": Variable(value=f"v{i} + v{i}") for i in range(40)}, {"v0"})
    start = time.monotonic()
    with pytest.raises(LimitError, match="MAX_SIZE") as err:
        m.compute({"tokens": [0], "v0": [0]})
    assert time.monotonic() - start < FAST_S
    assert err.value.field == ("v17", "value")


def test_length_depth_and_node_limits():
    for n_terms in (1_000, 100_000):
        expr = "+".join(["tokens[0]"] * n_terms)
        fails_fast(expr, f"MAX_LENGTH = {MAX_LENGTH}")
    fails_fast("-" * 60 + "1", f"MAX_DEPTH = {MAX_DEPTH}")
    fails_fast("-" * (MAX_LENGTH - 1) + "1", f"MAX_DEPTH = {MAX_DEPTH}")
    fails_fast("[" * 60 + "]" * 60, f"MAX_DEPTH = {MAX_DEPTH}")
    fails_fast("not " * 400 + "a", f"MAX_DEPTH = {MAX_DEPTH}")
    fails_fast("[" + ",".join(["1"] * 600) + "]", f"MAX_NODES = {MAX_NODES}")
    fails_fast("(" * 900 + "1" + ")" * 900, "invalid expression", exc=ExpressionError)
    assert evaluate("-" * (MAX_DEPTH - 2) + "1", {}) == 1


@pytest.mark.parametrize("error", [RecursionError, MemoryError])
def test_parser_recursion_is_a_clean_error(monkeypatch, error):
    def deep(*args, **kwargs):
        raise error("too deep for the parser")

    monkeypatch.setattr(ast, "parse", deep)
    with pytest.raises(ExpressionError, match=error.__name__):
        parse(f"a + 1  # {error.__name__}")  # a new text: parse is cached


def test_over_limit_constants_fail_at_parse_time():
    with pytest.raises(LimitError, match="MAX_SIZE"):
        parse("tokens[0] + len('a' * 10**10)")
    with pytest.raises(LimitError, match="MAX_INT_BITS"):
        values.names("x if x else 9**9**9")


def test_causal_model_locates_expression_errors():
    for value, match in [
        ("a.__class__", "Attribute is not allowed"),
        ("a +", "invalid expression"),
        ("a + 9**9**9", "MAX_INT_BITS"),
        ("+".join(["a"] * 100_000), "MAX_LENGTH"),
    ]:
        with pytest.raises(ExpressionError, match=match) as err:
            CausalModel({"ok": Variable(value="a"), "bad": Variable(value=value)}, {"a"})
        assert err.value.field == ("bad", "value")


def test_row_failures_name_the_variable():
    m = CausalModel({"nxt": Variable(value="tokens[pos + 1]", per_position=True)}, set())
    with pytest.raises(ExpressionError, match="variable 'nxt' at position 1.*IndexError") as err:
        m.compute({"tokens": [1, 2]})
    assert err.value.field == ("nxt", "value")


def test_value_with_parents_is_rejected():
    with pytest.raises(ValueError, match="`parents` is only for `fn:` variables"):
        Variable(value="a == b", parents=["a"])
    with pytest.raises(ValueError, match="`parents` is only for `fn:` variables"):
        Variable(column="a", parents=["a"])
    assert Variable(fn="mi_spec.zoo.handbuilt:induction_target", parents=["a"]).parents == ["a"]
    path = BAD / "value_with_parents.yaml"
    with pytest.raises(SpecError) as err:
        load_spec(path)
    ((where, issue),) = [((i.file, i.line, i.path), i.message) for i in err.value.issues]
    assert where == (str(path), 11, "variables.O")
    assert "read from its expression" in issue


HYPOTHESIS = """\
name: bad-expression
model:
  factory: mi_spec.zoo.equality:equality_mlp
data:
  generator: mi_spec.zoo.equality:hierarchical_equality
  params: {{n: 8, seed: 1}}
metric: {{kind: accuracy, at: last, target: label}}
variables:
  WX: {{value: "a == b"}}
  YZ: {{value: "c == d"}}
  O:  {{value: "{value}"}}
experiments: []
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("WX == YZ + 9 ** 9 ** 9", f"MAX_INT_BITS = {MAX_INT_BITS}"),
        ("WX.__class__", "Attribute is not allowed"),
        ("WX ==", "invalid expression"),
    ],
)
def test_cli_locates_a_bad_expression(tmp_path, capsys, value, needle):
    path = tmp_path / "h.yaml"
    path.write_text(HYPOTHESIS.format(value=value))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:11:" in err and "variables.O.value" in err and needle in err, err
    assert "Traceback" not in err
