"""The Plan: plain, serializable, content-hashed intervention jobs. No torch objects, ever.

A Job runs on a batch of base rows. It makes at most one source pass (or a mean pass over reference
rows), then runs the clean base and every variant, several variants per forward as extra batch rows.
Every variant is a set of interventions applied together in one patched pass; the clean run is implicit.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from mi_spec.sites.adapter import Dims, SiteBinding
from mi_spec.spec.sections import PositionSpec

PLAN_VERSION = 1


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def content_hash(obj: Any) -> str:
    """A short, stable hash of JSON-able data."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ModelRef(Frozen):
    """How a worker rebuilds the model: the model section, where it was written, a weights hash."""

    section: dict[str, Any]
    base_dir: str
    weights_hash: str
    adapter: str

    @property
    def key(self) -> str:
        return content_hash([self.section, self.base_dir, self.weights_hash])


class DataRef(Frozen):
    section: dict[str, Any]
    base_dir: str
    model_dir: str | None = None  # tokenizer fallback for text datasets
    data_hash: str
    n_rows: int
    max_len: int  # longest row in tokens (for memory estimates)


class Intervention(Frozen):
    """Replace ``site`` at role ``pos`` (None: every position) with the source's value."""

    site: str
    pos: str | int | None = None


class Variant(Frozen):
    label: str
    interventions: tuple[Intervention, ...]


class Job(Frozen):
    """One unit of work for one worker; ``id`` is the content hash used by the result cache.

    ``op`` names the executor routine (``execute/ops.py``); ``patch`` is the default sweep op.
    Other ops keep their op-specific, JSON-able inputs in ``params``.
    """

    id: str = ""
    experiment: str
    op: str = "patch"
    params: dict[str, Any] = Field(default_factory=dict)
    rows: tuple[int, ...]
    source: Literal["rows", "column", "zero", "mean", "none"] = "none"
    source_rows: tuple[int, ...] = ()  # "rows": one per base row; "mean": rows to average
    source_column: str | None = None  # "column": a column holding counterfactual token ids
    variants: tuple[Variant, ...] = ()
    extra_sites: tuple[str, ...] = ()  # sites an op touches outside variants (bound in the plan)

    @property
    def sites(self) -> list[str]:
        used = {i.site for v in self.variants for i in v.interventions}
        return sorted(used | set(self.extra_sites))

    def backward_passes(self, max_rows: int) -> int:
        """Backward passes: ops that take gradients list their rows in ``params["backward_rows"]``."""
        return sum(-(-n // max_rows) for n in self.params.get("backward_rows", ()))

    def forward_passes(self, max_rows: int) -> int:
        """Source/mean passes + the clean pass + patched passes (variants packed ``max_rows`` rows
        a pass, each resuming at its first write: ``execute/run_job.py``; the one-time check of a
        resume point, once per process, is not counted).

        Ops that pack their own rows list the rows of each stage in ``params["level_rows"]``
        (each stage is run in passes of at most ``max_rows`` rows).
        """
        if "level_rows" in self.params:
            return sum(-(-n // max_rows) for n in self.params["level_rows"])
        per_pass = max(1, max_rows // max(1, len(self.rows)))
        patched = 1 + -(-len(self.variants) // per_pass)
        extra = 1 if self.source in ("rows", "column") else 0
        if self.source == "mean":
            extra = -(-len(self.source_rows) // max(1, max_rows))
        return patched + extra


class ExperimentEntry(Frozen):
    name: str  # unique within the study, e.g. "activation_patching" or the spec's name
    kind: str
    spec: dict[str, Any]


class Plan(Frozen):
    version: int = PLAN_VERSION
    hypothesis: str
    model: ModelRef
    data: DataRef
    dims: dict[str, int]
    metric: dict[str, Any]
    positions: dict[str, Any]  # named positions (data section + built-ins), as plain data
    sites: dict[str, SiteBinding]  # every site any job touches, bound to this model
    experiments: tuple[ExperimentEntry, ...]
    jobs: tuple[Job, ...]
    max_batch_rows: int = Field(64, description="Rows per forward pass when packing variants")

    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.model_validate_json(text)

    @property
    def content_hash(self) -> str:
        """The plan's identity; a job enters by its id (a hash of its content and context)."""
        body = self.model_dump(mode="json", exclude={"jobs"})
        return content_hash([body, [j.id for j in self.jobs]])

    @property
    def model_dims(self) -> Dims:
        return Dims(**self.dims)

    def position_table(self) -> dict[str, PositionSpec]:
        """Named positions as spec objects again (ints, ranges, columns)."""
        adapter: TypeAdapter[PositionSpec] = TypeAdapter(PositionSpec)
        return {k: adapter.validate_python(v) for k, v in self.positions.items()}

    def jobs_for(self, experiment: str) -> list[Job]:
        return [j for j in self.jobs if j.experiment == experiment]


def seal_job(job: Job, context: dict[str, Any]) -> Job:
    """Give ``job`` its id: a hash of its content and of everything its result depends on."""
    body = job.model_dump(mode="json", exclude={"id"})
    return job.model_copy(update={"id": content_hash([body, context])})


class JobResult(Frozen):
    """Per-row metric values of one job: clean run, source run (scored on the base targets) and
    one row of values per variant, in job order."""

    job_id: str
    clean: tuple[float, ...]
    source: tuple[float, ...] | None = None
    variants: tuple[tuple[float, ...], ...] = ()
    extra: dict[str, Any] = Field(default_factory=dict)  # op-specific JSON-able outputs
    seconds: float = 0.0
