"""Job results stored under the job's content hash, so an interrupted study resumes where it stopped.

A cached result is the result of this code: the key is the job's content hash (its inputs, the model
and data hashes) plus the *code version* of what computed it: the mi_spec version, the version of the
job's op (``register_op(name, version=...)``: bump it whenever an op's results change), and the
torch (major.minor) and transformers (major) versions. After an upgrade that changes any of them,
old results are not found and are recomputed, never reused silently.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mi_spec.execute.ops import op_version
from mi_spec.plan.ir import JobResult, Plan, content_hash


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """The versions a cached result depends on besides its op."""

    def get(package: str, parts: int) -> str:
        try:
            return ".".join(version(package).split("+")[0].split(".")[:parts])
        except PackageNotFoundError:
            return "none"

    return {
        "mi_spec": get("mi_spec", 3),
        "torch": get("torch", 2),
        "transformers": get("transformers", 1),
    }


def code_version(op: str) -> str:
    """A short hash of everything besides a job's content that its result depends on."""
    return content_hash({**library_versions(), "op": op, "op_version": op_version(op)})


class ResultCache:
    """One JSON file per job under ``root/<code version>/``; writes are atomic (temp + rename).

    ``plan`` tells each job's op (for its code version); jobs it does not list use op "patch".
    """

    def __init__(self, root: str | Path, plan: Plan | None = None):
        self.root = Path(root)
        self._ops = {j.id: j.op for j in plan.jobs} if plan is not None else {}

    def _path(self, job_id: str) -> Path:
        namespace = code_version(self._ops.get(job_id, "patch"))
        return self.root / namespace / job_id[:2] / f"{job_id}.json"

    def get(self, job_id: str) -> JobResult | None:
        path = self._path(job_id)
        if not path.exists():
            return None
        try:
            return JobResult.model_validate_json(path.read_text())
        except (ValueError, OSError):
            return None  # a torn or foreign file: recompute rather than trust it

    def put(self, result: JobResult) -> None:
        path = self._path(result.job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(result.model_dump_json())
        tmp.replace(path)
