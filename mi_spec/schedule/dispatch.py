"""One entry point for running a plan's jobs: synchronously or on Dask, as the profile says.

A `RunnerSession` lives as long as a command: the Dask cluster it starts for the first plan that
has jobs to compute is reused by every later plan (``mi-spec run a.yaml b.yaml``), so workers start,
import torch and load a model once, not once per file. `run_plan` is a session of one plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mi_spec.execute.cache import ResultCache
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.schedule.profiles import RunnerProfile, load_profile
from mi_spec.schedule.progress import Console, Progress, count
from mi_spec.schedule.synchronous import run_synchronous

if TYPE_CHECKING:
    from mi_spec.schedule.dask_runner import DaskSession


class RunnerSession:
    """Where a command's plans run; a Dask cluster is started when first needed, kept until
    `close` (or the end of a ``with`` block) and then closed (an existing scheduler: disconnected).

    ``profile``: a `RunnerProfile` or a profile name/path; ``address`` (``tcp://host:8786``) sends
    the jobs to an existing scheduler instead. ``console``: where a cluster's start is told when
    `dask_session` is not given one (`run` passes its progress's).
    """

    def __init__(
        self,
        profile: RunnerProfile | str = "local",
        address: str | None = None,
        console: Console | None = None,
    ):
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self.address = address
        self.console = console
        self.dask: DaskSession | None = None  # started on first need
        self._stack = contextlib.ExitStack()

    @property
    def kind(self) -> str:
        """What runs the jobs: ``synchronous``, ``local``, ``slurm`` or ``cluster``."""
        return "cluster" if self.address else self.profile.kind

    def run(
        self,
        plan: Plan,
        jobs: Sequence[Job],
        cache: ResultCache | None,
        progress: Progress,
    ) -> dict[str, JobResult]:
        """Results by job id; cached results are reused, new ones cached as they arrive."""
        if self.kind == "synchronous":
            with progress.console.stage(f"running {count(len(jobs), 'job')}") as stage:
                results = run_synchronous(plan, jobs, cache, progress)
                stage.note = progress.summary
            return results
        from mi_spec.schedule.dask_runner import run_dask  # distributed: imported only when used

        results = run_dask(
            plan, jobs, cache, progress, self.profile, address=self.address, session=self
        )
        if jobs and progress.cached == progress.total:
            progress.say(f"  {progress.summary}: nothing to run")
        return results

    def dask_session(self, workers: int, console: Console | None = None) -> DaskSession:
        """The command's Dask session with at least ``workers`` workers where it can grow
        (an embedded cluster, up to the profile's size): started now if it is not yet."""
        from mi_spec.schedule.dask_runner import open_session

        if self.dask is None:
            self.dask = self._stack.enter_context(
                open_session(self.profile, self.address, workers, console or self.console)
            )
        else:
            self.dask.grow(workers)
        return self.dask

    def close(self) -> None:
        """Close the cluster started here (if any); idempotent."""
        self.dask = None
        self._stack.close()

    def __enter__(self) -> RunnerSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_plan(
    plan: Plan,
    jobs: Sequence[Job],
    cache: ResultCache | None,
    progress: Progress,
    profile: RunnerProfile,
    address: str | None = None,
    session: RunnerSession | None = None,
) -> dict[str, JobResult]:
    """Results by job id. ``address`` (an existing Dask scheduler) wins over the profile's kind;
    ``session`` (a command's, whose cluster outlives this plan) wins over both."""
    if session is not None:
        return session.run(plan, jobs, cache, progress)
    with RunnerSession(profile, address) as session:
        return session.run(plan, jobs, cache, progress)
