"""Per-example metrics computed from logits at the metric's role positions.

Every metric is a mean over the role's positions of one row, so a batch of G stacked copies of the
base rows (clean + variants) is scored in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mi_spec.data.dataset import Dataset
from mi_spec.data.positions import resolve_role
from mi_spec.errors import ResolveError
from mi_spec.spec.sections import MetricSection, PositionSpec


@dataclass(frozen=True)
class Targets:
    pos: torch.Tensor  # [B, P] positions whose logits are scored
    target: torch.Tensor  # [B, P] correct token ids
    wrong: torch.Tensor | None  # [B, P] (logit_diff)


def make_targets(
    metric: MetricSection, data: Dataset, rows: list[int], table: dict[str, PositionSpec]
) -> Targets:
    """Positions and target tokens of ``rows``; the default target is the next token."""
    pos = resolve_role(metric.at, table, data, rows)
    target = [_column_tokens(data, metric.target, r, p) for r, p in zip(rows, pos, strict=True)]
    if metric.target is None:
        for r, ps in zip(rows, pos, strict=True):
            if max(ps) + 1 >= data.lengths[r]:
                raise ResolveError(
                    f"metric {metric.kind} at {metric.at!r}: row {r} has no next token after "
                    f"position {max(ps)}; score an earlier position or give metric.target"
                )
        target = [[data.tokens[r][p + 1] for p in ps] for r, ps in zip(rows, pos, strict=True)]
    wrong = None
    if metric.wrong is not None:
        wrong = [_column_tokens(data, metric.wrong, r, p) for r, p in zip(rows, pos, strict=True)]
        wrong = torch.tensor(wrong)
    return Targets(torch.tensor(pos), torch.tensor(target), wrong)


def _column_tokens(data: Dataset, column: str | None, row: int, pos: list[int]) -> list[int]:
    if column is None:
        return [0] * len(pos)
    if column not in data.columns:
        raise ResolveError(f"metric: no column {column!r}; columns: {', '.join(data.columns)}")
    value = data.columns[column][row]
    values = value if isinstance(value, list) else [value] * len(pos)
    if len(values) != len(pos) or not all(isinstance(v, int) for v in values):
        raise ResolveError(
            f"metric: column {column!r} row {row} must hold a token id (or one per position)"
        )
    return values


def picked_logits(logits: torch.Tensor, t: Targets) -> torch.Tensor:
    """Logits at the scored positions: [G*B, T, V] -> [G*B, P, V] (targets repeat per block)."""
    reps = logits.shape[0] // t.pos.shape[0]
    pos = t.pos.to(logits.device).repeat(reps, 1)
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    picked = logits[rows, pos]
    return picked if picked.dtype == torch.float64 else picked.float()  # float64 stays exact


def score(
    kind: str, logits: torch.Tensor, t: Targets, clean_logp: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row metric for stacked blocks of the base rows: [G*B] values."""
    picked = picked_logits(logits, t)
    reps = picked.shape[0] // t.pos.shape[0]
    target = t.target.to(picked.device).repeat(reps, 1)[..., None]
    logp = torch.log_softmax(picked, dim=-1)
    if kind == "loss":
        per_pos = -logp.gather(-1, target)[..., 0]
    elif kind == "prob":
        per_pos = logp.gather(-1, target)[..., 0].exp()
    elif kind == "accuracy":
        per_pos = (picked.argmax(-1) == target[..., 0]).float()
    elif kind == "logit_diff":
        assert t.wrong is not None
        wrong = t.wrong.to(picked.device).repeat(reps, 1)[..., None]
        per_pos = (picked.gather(-1, target) - picked.gather(-1, wrong))[..., 0]
    elif kind == "kl":
        if clean_logp is None:
            raise ValueError("kl needs the clean run's log-probabilities")
        ref = clean_logp.to(picked.device).repeat(reps, 1, 1)
        per_pos = (ref.exp() * (ref - logp)).sum(-1)
    else:
        raise ValueError(f"unknown metric kind {kind!r}")
    return per_pos.mean(-1)
