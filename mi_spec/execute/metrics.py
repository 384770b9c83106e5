"""Per-example metrics computed from logits at the metric's role positions.

Every metric is a mean over one row's scored positions (rows may score different numbers of
positions: ``all`` over rows of different lengths), so a batch of G stacked copies of the base rows
(clean + variants) is scored in one call. CIs are over examples, never over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mi_spec.data.dataset import Dataset
from mi_spec.data.positions import metric_positions, source_metric_positions
from mi_spec.errors import ExecutionError, ResolveError
from mi_spec.spec.sections import NUMERIC_METRICS, MetricSection, PositionSpec


@dataclass(frozen=True)
class Targets:
    pos: torch.Tensor  # [B, P] positions whose logits are scored (short rows repeat their last)
    target: torch.Tensor  # [B, P] correct token ids
    wrong: torch.Tensor | None  # [B, P] (logit_diff)
    valid: torch.Tensor | None = None  # [B, P] bool: a row's own positions; None = all

    def rows(self, idx: torch.Tensor) -> Targets:
        """The targets of base rows ``idx``, in order."""
        return Targets(
            self.pos[idx],
            self.target[idx],
            None if self.wrong is None else self.wrong[idx],
            None if self.valid is None else self.valid[idx],
        )


def make_targets(
    metric: MetricSection, data: Dataset, rows: list[int], table: dict[str, PositionSpec]
) -> Targets:
    """Positions and target tokens of ``rows``; the default target is the next token."""
    return _ragged(*_target_lists(metric, data, rows, table))


def _target_lists(
    metric: MetricSection, data: Dataset, rows: list[int], table: dict[str, PositionSpec]
) -> tuple[list[list[int]], list[list[int]], list[list[int]] | None]:
    pos = metric_positions(metric, table, data, rows)
    if metric.target is None:
        target = [[data.tokens[r][p + 1] for p in ps] for r, ps in zip(rows, pos, strict=True)]
    else:
        target = [_column_tokens(data, metric.target, r, p) for r, p in zip(rows, pos, strict=True)]
    wrong = None
    if metric.wrong is not None:
        wrong = [_column_tokens(data, metric.wrong, r, p) for r, p in zip(rows, pos, strict=True)]
    return pos, target, wrong


def source_targets(
    metric: MetricSection,
    data: Dataset,
    rows: list[int],
    table: dict[str, PositionSpec],
    src: Dataset,
    src_rows: Sequence[int],
) -> Targets:
    """Where and on what the source run is scored, row by row: the metric role resolved in the
    source row, on the base row's targets (where the role has as many positions in both), else on
    the source's own next tokens (``source_metric_positions``)."""
    pos, on_base = source_metric_positions(metric, table, data, rows, src, src_rows)
    _, target, wrong = _target_lists(metric, data, rows, table)
    target = [
        t if ours else [src.tokens[s][p + 1] for p in ps]
        for t, ours, s, ps in zip(target, on_base, src_rows, pos, strict=True)
    ]
    return _ragged(pos, target, wrong)


def _ragged(
    pos: list[list[int]], target: list[list[int]], wrong: list[list[int]] | None
) -> Targets:
    """Rows of different lengths as rectangles: short rows repeat their last entry, unscored."""
    width = max(len(p) for p in pos)
    valid = None
    if any(len(p) != width for p in pos):
        valid = torch.tensor([[j < len(p) for j in range(width)] for p in pos])
    return Targets(
        _pad(pos, width),
        _pad(target, width),
        None if wrong is None else _pad(wrong, width),
        valid,
    )


def _pad(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows])


def _column_tokens(data: Dataset, column: str | None, row: int, pos: list[int]) -> list[int]:
    if column is None:
        return [0] * len(pos)
    if column not in data.columns:
        raise ResolveError(f"metric: no column {column!r}; columns: {', '.join(data.columns)}")
    value = data.columns[column][row]
    values = value if isinstance(value, list) else [value] * len(pos)
    if data.encode is not None:  # text targets (one token each) become ids
        values = [v if _is_number(v) else data.token_id(v, f"{column} row {row}") for v in values]
    if len(values) != len(pos) or not all(_is_number(v) for v in values):
        raise ResolveError(
            f"metric: column {column!r} row {row} must hold a token id (or one per position)"
        )
    return values


def picked_logits(logits: torch.Tensor, t: Targets, picked: bool = False) -> torch.Tensor:
    """Logits at the scored positions: [G*B, T, V] -> [G*B, P, V] (targets repeat per block);
    ``picked``: ``logits`` are already those positions' (``Engine.run(logits=scored_at(t))``)."""
    if not picked:
        reps = logits.shape[0] // t.pos.shape[0]
        pos = t.pos.to(logits.device).repeat(reps, 1)
        rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
        logits = logits[rows, pos]
    return logits if logits.dtype == torch.float64 else logits.float()  # float64 stays exact


def scored_at(t: Targets, copies: int = 1) -> torch.Tensor:
    """The positions ``Engine.run(logits=...)`` computes for ``copies`` stacked blocks of rows."""
    return t.pos.repeat(copies, 1)


def score(
    kind: str,
    logits: torch.Tensor,
    t: Targets,
    clean_logp: torch.Tensor | None = None,
    picked: bool = False,
) -> torch.Tensor:
    """Per-row metric for stacked blocks of the base rows: [G*B] values (``picked``: the logits
    are those of the scored positions only, [G*B, P, V])."""
    logits = picked_logits(logits, t, picked)
    reps = logits.shape[0] // t.pos.shape[0]
    target = t.target.to(logits.device).repeat(reps, 1)[..., None]
    if kind in NUMERIC_METRICS:
        per_pos = _numeric(kind, logits, target[..., 0])
    else:
        per_pos = _per_position(kind, logits, target, t, reps, clean_logp)
    if t.valid is None:
        return per_pos.mean(-1)
    valid = t.valid.to(per_pos.device).repeat(reps, 1).to(per_pos.dtype)
    return (per_pos * valid).sum(-1) / valid.sum(-1)


def _per_position(
    kind: str,
    picked: torch.Tensor,
    target: torch.Tensor,
    t: Targets,
    reps: int,
    clean_logp: torch.Tensor | None,
) -> torch.Tensor:
    """[G*B, P] values of a logits metric at each scored position."""
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
    return per_pos


def _numeric(kind: str, picked: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared / absolute error of a one-number output ([G*B, P] or [G*B, P, 1]) per position."""
    if picked.dim() == 3 and picked.shape[-1] == 1:
        picked = picked[..., 0]
    if picked.dim() != 2:
        raise ExecutionError(
            f"metric {kind} needs a model whose output is one number per position ([B, T] or "
            f"[B, T, 1]); this model outputs {picked.shape[-1]} values per position"
        )
    err = picked - target.to(picked.dtype)
    return err.square() if kind == "mse" else err.abs()


def _is_number(value: object) -> bool:
    """A token id, or a number (the numeric target of mse/mae)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
