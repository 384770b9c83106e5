"""The high-level causal model: variables as a networkx DiGraph, computed per example.

Edges come from what each variable reads: an expression's free names, a column, or an ``fn``'s
declared ``parents``. ``compute`` evaluates every variable for one row in topological order, with
some variables optionally held fixed (an intervention): the basis of counterfactual labels (DAS)
and of agreement conditions (causal scrubbing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import networkx as nx

from mi_spec.causal.values import ExpressionError, evaluate, names
from mi_spec.errors import ResolveError
from mi_spec.spec.refs import import_ref
from mi_spec.spec.sections import Variable

INPUT = "input"  # node attribute kind for dataset columns / tokens


class CausalModel:
    def __init__(self, variables: Mapping[str, Variable], columns: set[str]):
        self.variables = dict(variables)
        inputs = set(columns) | {"tokens"}
        self.graph = nx.DiGraph()
        for name, var in self.variables.items():
            self.graph.add_node(name, kind="variable", per_position=var.per_position)
            for dep in self._reads(name, var, inputs):
                if dep not in self.graph:
                    self.graph.add_node(dep, kind=INPUT, per_position=False)
                self.graph.add_edge(dep, name)
        try:
            cycle = nx.find_cycle(self.graph)
            raise ResolveError(
                "variables form a cycle: " + " -> ".join([u for u, _ in cycle] + [cycle[0][0]]),
                (cycle[0][1],),
            )
        except nx.NetworkXNoCycle:
            pass
        self.order = [n for n in nx.topological_sort(self.graph) if n in self.variables]
        self._fns = {n: import_ref(v.fn) for n, v in self.variables.items() if v.fn}

    def _reads(self, name: str, var: Variable, inputs: set[str]) -> list[str]:
        if var.column is not None:
            deps = [var.column]
        elif var.value is not None:
            try:
                deps = sorted(names(var.value) - {"pos"})
            except ExpressionError as e:  # located at variables.<name>.value by the resolver
                raise type(e)(str(e), (name, "value")) from None
        else:
            deps = list(var.parents)
        known = inputs | set(self.variables)
        unknown = [d for d in deps if d not in known]
        if unknown:
            raise ResolveError(
                f"variable {name!r} reads {unknown}, which are neither variables nor dataset "
                f"columns (columns: {', '.join(sorted(inputs))})",
                (name,),
            )
        return deps

    def parents(self, name: str) -> list[str]:
        return sorted(self.graph.predecessors(name))

    def descendants(self, name: str) -> set[str]:
        return set(nx.descendants(self.graph, name))

    def compute(self, row: Mapping[str, Any], fixed: Mapping[str, Any] | None = None) -> dict:
        """Every variable's value on ``row``; variables in ``fixed`` take the given value."""
        fixed = fixed or {}
        env: dict[str, Any] = dict(row)
        for name in self.order:
            env[name] = fixed[name] if name in fixed else self._value(name, row, env)
        return {n: env[n] for n in self.order}

    def _value(self, name: str, row: Mapping[str, Any], env: dict[str, Any]) -> Any:
        var = self.variables[name]
        if not var.per_position:
            return self._one(name, var, row, env, None)
        return [self._one(name, var, row, env, p) for p in range(len(row["tokens"]))]

    def _one(self, name: str, var: Variable, row, env, pos: int | None) -> Any:
        if var.column is not None:
            value = env[var.column]
            return value[pos] if pos is not None and isinstance(value, list) else value
        if var.value is not None:
            try:
                return evaluate(var.value, env if pos is None else {**env, "pos": pos})
            except ExpressionError as e:
                where = "" if pos is None else f" at position {pos}"
                raise type(e)(f"variable {name!r}{where}: {e}", (name, "value")) from None
        fn = self._fns[name]
        return fn(row, env) if pos is None else fn(row, env, pos)

    def counterfactual(
        self, base: Mapping[str, Any], source: Mapping[str, Any], swap: list[str]
    ) -> dict[str, Any]:
        """The base's variables after setting each variable in ``swap`` to its source value."""
        src = self.compute(source)
        return self.compute(base, {v: src[v] for v in swap})
