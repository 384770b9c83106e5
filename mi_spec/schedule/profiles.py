"""Runner profiles: where a plan's jobs run (this process, an embedded Dask cluster, an existing
scheduler, Slurm). Loaded from YAML (``runners/*.yaml``) or built in Python."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mi_spec.errors import SpecError, SpecIssue
from mi_spec.spec.load import load_yaml
from mi_spec.spec.locate import issue_at, issues_from_validation_error

BUNDLED_DIR = Path(__file__).parent / "runners"  # the source of truth for bundled profiles
BUNDLED = ("synchronous", "local", "cluster", "slurm")
_RULE = "profile_rule"  # error type of the cross-field checks, located at ctx["field"]


class SlurmOptions(BaseModel):
    """dask-jobqueue ``SLURMCluster`` settings; each Slurm job runs one Dask worker process."""

    model_config = ConfigDict(extra="forbid")

    queue: str | None = Field(None, description="Slurm partition (#SBATCH -p)")
    account: str | None = Field(None, description="Slurm account (#SBATCH -A)")
    cores: int = Field(ge=1, description="CPU cores per Slurm job (the worker's Dask threads)")
    memory: str = Field(description="Memory per Slurm job, e.g. '16GB'")
    walltime: str = Field("01:00:00", description="Time limit per Slurm job (HH:MM:SS)")
    jobs: int = Field(1, ge=1, description="Slurm jobs (workers) to start: cluster.scale(jobs=...)")
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other SLURMCluster keyword, e.g. job_extra_directives: ['--gres=gpu:1']",
    )

    @field_validator("extra")
    @classmethod
    def _no_named_fields(cls, extra: dict[str, Any]) -> dict[str, Any]:
        named = sorted(set(extra) & (set(cls.model_fields) - {"extra"}))
        if named:
            raise ValueError(f"set {', '.join(named)} as slurm fields, not under extra")
        return extra


class RunnerProfile(BaseModel):
    """How and where to run a plan's jobs.

    On Dask, a scheduler left without any worker (all killed, or Slurm jobs past their walltime)
    for no_worker_timeout seconds stops the study with an error naming the scheduler, instead of
    hanging; the jobs finished by then are cached, so running it again computes only the rest.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["synchronous", "local", "cluster", "slurm"] = Field(
        "local",
        description="synchronous: this process, one job after another; local: an embedded Dask "
        "LocalCluster; cluster: an existing Dask scheduler at `address`; slurm: dask-jobqueue",
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="local: worker processes (default: one per GPU, else cores // "
        "threads_per_worker)",
    )
    threads_per_worker: int = Field(
        1, ge=1, description="Torch intra-op threads per worker (and Dask threads, local)"
    )
    memory_limit: str = Field(
        "auto", description="local: memory per worker, e.g. '4GiB'; 'auto' splits the machine's"
    )
    address: str | None = Field(
        None, description="cluster: the scheduler's address, e.g. tcp://host:8786"
    )
    retries: int = Field(2, ge=0, description="Extra attempts for a failing job before giving up")
    no_worker_timeout: float | None = Field(
        60,
        gt=0,
        description="Dask kinds: seconds the scheduler may have no worker at all (every worker "
        "left or died mid-study) before the study fails, naming the scheduler, with the jobs "
        "finished so far cached; null: wait for workers forever. The wait for a first worker "
        "is not limited",
    )
    gpu: Literal[True, False, "auto"] = Field(
        "auto",
        description="Request the Dask resource GPU=1 per job; auto: when CUDA is available "
        "(local) or a worker advertises a GPU resource (cluster)",
    )
    slurm: SlurmOptions | None = Field(None, description="slurm: the SLURMCluster settings")
    dashboard: bool = Field(True, description="Serve (local) and print the Dask dashboard link")

    @model_validator(mode="after")
    def _kind_fields(self) -> RunnerProfile:
        if self.kind == "cluster" and not self.address:
            _fail("kind", "kind: cluster needs an `address`, e.g. tcp://host:8786")
        if self.address and self.kind != "cluster":
            _fail("address", f"`address` is only used by kind: cluster (this is {self.kind})")
        if self.kind == "slurm" and self.slurm is None:
            _fail("kind", "kind: slurm needs a `slurm` section (cores, memory, ...)")
        if self.slurm is not None and self.kind != "slurm":
            _fail("slurm", f"`slurm` is only used by kind: slurm (this is {self.kind})")
        return self

    def local_workers(self, gpus: int) -> int:
        """Worker processes for an embedded cluster: ``workers``, or one per GPU, or per cores."""
        if self.workers is not None:
            return self.workers
        if gpus:
            return gpus
        return max(1, (os.cpu_count() or 1) // self.threads_per_worker)


def _fail(field: str, message: str) -> None:
    raise PydanticCustomError(_RULE, message, {"field": field})


def profile_path(path_or_name: str | Path) -> Path:
    """A profile file: ``path_or_name`` itself, or the bundled profile of that name."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if str(path_or_name) in BUNDLED:
        return BUNDLED_DIR / f"{path_or_name}.yaml"
    raise SpecError(
        [
            SpecIssue(
                f"no runner profile {str(path_or_name)!r}: not a file, nor one of "
                f"{', '.join(BUNDLED)}"
            )
        ]
    )


def load_profile(path_or_name: str | Path) -> RunnerProfile:
    """Load and validate a runner profile (a YAML path or a bundled name); errors are located."""
    doc = load_yaml(profile_path(path_or_name))
    try:
        return RunnerProfile.model_validate(doc.data)
    except ValidationError as e:
        issues = issues_from_validation_error(e, doc, RunnerProfile)
        for i, error in enumerate(e.errors(include_url=False)):
            if error["type"] == _RULE:
                field = (error.get("ctx") or {}).get("field", "kind")
                issues[i] = issue_at(doc, (field,), error["msg"], at_key=True)
        raise SpecError(issues) from None


def profile_schema() -> dict[str, Any]:
    """The JSON schema of a runner profile (``schemas/runner.schema.json``)."""
    schema = RunnerProfile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mi_spec runner profile"
    return schema
