"""Watching a Dask scheduler's workers while a plan runs: `WorkerWatch` raises `NoWorkers` once
the scheduler has had no worker (with the resources the jobs need) for longer than the runner
profile's ``no_worker_timeout``; `NoWorkers.describe` tells the user what was kept."""

from __future__ import annotations

import time
from collections.abc import Callable

from distributed import Client

from mi_spec.errors import ExecutionError
from mi_spec.schedule.gpu_workers import fits, resource_text
from mi_spec.schedule.progress import Console

WORKER_CHECK_S = 1.0  # how often (at most) the scheduler is asked how many workers it has


class NoWorkers(Exception):
    """The scheduler has had no worker for longer than the profile allows."""

    def __init__(self, address: str, lost: int, waited: float, what: str = ""):
        super().__init__(address, lost, waited, what)
        self.address, self.lost, self.waited = address, lost, waited
        self.what = what  # which workers count, e.g. " with GPU=1"

    def describe(self, done: int, total: int, cached: bool) -> str:
        who = "the only worker" if self.lost == 1 else f"all {self.lost} workers"
        who += self.what
        kept = "finished and are cached" if cached else "finished (not cached: the cache is off)"
        return (
            f"{who} left the Dask scheduler at {self.address} and none joined within "
            f"{self.waited:g} s; {done} of {total} jobs {kept}, {total - done} did not. Start "
            "workers (or raise no_worker_timeout in the runner profile) and run the study again"
        )


class WorkerWatch:
    """Watches the scheduler's worker count (asking at most once every `WORKER_CHECK_S` seconds)
    and raises `NoWorkers` once it has been zero for ``timeout`` seconds (None: never). With
    ``need`` (e.g. ``{"GPU": 1}``), only workers with those resources count: jobs that need a GPU
    cannot go on with CPU workers alone."""

    def __init__(
        self,
        client: Client,
        timeout: float | None,
        clock: Callable[[], float] | None = None,
        say: Callable[[str], None] | None = None,
        need: dict[str, float] | None = None,
    ):
        self.client, self.timeout, self.need = client, timeout, need
        self.what = f" with {resource_text(need)}" if need else ""
        self.clock = clock or time.monotonic
        self.say = say or Console().say
        self.address = str(getattr(client.scheduler, "address", None) or "?")
        self.most = 0  # the most workers seen at once
        self.since: float | None = None  # since when the scheduler has had no worker
        self.every = WORKER_CHECK_S if timeout is None else min(WORKER_CHECK_S, timeout / 5)
        self.next_check = 0.0
        self._count()

    def check(self) -> None:
        """Raise `NoWorkers` when the scheduler has had no worker for too long."""
        if self.clock() >= self.next_check:
            self._count()

    def wait_for_workers(self) -> None:
        """Return once the scheduler has a worker; `NoWorkers` after ``timeout`` without one."""
        while not self._count():
            time.sleep(self.every)

    def _count(self) -> int:
        now = self.clock()
        self.next_check = now + self.every
        try:
            info = self.client.scheduler_info(n_workers=-1 if self.need else 0)
        except OSError as e:  # the scheduler itself is gone
            raise ExecutionError(
                f"lost the connection to the Dask scheduler at {self.address}: {e}"
            ) from e
        if self.need:
            n = sum(fits(w, self.need) for w in info.get("workers", {}).values())
        else:
            n = int(info.get("n_workers", len(info.get("workers", {}))))
        self.most = max(self.most, n)
        if n:
            self.since = None
        elif self.since is None:
            self.since = now
            limit = f"up to {self.timeout:g} s " if self.timeout is not None else ""
            self.say(
                f"  no Dask worker{self.what} left at {self.address}; waiting {limit}"
                "for one to join"
            )
        elif self.timeout is not None and now - self.since >= self.timeout:
            raise NoWorkers(self.address, max(self.most, 1), self.timeout, self.what)
        return n
