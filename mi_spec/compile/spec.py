"""The whole hypothesis file as one pydantic model. It sits above ``experiments/`` because its
``experiments`` list is the discriminated union of every registered kind."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, model_validator

from mi_spec.experiments.base import kinds
from mi_spec.spec.sections import (
    DataSection,
    MetricSection,
    ModelSection,
    Section,
    SubspaceSection,
    Variable,
)


def _experiment_union() -> Any:
    specs = tuple(k.spec for k in kinds().values())
    return Annotated[Union[specs], Field(discriminator="kind")]  # noqa: UP007 (runtime tuple)


class Spec(Section):
    """A circuit hypothesis: the model, the data, the high-level causal model and experiments."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.\-]*$", description="Names the MLflow runs")
    description: str = ""
    model: ModelSection
    data: DataSection
    metric: MetricSection = Field(default_factory=MetricSection)
    variables: dict[str, Variable] = Field(
        default_factory=dict, description="The high-level causal model's variables"
    )
    subspaces: dict[str, SubspaceSection] = Field(
        default_factory=dict,
        description="Named subspaces (DAS rotation blocks, basis files, SAE features); a site "
        "`L1.resid_pre[name]` then means that subspace of the site, `[name:3]` one coordinate",
    )
    correspondence: dict[str, list[str]] = Field(
        default_factory=dict, description="Variable -> the model sites that compute it"
    )
    experiments: list[_experiment_union()] = Field(  # type: ignore[valid-type]
        default_factory=list, description="What to run; each item has a `kind`"
    )
    max_batch_rows: int = Field(
        64,
        ge=1,
        description="Rows per forward pass when packing intervention variants (on CPU, large "
        "packed passes cost more in page faults than they save; raise it on GPUs)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        labels = [e.label for e in self.experiments]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(
                f"experiment names must be unique, found {dupes} more than once; give each a `name`"
            )
        unknown = sorted(set(self.correspondence) - set(self.variables))
        if unknown:
            raise ValueError(f"correspondence names undeclared variables: {unknown}")
        return self
