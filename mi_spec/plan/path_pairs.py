"""The pairs of a ``path_patch`` job, read from its params: plain data, no torch, so the compile
step (``experiments/path_patching.py``) and the op (``execute/path_op.py``) share one reading."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from mi_spec.errors import ExecutionError
from mi_spec.plan.ir import Job

LOGITS = "logits"
Role = str | int | None


@dataclass(frozen=True)
class Pairs:
    """A path_patch job's pairs, grouped by (sender, sender position)."""

    groups: list[tuple[str, Role]]
    group_of: list[int]
    receivers: list[list[str]]
    receiver_pos: list[Role]

    @cached_property
    def logits_only(self) -> list[bool]:
        """Per pair: whether its receivers are only ``logits`` (then it needs no pass 3)."""
        return [all(s == LOGITS for s in r) for r in self.receivers]

    @classmethod
    def of(cls, job: Job) -> Pairs:
        """Read and check the job's pairs (the contract: ``execute/path_op.py``'s docstring)."""
        n = len(job.variants)
        receivers = job.params.get("receivers")
        receiver_pos = job.params.get("receiver_pos")
        where = f"path_patch job {job.id or '?'} ({job.experiment})"
        if not isinstance(receivers, list) or len(receivers) != n or not all(receivers):
            raise ExecutionError(
                f"{where}: params.receivers must list receiver sites for each of its {n} pairs"
            )
        if not isinstance(receiver_pos, list) or len(receiver_pos) != n:
            raise ExecutionError(f"{where}: params.receiver_pos needs one entry per pair ({n})")
        groups: dict[tuple[str, Role], int] = {}
        group_of = []
        for v in job.variants:
            if len(v.interventions) != 1:
                raise ExecutionError(
                    f"{where}: pair {v.label!r} needs exactly one intervention (its sender), "
                    f"found {len(v.interventions)}"
                )
            key = (v.interventions[0].site, v.interventions[0].pos)
            group_of.append(groups.setdefault(key, len(groups)))
        return cls(list(groups), group_of, [list(r) for r in receivers], list(receiver_pos))

    def level_rows(self, job: Job) -> list[int]:
        """Rows of the source, clean, pass-2 and pass-3 stages of ``job`` (params.level_rows)."""
        b = len(job.rows)
        pass3 = sum(not x for x in self.logits_only)
        return [source_stage_rows(job), b, len(self.groups) * b, pass3 * b]


def source_stage_rows(job: Job) -> int:
    """Rows of the source stage: the source rows, the reference rows of a mean, or none."""
    if job.source == "mean":
        return len(job.source_rows)
    return len(job.rows) if job.source in ("rows", "column") else 0
