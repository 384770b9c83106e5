"""The experiment-kind protocol and its registry.

A kind is one module in this folder: a pydantic spec (``kind`` as a literal tag), a pure ``compile``
(spec + resolved context -> Jobs made of the shared job ops) and an ``analyse`` (job results ->
ExperimentReport with stable metric names). Registering is one line; the spec union, the JSON Schema
and "unknown kind" errors pick it up with no other edit. No torch here.
"""

from __future__ import annotations

import importlib
import pkgutil
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import Field

from mi_spec.analysis.report import ExperimentReport
from mi_spec.causal.graph import CausalModel
from mi_spec.data.dataset import Dataset
from mi_spec.models.attention_probe import AttentionPattern
from mi_spec.plan.ir import Job, JobResult
from mi_spec.sites.adapter import Dims, SiteBinding
from mi_spec.spec.sections import MetricSection, PositionSpec, Section


class ExperimentSpec(Section):
    """Fields every experiment has. Subclasses add ``kind: Literal[...]`` and their own fields."""

    name: str | None = Field(
        None, description="Unique name within the file (default: the kind); names the MLflow run"
    )
    samples: int | None = Field(None, ge=1, description="Base examples to use (default: all)")
    batch_size: int = Field(64, ge=1, description="Base examples per job")
    seed: int = Field(0, description="Seed for sampling examples and sources")

    kind_name: ClassVar[str] = ""

    @property
    def label(self) -> str:
        return self.name or self.kind_name


@dataclass(frozen=True)
class CompileContext:
    """What a kind may look at when compiling: data, named positions, sites, metric. No model."""

    hypothesis: str
    data: Dataset
    positions: dict[str, PositionSpec]
    vocabulary: list[str]
    bind: Callable[[str], SiteBinding]
    metric: MetricSection
    dims: Dims
    causal: CausalModel | None = None  # the high-level model (variables), when declared
    correspondence: dict[str, list[str]] = field(default_factory=dict)  # variable -> sites
    base_dir: str = "."  # the hypothesis file's folder: relative paths in experiment fields
    attention: Callable[[], AttentionPattern] | None = None  # the model's, probed on first call


class ExperimentKind(Protocol):
    spec: type[ExperimentSpec]

    def compile(self, spec: Any, ctx: CompileContext) -> list[Job]: ...

    def analyse(
        self, spec: Any, ctx: CompileContext, jobs: Sequence[Job], results: Sequence[JobResult]
    ) -> ExperimentReport: ...


_KINDS: dict[str, ExperimentKind] = {}
_ALL_IMPORTED: list[bool] = []  # set once every module of the package has been imported


def register(kind: ExperimentKind) -> ExperimentKind:
    name = kind.spec.kind_name
    if not name or name in _KINDS:
        raise ValueError(f"experiment kind {name!r} is unnamed or registered twice")
    _KINDS[name] = kind
    return kind


def kinds() -> dict[str, ExperimentKind]:
    """All kinds: the modules in this package (imported once) register themselves."""
    if not _ALL_IMPORTED:  # not `if not _KINDS`: one kind imported directly registers itself
        package = importlib.import_module("mi_spec.experiments")
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in ("base", "effects") and not info.name.startswith("_"):
                importlib.import_module(f"mi_spec.experiments.{info.name}")
        _ALL_IMPORTED.append(True)
    return dict(_KINDS)


def sample_rows(n_rows: int, samples: int | None, seed: int) -> list[int]:
    """The base rows an experiment uses: all rows, or a seeded sample of ``samples`` of them."""
    rows = list(range(n_rows))
    if samples is None or samples >= n_rows:
        return rows
    return sorted(random.Random(seed).sample(rows, samples))


def resample_sources(rows: Sequence[int], n_rows: int, seed: int) -> list[int]:
    """For each base row, a different row drawn uniformly (seeded): the resampling source."""
    if n_rows < 2:
        raise ValueError("resampling needs at least 2 dataset rows")
    rng = random.Random(seed + 7919)
    out = []
    for r in rows:
        s = rng.randrange(n_rows - 1)
        out.append(s if s < r else s + 1)
    return out


def chunks(seq: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(seq[i : i + size]) for i in range(0, len(seq), size)]


def metric_label(label: str) -> str:
    """A site label as an MLflow-safe metric-name segment: ``L1.H2:q@last`` -> ``L1.H2.q.last``."""
    return label.replace(":", ".").replace("@", ".").replace("*", "x")
