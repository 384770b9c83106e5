"""DAS counterfactual pairs from the high-level causal model: sample base and source rows, set the
swapped variables in the base to their source values, recompute the output variable; balanced
over counterfactual labels. Pure Python, at compile time."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from mi_spec.causal.graph import CausalModel
from mi_spec.data.positions import resolve_role
from mi_spec.experiments.base import CompileContext

if TYPE_CHECKING:
    from mi_spec.experiments.das import DasSpec


class PairSampler:
    """Counterfactual pairs from the causal model; values are computed once per row."""

    def __init__(self, ctx: CompileContext, causal: CausalModel, spec: DasSpec, output: str):
        self.ctx, self.causal, self.spec, self.output = ctx, causal, spec, output
        self._values: dict[int, dict[str, Any]] = {}

    def values(self, row: int) -> dict[str, Any]:
        if row not in self._values:
            self._values[row] = self.causal.compute(self.ctx.data.row(row))
        return self._values[row]

    def token(self, row: int, value: Any) -> int:
        """The output value as a token id, at the metric position for per-position outputs."""
        if isinstance(value, list):
            (pos,) = resolve_role(self.ctx.metric.at, self.ctx.positions, self.ctx.data, [row])
            value = value[pos[0]]
        if self.spec.labels is not None:
            key = next((k for k in self.spec.labels if k.lower() == str(value).lower()), None)
            if key is None:
                raise ValueError(f"das labels: no token id for output value {value!r}")
            return self.spec.labels[key]
        if isinstance(value, bool | int):
            return int(value)
        raise ValueError(f"das: output value {value!r} is not a token id; map it with `labels:`")

    def sample(self, rows: list[int], n: int, sets: list[list[str]], rng: random.Random) -> dict:
        """``n`` pairs, an equal share per swap set, balanced over counterfactual labels."""
        names = self.spec.variable_list
        out: dict[str, list] = {"base": [], "labels": [], "base_labels": [], "swap": []}
        out["sources"] = [[] for _ in names]
        for s, swapped in enumerate(sets):
            share = n // len(sets) + (s < n % len(sets))
            for base, srcs, label in self._balanced(rows, share, swapped, rng):
                out["base"].append(base)
                out["labels"].append(label)
                out["base_labels"].append(self.token(base, self.values(base)[self.output]))
                out["swap"].append(s)
                for i, v in enumerate(names):
                    out["sources"][i].append(srcs.get(v, -1))
        if n and not out["base"]:
            raise ValueError(f"das: no pair with a defined counterfactual {self.output!r} label")
        return out

    def _balanced(self, rows: list[int], n: int, swapped: list[str], rng: random.Random) -> list:
        by_label: dict[int, list] = defaultdict(list)
        for tries in range(20 * n):
            base = rng.choice(rows)
            srcs = {v: rng.choice(rows) for v in swapped}
            fixed = {v: self.values(s)[v] for v, s in srcs.items()}
            value = self.causal.compute(self.ctx.data.row(base), fixed)[self.output]
            label = self.token(base, value)
            if label >= 0:  # a negative output (e.g. -1) is undefined: no pair
                by_label[label].append((base, srcs, label))
            if tries + 1 >= n and min(map(len, by_label.values()), default=0) * len(by_label) >= n:
                break
        groups = [by_label[k] for k in sorted(by_label)]
        picked: list = []
        while len(picked) < n and any(groups):
            picked += [g.pop() for g in groups if g][: n - len(picked)]
        rng.shuffle(picked)
        return picked


def output_variable(causal: CausalModel, names: list[str], given: str | None) -> str:
    """The high-level output a swap of ``names`` is scored on: ``given``, or their one common sink."""
    for v in [*names, *([given] if given else [])]:
        if v not in causal.variables:
            raise ValueError(f"das: {v!r} is not a declared variable ({', '.join(causal.order)})")
    if given is None:
        common = set.intersection(*(causal.descendants(v) | {v} for v in names))
        common &= set(causal.variables)
        sinks = sorted(v for v in common if not causal.descendants(v))
        if len(sinks) != 1:
            raise ValueError(f"das: set `output` (candidate sinks: {sinks or 'none'})")
        given = sinks[0]
    for v in names:
        if v != given and given not in causal.descendants(v):
            raise ValueError(f"das: output {given!r} does not depend on {v!r}; swapping it never "
                             "changes the label")  # fmt: skip
    return given
