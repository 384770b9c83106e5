"""Dask scaling benchmark (a script, not a test): ``python tests/benchmarks/dask_scaling.py``.

An 8-job activation-patching plan on a small gpt2 (jobs of ~0.5-1 s on one thread), run on an
existing LocalCluster with warm workers (model loaded), so the figures are about scheduling, not
process start-up:

- speedup: wall time with 1 worker / wall time with 2 workers (1 thread each); goal >= 1.6x.
- scheduler overhead per job: (wall time with 1 worker - sum of JobResult.seconds) / jobs, as a
  share of the mean job time; goal < 5%.

The cold figure (``kind: local``: cluster start, worker imports, model load) is printed for
information. So are the concurrency of the 2-worker run (sum of job seconds / wall: 2.0 when both
workers compute all the time) and the hardware ceiling (how much faster two single-threaded
processes finish the same matmuls than one, measured now): on a busy or 1-core machine the
speedup is capped by the ceiling, not by the scheduler. Timings need an idle machine, >= 2 cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from distributed import Client, LocalCluster  # noqa: E402

from mi_spec.api import compile_file  # noqa: E402
from mi_spec.plan.ir import JobResult, Plan  # noqa: E402
from mi_spec.schedule.dask_runner import run_dask  # noqa: E402
from mi_spec.schedule.profiles import RunnerProfile  # noqa: E402
from mi_spec.schedule.progress import Progress  # noqa: E402

__test__ = False

SPEEDUP_GOAL = 1.6
OVERHEAD_GOAL = 0.05


def write_study(root: Path, jobs: int, batch: int, width: int, length: int) -> Path:
    rng = random.Random(0)
    with (root / "rows.jsonl").open("w") as f:
        for _ in range(jobs * batch):
            f.write(json.dumps({"tokens": [rng.randrange(100) for _ in range(length)]}) + "\n")
    path = root / "bench.yaml"
    path.write_text(
        "name: dask-bench\n"
        "model:\n"
        f"  hf_config: {{model_type: gpt2, n_layer: 4, n_embd: {width}, n_head: 8, "
        f"vocab_size: 100, n_positions: {length}}}\n"
        "data: {path: rows.jsonl, positions: {mid: 4}}\n"
        "metric: {kind: loss, at: mid}\n"
        f"experiments:\n  - {{kind: activation_patching, sites: ['L*.H*'], batch_size: {batch}}}\n"
    )
    return path


def _warm(plan: Plan) -> None:
    """Load the plan's model and data into this worker's process cache."""
    import torch

    from mi_spec.execute.worker import loaded_for

    torch.set_num_threads(1)
    loaded_for(plan)


def timed_run(plan: Plan, workers: int) -> tuple[float, dict[str, JobResult]]:
    """Wall seconds of run_dask on an existing cluster of warm workers."""
    with LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
    ) as cluster:
        with Client(cluster, set_as_default=False) as client:
            client.run(_warm, plan.model_copy(update={"jobs": ()}))
        profile = RunnerProfile(kind="cluster", address=cluster.scheduler_address, dashboard=False)
        start = time.perf_counter()
        results = run_dask(plan, plan.jobs, None, Progress(len(plan.jobs)), profile)
        return time.perf_counter() - start, results


def _matmuls(start_at: float, n: int) -> float:
    """Seconds for ``n`` single-threaded matmuls, started at wall-clock time ``start_at``."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    while time.time() < start_at:
        time.sleep(0.01)
    start = time.perf_counter()
    for _ in range(n):
        a = (a @ a).tanh()
    return time.perf_counter() - start


def hardware_ceiling(n: int = 1500) -> float:
    """How much faster two single-threaded processes get through the same work than one, now."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        list(pool.map(_matmuls, [0.0, 0.0], [1, 1]))  # start both processes (imports)
        one = pool.submit(_matmuls, time.time() + 0.5, n).result()
        start_at = time.time() + 0.5
        two = max(pool.map(_matmuls, [start_at, start_at], [n, n]))
    return 2 * one / two


def verdict(ok: bool) -> str:
    return "OK  " if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="rows per job")
    parser.add_argument("--width", type=int, default=128, help="n_embd of the gpt2")
    parser.add_argument("--length", type=int, default=24, help="tokens per row")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        _, plan = compile_file(
            write_study(Path(tmp), args.jobs, args.batch, args.width, args.length)
        )
        n = len(plan.jobs)
        print(f"plan: {n} jobs, {args.batch} rows each, gpt2 n_layer=4 n_embd={args.width}")

        start = time.perf_counter()
        cold_profile = RunnerProfile(kind="local", workers=2, dashboard=False)
        run_dask(plan, plan.jobs, None, Progress(n), cold_profile)
        cold = time.perf_counter() - start

        wall1, res1 = timed_run(plan, 1)
        wall2, res2 = timed_run(plan, 2)
        ceiling = hardware_ceiling()

    same = all(res1[k].variants == res2[k].variants for k in res1)
    compute = sum(r.seconds for r in res1.values())
    mean_job = compute / n
    overhead = (wall1 - compute) / n
    speedup = wall1 / wall2
    print(
        f"job compute: mean {mean_job:.3f}s, stdev {statistics.pstdev([r.seconds for r in res1.values()]):.3f}s"
    )
    print(f"cold kind=local, 2 workers (start + imports + model load + run): {cold:.2f}s")
    print(f"wall, 1 worker:  {wall1:.2f}s  (sum of job seconds {compute:.2f}s)")
    compute2 = sum(r.seconds for r in res2.values())
    print(f"wall, 2 workers: {wall2:.2f}s  (sum of job seconds {compute2:.2f}s)")
    print(
        f"concurrency with 2 workers (sum of job seconds / wall): {compute2 / wall2:.2f} "
        "(2.00: both workers busy throughout)"
    )
    print(
        f"hardware ceiling (2 vs 1 single-threaded processes, same work): {ceiling:.2f}x; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"{verdict(speedup >= SPEEDUP_GOAL)} speedup 1 -> 2 workers: {speedup:.2f}x (goal >= {SPEEDUP_GOAL}x)"
    )
    print(
        f"{verdict(overhead / mean_job < OVERHEAD_GOAL)} scheduler overhead per job: "
        f"{overhead * 1000:.1f} ms = {overhead / mean_job:.1%} of a job (goal < {OVERHEAD_GOAL:.0%})"
    )
    print(f"{verdict(same)} identical results with 1 and 2 workers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
