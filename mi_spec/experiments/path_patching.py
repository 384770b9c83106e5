"""Path patching (Wang et al. 2022): a sender's source value, delivered only along its direct path
into a receiver, with every other component frozen to its value on the base input.

Per (sender, sender position): pass 2 runs the base input with the sender patched from the source
and every head output and MLP output between the senders and the receivers frozen to its clean
value, recording each receiver (a head's q/k/v, an MLP input, the logits); pass 3 runs the base
input with only the receiver(s) set to those recorded values, and scores the metric. Sweeps over
senders x receivers x positions share one source pass and one clean pass per batch of rows, and
one pass 2 per sender among all its receivers (``execute/path_op.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeGuard

import numpy as np
from pydantic import Field

from mi_spec.analysis.figures import heatmap_png
from mi_spec.analysis.report import ExperimentReport
from mi_spec.analysis.stats import bootstrap_ci, bootstrap_ratio_ci
from mi_spec.errors import ResolveError
from mi_spec.experiments.activation_patching import SourceSpec
from mi_spec.experiments.base import (
    CompileContext,
    ExperimentSpec,
    chunks,
    metric_label,
    register,
    resample_sources,
    sample_rows,
)
from mi_spec.experiments.effects import _at, _put, gather
from mi_spec.plan.ir import Intervention, Job, JobResult, Variant
from mi_spec.plan.path_pairs import LOGITS, Pairs
from mi_spec.sites.vocabulary import Site, SiteSyntaxError, expand_patterns, parse_site

Stage = tuple[int, int]  # (layer, place in the layer): forward order of the components
_PLACE = {"attn_out": 2, "mlp_in": 3, "mlp_out": 4}  # head inputs 0, head outputs 1
SENDERS = "head outputs 'L{l}.H{h}', 'L{l}.attn_out', 'L{l}.mlp_out' or 'embed'"
RECEIVERS = "head inputs 'L{l}.H{h}:q|k|v', 'L{l}.mlp_in' or 'logits'"


class PathPatchingSpec(ExperimentSpec):
    """Patch each sender into only its direct path to each receiver, everything else frozen."""

    kind: Literal["path_patching"]
    senders: list[str] = Field(
        min_length=1, description=f"Sender sites or patterns ('L0.H*'): {SENDERS}"
    )
    receivers: list[str] = Field(
        min_length=1, description=f"Receiver sites or patterns ('L1.H*:k'): {RECEIVERS}"
    )
    positions: list[str | int] = Field(
        default_factory=lambda: ["all"],
        description="Sender positions: named positions or ints; 'all' = every one",
    )
    receiver_positions: list[str | int] = Field(
        default_factory=lambda: ["all"],
        description="Positions where receivers take their path-patched value ('all' = every one)",
    )
    jointly_receivers: bool = Field(
        False, description="All receivers form one group, patched together (default: one each)"
    )
    source: SourceSpec = Field(default_factory=lambda: SourceSpec(resample=True))

    kind_name = "path_patching"


def site_of(text: str) -> Site | None:
    """The parsed site when ``text`` is its canonical spelling (no aliases), else None."""
    try:
        site = parse_site(text)
    except SiteSyntaxError:
        return None
    return site if site.name == text else None


def is_head_output(site: Site | None) -> TypeGuard[Site]:
    return site is not None and site.kind == "head" and site.part is None


def is_head_input(site: Site | None) -> TypeGuard[Site]:
    return site is not None and site.kind in ("head", "kv_head") and site.part is not None


def sender_stage(text: str) -> Stage:
    """Where a sender writes, in forward order: ``embed`` first, then per layer."""
    site = site_of(text)
    if site is not None and site.kind == "embed":
        return (-1, 0)
    if is_head_output(site):
        return (site.layer, 1)
    if site is not None and site.kind in ("attn_out", "mlp_out"):
        return (site.layer, _PLACE[site.kind])
    raise ResolveError(f"path patching sender {text!r}: expected {SENDERS}")


def receiver_stage(text: str, n_layers: int) -> Stage:
    """Where a receiver reads, in forward order; ``logits`` after every layer."""
    site = site_of(text)
    if site is not None and site.kind == LOGITS:
        return (n_layers, 0)
    if is_head_input(site):
        return (site.layer, 0)
    if site is not None and site.kind == "mlp_in":
        return (site.layer, _PLACE["mlp_in"])
    raise ResolveError(f"path patching receiver {text!r}: expected {RECEIVERS}")


@dataclass(frozen=True)
class PathPair:
    sender: str
    pos: str | int
    receivers: tuple[str, ...]
    receiver_pos: str | int

    @property
    def receiver_label(self) -> str:
        at = "" if self.receiver_pos == "all" else f"@{self.receiver_pos}"
        return "+".join(self.receivers) + at

    @property
    def label(self) -> str:
        return f"{self.sender}@{self.pos}->{self.receiver_label}"


def _expand(patterns: Sequence[str], ctx: CompileContext) -> dict[str, bool]:
    """Site -> whether it came from a ``*`` pattern (so a non-downstream pair is skipped)."""
    out: dict[str, bool] = {}
    for pattern in patterns:
        for site in expand_patterns([pattern], ctx.vocabulary):
            out[site] = out.get(site, False) or "*" in pattern
    for site in out:
        ctx.bind(site)
    return out


def path_pairs(spec: PathPatchingSpec, ctx: CompileContext) -> tuple[list[PathPair], int]:
    """The pairs to run (by sender, then sender position) and how many pattern pairs were
    skipped for not being downstream.

    A receiver must be downstream of its sender (a later layer for head -> head; a head may feed
    the ``mlp_in`` of its own layer; ``logits`` follows everything). A non-downstream pair named
    explicitly is an error; one produced by a pattern is skipped.
    """
    senders = _expand(spec.senders, ctx)
    receivers = _expand(spec.receivers, ctx)
    stage = {s: sender_stage(s) for s in senders}
    r_stage = {r: receiver_stage(r, ctx.dims.n_layers) for r in receivers}
    groups = [tuple(receivers)] if spec.jointly_receivers else [(r,) for r in receivers]
    pairs, skipped, bad = [], 0, []
    for sender, s_pattern in senders.items():
        valid = []
        for group in groups:
            upstream = [r for r in group if r_stage[r] <= stage[sender]]
            if upstream and (s_pattern or any(receivers[r] for r in upstream)):
                skipped += len(spec.positions) * len(spec.receiver_positions)
            elif upstream:
                bad += [f"{sender} -> {r}" for r in upstream]
            else:
                valid.append(group)
        pairs += [  # one pass-2 group per (sender, position): its pairs adjacent
            PathPair(sender, pos, group, rpos)
            for pos in spec.positions
            for group in valid
            for rpos in spec.receiver_positions
        ]
    if bad:
        raise ResolveError(
            "path patching: receiver not downstream of its sender in "
            + ", ".join(bad)
            + " (a receiver must read after the sender writes: a later layer, or the same "
            "layer's mlp_in for a head or attn_out sender; logits follow everything)"
        )
    if not pairs:
        raise ResolveError("path patching: no receiver is downstream of any sender")
    return pairs, skipped


def freeze_sites(pairs: Sequence[PathPair], ctx: CompileContext) -> list[str]:
    """Head outputs and MLP outputs after the earliest sender and before the last receiver.

    Freezing anything upstream of a sender is a no-op (the base input computes it), and anything
    after the last receiver cannot reach a receiver, so both are left out. A sender that is also
    frozen stays correct: the op writes a module's frozen values before its sender's. A later
    layer's attn_out is frozen through its heads (it is a fixed linear map of them); freezing the
    attn_out itself would also cut a head sender of that layer off from everything downstream.
    """
    first = min(sender_stage(p.sender) for p in pairs)
    last = max(receiver_stage(r, ctx.dims.n_layers) for p in pairs for r in p.receivers)
    parts = [s for s in ctx.vocabulary if is_head_output(site_of(s)) or s.endswith(".mlp_out")]
    return [s for s in parts if first < sender_stage(s) < last]


def _role(pos: str | int) -> str | int | None:
    return None if pos == "all" else pos


class PathPatching:
    spec = PathPatchingSpec

    def compile(self, spec: PathPatchingSpec, ctx: CompileContext) -> list[Job]:
        pairs, _ = path_pairs(spec, ctx)
        freeze = freeze_sites(pairs, ctx)
        for s in freeze:
            ctx.bind(s)
        variants = tuple(
            Variant(label=p.label, interventions=(Intervention(site=p.sender, pos=_role(p.pos)),))
            for p in pairs
        )
        params = {
            "receivers": [list(p.receivers) for p in pairs],
            "receiver_pos": [_role(p.receiver_pos) for p in pairs],
            "freeze": freeze,
        }
        extra = tuple(sorted({r for p in pairs for r in p.receivers} | set(freeze)))
        rows = sample_rows(len(ctx.data), spec.samples, spec.seed)
        if spec.source.column is not None:
            if spec.source.column not in ctx.data.columns:
                raise ResolveError(f"source.column {spec.source.column!r} is not a dataset column")
            sources: list[int] = []
        else:
            sources = resample_sources(rows, len(ctx.data), spec.seed)
        jobs = []
        for i, batch in enumerate(chunks(rows, spec.batch_size)):
            job = Job(
                experiment=spec.label,
                op="path_patch",
                rows=tuple(batch),
                source="column" if spec.source.column else "rows",
                source_rows=tuple(sources[i * spec.batch_size : i * spec.batch_size + len(batch)]),
                source_column=spec.source.column,
                variants=variants,
                params=params,
                extra_sites=extra,
            )
            level_rows = Pairs.of(job).level_rows(job)
            jobs.append(job.model_copy(update={"params": {**params, "level_rows": level_rows}}))
        return jobs

    def analyse(
        self,
        spec: PathPatchingSpec,
        ctx: CompileContext,
        jobs: Sequence[Job],
        results: Sequence[JobResult],
    ) -> ExperimentReport:
        name = f"{spec.label}@{ctx.hypothesis}"
        pairs, skipped = path_pairs(spec, ctx)
        values = gather(jobs, results)
        rep = ExperimentReport(name=name, kind=spec.kind)
        _put(rep, "path.metric.clean", bootstrap_ci(values.clean, seed=spec.seed), headline=True)
        effects = bootstrap_ci(values.variants - values.clean, seed=spec.seed)
        norm = None
        if values.source is not None:
            src = bootstrap_ci(values.source, seed=spec.seed)
            _put(rep, "path.metric.source", src, headline=True)
            norm = bootstrap_ratio_ci(
                values.variants - values.clean, values.source - values.clean, seed=spec.seed
            )
        score = norm if norm is not None else effects
        rows = []
        for i, p in enumerate(pairs):
            seg = metric_label(p.label.replace("->", ".to.")).replace("+", "_")
            _put(rep, f"path.effect.{seg}", _at(effects, i))
            if norm is not None:
                _put(rep, f"path.effect_norm.{seg}", _at(norm, i))
            rows.append(
                {
                    "sender": p.sender,
                    "sender_position": str(p.pos),
                    "receiver": "+".join(p.receivers),
                    "receiver_position": str(p.receiver_pos),
                    ctx.metric.kind: float(values.variants[i].mean()),
                    **_cols("effect", effects, i),
                    **(_cols("effect_norm", norm, i) if norm is not None else {}),
                }
            )
        top = int(np.nanargmax(np.abs(score[0])))
        _put(rep, "path.max_effect", _at(score, top), headline=True)
        rep.params = {
            "top_path": pairs[top].label,
            "n_examples": len(values.clean),
            "n_pairs": len(pairs),
            "n_skipped": skipped,
        }
        if skipped:
            rep.warnings.append(
                f"{skipped} sender/receiver pairs from patterns were skipped: the receiver is "
                "not downstream of the sender"
            )
        rep.tables["paths.csv"] = rows
        what = "normalised effect" if norm is not None else f"Δ {ctx.metric.kind}"
        rep.figures["path_heatmap.png"] = _heatmap(name, pairs, score, what)
        return rep


def _cols(name: str, ci: tuple[np.ndarray, np.ndarray, np.ndarray], i: int) -> dict[str, float]:
    est, low, high = _at(ci, i)
    return {name: est, f"{name}_ci_low": low, f"{name}_ci_high": high}


def _heatmap(title: str, pairs: list[PathPair], score: tuple[np.ndarray, ...], what: str) -> bytes:
    """Senders (x sender positions, when several) x receivers, with CI half-widths."""
    several = len({p.pos for p in pairs}) > 1
    row_of = [f"{p.sender}@{p.pos}" if several else p.sender for p in pairs]
    rows = list(dict.fromkeys(row_of))
    cols = list(dict.fromkeys(p.receiver_label for p in pairs))
    grid, low, high = (np.full((len(rows), len(cols)), np.nan) for _ in range(3))
    for i, p in enumerate(pairs):
        r, c = rows.index(row_of[i]), cols.index(p.receiver_label)
        grid[r, c], low[r, c], high[r, c] = score[0][i], score[1][i], score[2][i]
    return heatmap_png(
        grid.tolist(), rows, cols, title, what, (low.tolist(), high.tolist()),
        xlabel="receiver", ylabel="sender" + (" @ position" if several else ""),
        vlim=1.0 if what == "normalised effect" else None,
    )  # fmt: skip


register(PathPatching())
