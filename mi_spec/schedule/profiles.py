"""Runner profiles: where a plan's jobs run (this process, an embedded Dask cluster, an existing
scheduler, Slurm). Loaded from YAML (``runners/*.yaml``) or built in Python."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mi_spec.errors import ExecutionError, SpecError, SpecIssue
from mi_spec.spec.load import load_yaml
from mi_spec.spec.locate import issue_at, issues_from_validation_error

BUNDLED_DIR = Path(__file__).parent / "runners"  # the source of truth for bundled profiles
BUNDLED = ("synchronous", "local", "gpu", "gpu_sharded", "cluster", "slurm")
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
        description="Run each job on GPUs it holds alone (the Dask resource GPU=gpus_per_job); "
        "auto: when CUDA is available (local) or a worker advertises a GPU resource (cluster)",
    )
    gpus_per_worker: Annotated[int, Field(ge=1)] | Literal["all"] | None = Field(
        None,
        description="local, slurm: GPUs each worker process sees (local: its own "
        "CUDA_VISIBLE_DEVICES) and declares as its Dask resource GPU; 'all' (local): one "
        "worker holding every GPU, for a model sharded with model.device_map: auto. "
        "Default 1: one worker per GPU",
    )
    gpus_per_job: int | None = Field(
        None,
        ge=1,
        description="GPUs each job holds (the Dask resource GPU=n it asks for). Default: all "
        "of its worker's (gpus_per_worker; 1 on kind: cluster); a job no worker can hold "
        "fails at once",
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
        self._gpu_fields()
        return self

    def _gpu_fields(self) -> None:
        per_worker, per_job = self.gpus_per_worker, self.gpus_per_job
        unused = (
            self.gpu is False
            or self.kind == "synchronous"
            or (self.kind == "slurm" and self.gpu is not True)  # auto: no GPUs on Slurm
        )
        for field, value in (("gpus_per_worker", per_worker), ("gpus_per_job", per_job)):
            if value is not None and unused:
                _fail(
                    field,
                    f"`{field}` is only used on Dask with gpu: true (or auto, except on Slurm)",
                )
        if per_worker is not None and self.kind == "cluster":
            _fail(
                "gpus_per_worker",
                "kind: cluster uses the workers you started: give them `--resources GPU=n` "
                "and set gpus_per_job",
            )
        if per_worker == "all" and self.kind != "local":
            _fail(
                "gpus_per_worker", f"gpus_per_worker: all needs kind: local (this is {self.kind})"
            )
        if isinstance(per_worker, int) and per_job is not None and per_job > per_worker:
            _fail(
                "gpus_per_job",
                f"gpus_per_job: {per_job} is more than a worker has (gpus_per_worker: {per_worker})",
            )

    def local_workers(self, gpus: int) -> int:
        """Worker processes for an embedded cluster: ``workers``, or one per GPU group (of
        `gpu_groups`), or per cores."""
        if self.workers is not None:
            return self.workers
        if gpus:
            return len(self.gpu_groups([str(i) for i in range(gpus)]))
        return max(1, (os.cpu_count() or 1) // self.threads_per_worker)

    def gpu_groups(self, devices: Sequence[str]) -> list[tuple[str, ...]]:
        """``devices`` (CUDA device ids) split into the GPU sets of local workers:
        `gpus_per_worker` each (every device, for ``all``); devices left over are unused."""
        per = len(devices) if self.gpus_per_worker == "all" else (self.gpus_per_worker or 1)
        if per > len(devices):
            raise ExecutionError(
                f"the runner profile gives each worker {per} GPUs (gpus_per_worker), but "
                f"{len(devices)} {'is' if len(devices) == 1 else 'are'} visible here"
            )
        return [tuple(devices[i : i + per]) for i in range(0, len(devices) - per + 1, per)]

    def job_gpus(self, worker_gpus: int | None = None) -> int:
        """GPUs a job asks for: `gpus_per_job`, else all of a worker's (``worker_gpus``: a local
        worker's count, for ``gpus_per_worker: all``)."""
        if self.gpus_per_job is not None:
            return self.gpus_per_job
        if isinstance(self.gpus_per_worker, int):
            return self.gpus_per_worker
        return worker_gpus or 1


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
