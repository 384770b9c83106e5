"""What analysis hands to tracking: plain values, already rendered figures, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExperimentReport:
    """One experiment's results, ready to log as one MLflow child run.

    `metrics` use stable dotted names (``patch.max_effect``, ``patch.max_effect.ci_low``);
    `headline` is the subset also logged on the parent run (MLflow hides child metrics by default).
    """

    name: str  # unique run name, e.g. "activation_patching@induction-patching"
    kind: str
    metrics: dict[str, float] = field(default_factory=dict)
    headline: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # "effects.csv" -> rows
    figures: dict[str, bytes] = field(default_factory=dict)  # "heatmap.png" -> PNG bytes
    files: dict[str, bytes] = field(default_factory=dict)  # other artifacts ("rotation.pt")
    series: dict[str, list[float]] = field(default_factory=dict)  # metric -> values by step
    warnings: list[str] = field(default_factory=list)


@dataclass
class StudyRecord:
    """Everything about one `mi-spec run` that is known before execution starts."""

    name: str
    params: dict[str, Any]  # resolved spec, flattened, plus model/data hashes, seeds, versions
    tags: dict[str, str]
    artifacts: dict[str, str]  # file name -> text (resolved YAML, plan JSON)
    # the data as a dataset input: name, digest, source_type, source, n_rows, columns
    # (see `mi_spec.tracking.provenance.dataset_identity`); empty: none logged
    dataset: dict[str, Any] = field(default_factory=dict)
