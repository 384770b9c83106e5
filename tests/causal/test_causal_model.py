"""Safe expressions and the high-level causal model."""

from __future__ import annotations

import pytest

from mi_spec.causal.graph import CausalModel
from mi_spec.causal.values import ExpressionError, evaluate, names
from mi_spec.errors import ResolveError
from mi_spec.spec.sections import Variable


def test_expressions_compute():
    env = {"tokens": [5, 6, 7, 5], "a": 1, "b": 1}
    assert evaluate("tokens[pos-1] if pos > 0 else -1", {**env, "pos": 2}) == 6
    assert evaluate("(a == b) and len(tokens) == 4", env) is True
    assert evaluate("tokens[1:3] + [max(tokens)]", env) == [6, 7, 7]
    assert evaluate("tokens[-1] in tokens[:-1]", env) is True
    assert names("tokens[pos-1] + a") == {"tokens", "pos", "a"}


@pytest.mark.parametrize(
    "bad",
    ["__import__('os')", "tokens.__class__", "[x for x in tokens]", "lambda: 1", "open('f')"],
)
def test_unsafe_expressions_are_rejected(bad):
    with pytest.raises(ExpressionError):
        evaluate(bad, {"tokens": [1]})


def _hier_eq():
    return CausalModel(
        {
            "wx": Variable(value="a == b"),
            "yz": Variable(value="c == d"),
            "label": Variable(value="wx == yz"),
        },
        columns={"a", "b", "c", "d"},
    )


def test_graph_and_counterfactual():
    m = _hier_eq()
    assert m.parents("label") == ["wx", "yz"] and m.descendants("wx") == {"label"}
    base = {"tokens": [0], "a": 1, "b": 1, "c": 2, "d": 3}  # wx=T, yz=F -> label F
    source = {"tokens": [0], "a": 1, "b": 2, "c": 0, "d": 0}  # wx=F
    assert m.compute(base)["label"] is False
    assert m.counterfactual(base, source, ["wx"])["label"] is True
    assert m.counterfactual(base, source, ["yz"])["label"] is True
    assert m.counterfactual(base, source, ["wx", "yz"])["label"] is False


def test_per_position_variables():
    m = CausalModel(
        {"prev": Variable(value="tokens[pos-1] if pos > 0 else -1", per_position=True)},
        columns=set(),
    )
    assert m.compute({"tokens": [4, 8, 9]})["prev"] == [-1, 4, 8]


def test_cycles_and_unknown_names_are_errors():
    with pytest.raises(ResolveError, match="cycle"):
        CausalModel({"x": Variable(value="y"), "y": Variable(value="x")}, columns=set())
    with pytest.raises(ResolveError, match="neither variables nor dataset columns"):
        CausalModel({"x": Variable(value="nope + 1")}, columns={"a"})
