"""Causal tracing (Meng et al. 2022, ROME; guide Resource 6): which hidden states carry the
information that a corruption destroys.

Source ``{noise: 3.0, at: subject}``: the token embeddings at role ``at`` get Gaussian noise of
``noise`` x their standard deviation (measured on the experiment's rows; logged), seeded by the
experiment's ``seed`` and the row. Cells: for every layer x restored position, the clean state of
(``resid``) the layer's output ``L{l}.resid_post``; (``mlp``/``attn``) the MLP / attention outputs
of the ``window`` layers around it (``max(0, l - w//2) <= j < min(L, l + ceil(w/2))``, as in the
paper) restored into the corrupted run. The indirect effect of a cell is ``metric(restored) -
metric(corrupted)`` per example; normalised by the total effect ``clean - corrupted`` it is the
fraction of the damage undone (1 = the clean metric). Bootstrap CIs over examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from mi_spec.analysis.lens_figures import tracing_png
from mi_spec.analysis.report import ExperimentReport
from mi_spec.analysis.stats import bootstrap_ci, bootstrap_ratio_ci
from mi_spec.data.positions import resolve_role
from mi_spec.experiments.base import (
    CompileContext,
    ExperimentSpec,
    chunks,
    metric_label,
    register,
    sample_rows,
)
from mi_spec.experiments.effects import _at, _put
from mi_spec.plan.ir import Job, JobResult
from mi_spec.spec.sections import Section

Panel = Literal["resid", "mlp", "attn"]
PANEL_SITE = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


class NoiseSource(Section):
    """Corrupt the token embeddings at a role with seeded Gaussian noise (ROME's corruption)."""

    noise: float = Field(
        3.0, gt=0, description="Noise std as a multiple of the token embeddings' std on the data"
    )
    at: str | int = Field(description="Position role whose token embeddings are corrupted")


class CausalTracingSpec(ExperimentSpec):
    """Restore clean states, layer x position, into a noise-corrupted run."""

    kind: Literal["causal_tracing"]
    source: NoiseSource
    positions: list[str | int] | None = Field(
        None,
        description="Positions to restore (roles or indices); default: every index of the "
        "shortest row",
    )
    window: int = Field(10, ge=1, description="Layers restored together for mlp and attn cells")
    restore: list[Panel] | None = Field(
        None, description="What to restore: resid, mlp, attn (default: those the model has)"
    )

    kind_name = "causal_tracing"


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The layers restored together around ``layer`` (Meng et al.'s window)."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def cells(
    panels: Sequence[str], n_layers: int, positions: Sequence[str | int], window: int
) -> list[list]:
    """``[panel, layer, position, sites]`` per cell, panel-major, then layer, then position."""
    out = []
    for panel in panels:
        for layer in range(n_layers):
            around = [layer] if panel == "resid" else window_layers(layer, window, n_layers)
            sites = [f"L{j}.{PANEL_SITE[panel]}" for j in around]
            out += [[panel, layer, pos, sites] for pos in positions]
    return out


class CausalTracing:
    spec = CausalTracingSpec

    def compile(self, spec: CausalTracingSpec, ctx: CompileContext) -> list[Job]:
        ctx.bind("embed")
        have = [p for p in PANEL_SITE if f"L0.{PANEL_SITE[p]}" in ctx.vocabulary]
        panels = spec.restore if spec.restore is not None else have
        missing = [p for p in panels if p not in have]
        if missing:
            raise ValueError(
                f"restore: this model has no {', '.join(PANEL_SITE[p] for p in missing)} sites; "
                f"it can restore: {', '.join(have)}"
            )
        rows = sample_rows(len(ctx.data), spec.samples, spec.seed)
        resolve_role(spec.source.at, ctx.positions, ctx.data, rows)
        positions = spec.positions
        if positions is None:
            positions = list(range(min(ctx.data.lengths[r] for r in rows)))
        for pos in positions:
            resolve_role(pos, ctx.positions, ctx.data, rows)
        table = cells(panels, ctx.dims.n_layers, positions, spec.window)
        for site in sorted({s for c in table for s in c[3]}):
            ctx.bind(site)
        jobs = []
        for batch in chunks(rows, spec.batch_size):
            params = {
                "noise": spec.source.noise,
                "at": spec.source.at,
                "seed": spec.seed,
                "scale_rows": rows,
                "cells": table,
                # passes: the embedding std, the clean run, corrupted + one run per cell
                "level_rows": [len(rows), len(batch), len(batch) * (1 + len(table))],
                "variants": [f"{c[0]}@L{c[1]}@{c[2]}" for c in table],
            }
            jobs.append(
                Job(
                    experiment=spec.label,
                    op="causal_tracing",
                    rows=tuple(batch),
                    params=params,
                    extra_sites=tuple(sorted({"embed", *(s for c in table for s in c[3])})),
                )
            )
        return jobs

    def analyse(
        self,
        spec: CausalTracingSpec,
        ctx: CompileContext,
        jobs: Sequence[Job],
        results: Sequence[JobResult],
    ) -> ExperimentReport:
        table = jobs[0].params["cells"]
        clean = np.concatenate([np.asarray(r.clean, dtype=float) for r in results])
        corrupt = np.concatenate([np.asarray(r.source, dtype=float) for r in results])
        restored = np.concatenate([np.asarray(r.variants, dtype=float) for r in results], axis=1)
        rep = ExperimentReport(name=f"{spec.label}@{ctx.hypothesis}", kind=spec.kind)
        seed = spec.seed
        _put(rep, "trace.metric.clean", bootstrap_ci(clean, seed=seed), headline=True)
        _put(rep, "trace.metric.corrupted", bootstrap_ci(corrupt, seed=seed), headline=True)
        total = clean - corrupt
        _put(rep, "trace.total_effect", bootstrap_ci(total, seed=seed))
        std = {float(r.extra["embed_std"]) for r in results}
        rep.metrics["trace.noise.embed_std"] = std.pop()
        rep.metrics["trace.noise.sigma"] = float(results[0].extra["noise_sigma"])
        ie = bootstrap_ci(restored - corrupt, seed=seed)
        norm = bootstrap_ratio_ci(restored - corrupt, total, seed=seed)
        tiny = abs(float(total.mean())) <= 1e-6 * max(1.0, float(np.abs(clean).mean()))
        if tiny:
            rep.warnings.append(
                "the noise does not change the metric (clean = corrupted): indirect effects are "
                "uninformative; raise source.noise or corrupt another role"
            )
        sign = 1.0 if float(total.mean()) >= 0 else -1.0  # the direction of recovery
        rows = []
        for i, (panel, layer, pos, sites) in enumerate(table):
            seg = f"{panel}.L{layer}.{metric_label(str(pos))}"
            _put(rep, f"trace.ie.{seg}", _at(ie, i))
            if not tiny:
                _put(rep, f"trace.ie_norm.{seg}", _at(norm, i))
            rows.append(
                {"panel": panel, "layer": layer, "position": str(pos), "sites": " + ".join(sites),
                 ctx.metric.kind: float(restored[i].mean()), "indirect_effect": float(ie[0][i]),
                 "ci_low": float(ie[1][i]), "ci_high": float(ie[2][i]),
                 "fraction_recovered": "" if tiny else float(norm[0][i]),
                 "fraction_ci_low": "" if tiny else float(norm[1][i]),
                 "fraction_ci_high": "" if tiny else float(norm[2][i])}
            )  # fmt: skip
        panels = list(dict.fromkeys(c[0] for c in table))
        positions = list(dict.fromkeys(c[2] for c in table))
        shown = ie[0] if tiny else norm[0]
        for panel in panels:
            idx = [i for i, c in enumerate(table) if c[0] == panel]
            top = max(idx, key=lambda i: sign * ie[0][i])
            _put(rep, f"trace.max_ie.{panel}", _at(ie, top), headline=True)
            rep.params[f"top_{panel}"] = f"L{table[top][1]}@{table[top][2]}"
        rep.params |= {"noise_scale": spec.source.noise, "noise_at": str(spec.source.at),
                       "window": spec.window, "metric": ctx.metric.kind,
                       "n_examples": len(clean)}  # fmt: skip
        rep.tables["indirect_effects.csv"] = rows
        grids = []
        for panel in panels:
            grid = np.full((len(positions), ctx.dims.n_layers), np.nan)
            for i, (p, layer, pos, _) in enumerate(table):
                if p == panel:
                    grid[positions.index(pos), layer] = shown[i]
            grids.append((panel if panel == "resid" else f"{panel} (window {spec.window})", grid))
        corrupted = _corrupted_labels(spec, ctx, positions)
        what = (
            f"indirect effect (Δ {ctx.metric.kind})" if tiny else "fraction of the effect restored"
        )
        rep.figures["causal_tracing.png"] = tracing_png(
            grids,
            [f"L{layer}" for layer in range(ctx.dims.n_layers)],
            corrupted,
            f"Causal tracing, {ctx.hypothesis}: noise {spec.source.noise}x std at "
            f"{spec.source.at!s} (*)",
            what,
        )
        return rep


def _corrupted_labels(
    spec: CausalTracingSpec, ctx: CompileContext, positions: Sequence[str | int]
) -> list[str]:
    """Position labels, ``*`` marking those the noise hits (in the first example)."""
    row = sample_rows(len(ctx.data), spec.samples, spec.seed)[:1]
    hit = set(resolve_role(spec.source.at, ctx.positions, ctx.data, row)[0])
    out = []
    for pos in positions:
        here = set(resolve_role(pos, ctx.positions, ctx.data, row)[0])
        out.append(f"{pos}*" if here and here <= hit else str(pos))
    return out


register(CausalTracing())
