"""Run a plan's jobs one after another in this process (debugging; the in-process default)."""

from __future__ import annotations

from collections.abc import Sequence

from mi_spec.execute.cache import ResultCache
from mi_spec.execute.worker import execute_job
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.schedule.progress import Progress


def run_synchronous(
    plan: Plan, jobs: Sequence[Job], cache: ResultCache | None, progress: Progress
) -> dict[str, JobResult]:
    """Results by job id; cached results are reused, new ones stored as soon as they exist."""
    results: dict[str, JobResult] = {}
    for job in jobs:
        hit = cache.get(job.id) if cache else None
        result = hit or execute_job(plan, job)
        if cache and hit is None:
            cache.put(result)
        results[job.id] = result
        took = "" if hit else f" {result.seconds:.2f}s"
        progress.update(cached=hit is not None, what=f"job {job.id[:12]} ({job.experiment}){took}")
    return results
