"""Job results stored under the job's content hash, so an interrupted study resumes where it stopped."""

from __future__ import annotations

import os
from pathlib import Path

from mi_spec.plan.ir import JobResult


class ResultCache:
    """One JSON file per job id under ``root``; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, job_id: str) -> Path:
        return self.root / job_id[:2] / f"{job_id}.json"

    def get(self, job_id: str) -> JobResult | None:
        path = self._path(job_id)
        if not path.exists():
            return None
        try:
            return JobResult.model_validate_json(path.read_text())
        except ValueError:
            return None  # a torn or foreign file: recompute rather than trust it

    def put(self, result: JobResult) -> None:
        path = self._path(result.job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(result.model_dump_json())
        tmp.replace(path)
