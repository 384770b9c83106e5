"""One entry point for running a plan's jobs: synchronously or on Dask, as the profile says."""

from __future__ import annotations

from collections.abc import Sequence

from mi_spec.execute.cache import ResultCache
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.schedule.profiles import RunnerProfile
from mi_spec.schedule.progress import Progress
from mi_spec.schedule.synchronous import run_synchronous


def run_plan(
    plan: Plan,
    jobs: Sequence[Job],
    cache: ResultCache | None,
    progress: Progress,
    profile: RunnerProfile,
    address: str | None = None,
) -> dict[str, JobResult]:
    """Results by job id. ``address`` (an existing Dask scheduler) wins over the profile's kind."""
    if address is None and profile.kind == "synchronous":
        return run_synchronous(plan, jobs, cache, progress)
    from mi_spec.schedule.dask_runner import run_dask  # distributed is imported only when used

    return run_dask(plan, jobs, cache, progress, profile, address=address)
