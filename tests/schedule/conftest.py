"""Shared by the scheduling tests: small activation-patching studies, and their synchronous
results that every Dask run must reproduce."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mi_spec.api import compile_file
from mi_spec.plan.ir import JobResult, Plan
from mi_spec.schedule.progress import Progress
from mi_spec.schedule.synchronous import run_synchronous

BODY = "experiments:\n  - {kind: activation_patching, sites: ['L*.H*'], batch_size: %d}\n"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Synchronous reference runs in this process with one thread, like the workers (and fast)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def patching_file(study_file):
    """Write an activation-patching study of every head (16 rows, ``batch_size`` a job); keyword
    arguments go to ``study_file`` (e.g. ``model``)."""

    def make(batch_size: int, **kwargs) -> Path:
        return study_file(BODY % batch_size, **kwargs)

    return make


@pytest.fixture
def study(patching_file) -> tuple[Plan, dict[str, JobResult]]:
    """A 4-job plan (16 rows, 4 a job) and its synchronous results."""
    _, plan = compile_file(patching_file(4))
    assert len(plan.jobs) == 4
    return plan, run_synchronous(plan, plan.jobs, None, Progress(4))
