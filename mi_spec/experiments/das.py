"""DAS: distributed alignment search (Geiger, Wu et al.; guide Resource 11).

Top-down test of the high-level causal model in ``variables:``: learn an orthogonal rotation at a
site so that swapping the rotated subspace of variable V between a base and a source changes the
model's output exactly as swapping V changes the high-level model's output. Counterfactual pairs
and labels come from the causal model at compile time: sample base and source rows, set V in the
base to its source value, recompute the ``output`` variable. Pairs are balanced over
counterfactual labels (round-robin over label classes); rows are split into train / val / test
so that test pairs share no row with training. One job per site × position × dim × seed.

Reports interchange intervention accuracy (IIA) on the test pairs with bootstrap CIs, next to two
controls: a random (untrained) rotation and the base-label floor (IIA if the intervention did
nothing: the model's clean prediction scored against the counterfactual label).
"""

from __future__ import annotations

import base64
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from itertools import product
from typing import Any, Literal

import numpy as np
from pydantic import Field, PositiveInt

from mi_spec.analysis.figures import _figure, _png, bars_png
from mi_spec.analysis.graph_figure import hypothesis_graph_png
from mi_spec.analysis.report import ExperimentReport
from mi_spec.analysis.stats import bootstrap_ci
from mi_spec.experiments.base import (
    CompileContext,
    ExperimentSpec,
    metric_label,
    register,
    sample_rows,
)
from mi_spec.experiments.das_pairs import PairSampler, output_variable
from mi_spec.experiments.effects import _put
from mi_spec.plan.ir import Job, JobResult
from mi_spec.sites.vocabulary import expand_patterns, split_position
from mi_spec.spec.sections import Section

_LAYER = re.compile(r"^L(\d+)\.")


class DasTraining(Section):
    """How each rotation is trained (one run per seed)."""

    epochs: int = Field(20, ge=0, description="Passes over the training pairs (0: evaluate init)")
    lr: float = Field(0.01, gt=0, description="Learning rate")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule after warm-up"
    )
    warmup: float = Field(0.0, ge=0, lt=1, description="Fraction of steps with linear warm-up")
    patience: int | None = Field(
        5, ge=1, description="Stop after this many epochs without a better validation IIA"
    )
    min_delta: float = Field(0.0, ge=0, description="Smallest validation-IIA gain that counts")
    temperature: tuple[float, float] = Field(
        (50.0, 0.1), description="boundless: mask temperature, annealed geometrically start -> end"
    )
    mask_penalty: float = Field(
        0.01, ge=0, description="boundless: loss weight on the boundaries (subspace sizes)"
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1, description="One run per seed (init, shuffle)"
    )


class DasPairs(Section):
    """How many counterfactual pairs to draw, and which rows are held out."""

    train: int = Field(2048, ge=1, description="Training pairs")
    val: int = Field(256, ge=0, description="Validation pairs (early stopping, picking a config)")
    test: int = Field(512, ge=1, description="Test pairs (IIA is reported on these)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Rows reserved for validation")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Rows reserved for test")


class DasSpec(ExperimentSpec):
    """Align high-level variables with subspaces of a site by interchange interventions."""

    kind: Literal["das"]
    variables: str | list[str] = Field(
        description="Variable(s) to align; several share one rotation, in disjoint subspaces"
    )
    output: str | None = Field(
        None, description="The high-level output variable (default: the one sink they feed)"
    )
    labels: dict[str, int] | None = Field(
        None, description="Output value (as text, e.g. 'True') -> token id; default: bool/int"
    )
    site: str | list[str] = Field(
        description="Site(s), patterns allowed, optionally '@position' ('L*.resid_post@last')"
    )
    positions: list[str | int] = Field(
        default_factory=lambda: ["last"], description="Positions for sites given without '@'"
    )
    intervention: Literal["full", "low_rank", "boundless"] = Field(
        "low_rank",
        description="full: d x d rotation; low_rank: d x (n_vars*dim); boundless: d x d with a "
        "learned boundary per variable",
    )
    dim: PositiveInt | list[PositiveInt] | None = Field(
        None, description="Subspace size per variable (a list sweeps); default: low_rank 1, "
        "full site_width // n_vars",
    )  # fmt: skip
    swap: Literal["each", "all", "each+all"] = Field(
        "each+all", description="Which variables a pair swaps: each alone, all together, or both"
    )
    init: str = Field(
        "random",
        description="random | identity | a rotation file saved by a DAS run "
        "(relative to this file)",
    )
    batch_size: int = Field(64, ge=1, description="Pairs per training step")
    pairs: DasPairs = Field(default_factory=DasPairs)
    training: DasTraining = Field(default_factory=DasTraining)

    kind_name = "das"

    @property
    def variable_list(self) -> list[str]:
        return [self.variables] if isinstance(self.variables, str) else list(self.variables)

    @property
    def site_list(self) -> list[str]:
        return [self.site] if isinstance(self.site, str) else list(self.site)

    @property
    def dim_list(self) -> list[int | None]:
        return self.dim if isinstance(self.dim, list) else [self.dim]


def _check_init(spec: DasSpec, ctx: CompileContext, sites: list[str]) -> None:
    """``init: <file>`` names a rotation a DAS run saved, of this intervention, as wide as each
    site (where the site's width is known before the model runs)."""
    from pathlib import Path

    from mi_spec.execute.das_op import load_rotation

    path = Path(spec.init) if Path(spec.init).is_absolute() else Path(ctx.base_dir) / spec.init
    if not path.is_file():
        raise ValueError(
            f"das: init rotation file not found: {path} (init: random | identity | a "
            "rotation_<config>.pt artifact of a DAS run, relative to this file)"
        )
    try:
        saved = load_rotation(path)
        rows, kind = int(saved["rotation"].shape[0]), saved.get("kind")
    except Exception as e:  # not a rotation mi_spec wrote
        raise ValueError(f"das: {path} is not a rotation saved by a DAS run: {e}") from None
    if kind is not None and kind != spec.intervention:
        raise ValueError(
            f"das: {path} holds a {kind} rotation; this experiment is {spec.intervention}"
        )
    for site in dict.fromkeys(sites):
        width = ctx.bind(site).width
        if width is not None and width != rows:
            raise ValueError(f"das: {path} rotates {rows} dimensions; site {site} has {width}")


class Das:
    spec = DasSpec

    def compile(self, spec: DasSpec, ctx: CompileContext) -> list[Job]:
        if ctx.causal is None or not ctx.causal.variables:
            raise ValueError("das needs the high-level causal model (`variables:`)")
        names = spec.variable_list
        output = output_variable(ctx.causal, names, spec.output)
        configs = []
        for text in spec.site_list:
            pattern, pos = split_position(text)
            for site in expand_patterns([pattern], ctx.vocabulary):
                ctx.bind(site)
                configs += [(site, p) for p in ([pos] if pos is not None else spec.positions)]
        for _, pos in configs:
            if isinstance(pos, str) and pos not in ctx.positions:
                raise ValueError(f"das: unknown position {pos!r}; named: {sorted(ctx.positions)}")
        if spec.init not in ("random", "identity"):
            _check_init(spec, ctx, [site for site, _ in configs])
        sets = [[v] for v in names] if spec.swap != "all" else []
        sets += [names] if spec.swap != "each" and (len(names) > 1 or not sets) else []
        rng = random.Random(spec.seed)
        rows = sample_rows(len(ctx.data), spec.samples, spec.seed)
        rng.shuffle(rows)
        n_test = max(1, round(spec.pairs.test_fraction * len(rows)))
        n_val = round(spec.pairs.val_fraction * len(rows)) if spec.pairs.val else 0
        parts = {"test": rows[:n_test], "val": rows[n_test : n_test + n_val]}
        parts["train"] = rows[n_test + n_val :]
        if not parts["train"] or (spec.pairs.val and not parts["val"]):
            raise ValueError(f"das: {len(rows)} rows are too few to split into train/val/test")
        sampler = PairSampler(ctx, ctx.causal, spec, output)
        counts = {"train": spec.pairs.train, "val": spec.pairs.val, "test": spec.pairs.test}
        pairs = {k: sampler.sample(parts[k], counts[k], sets, rng) for k in counts}
        used = {r for p in pairs.values() for r in p["base"] + sum(p["sources"], []) if r >= 0}
        common = {
            "variables": names,
            "output": output,
            "swap_sets": sets,
            "intervention": spec.intervention,
            "init": spec.init,
            "training": spec.training.model_dump(mode="json") | {"batch_size": spec.batch_size},
            **pairs,
        }
        sweep_dims, rows_used = len(spec.dim_list) > 1, tuple(sorted(used))
        jobs = []
        for (site, pos), dim, seed in product(configs, spec.dim_list, spec.training.seeds):
            config = f"{site}@{pos}" + (f":k{dim}" if sweep_dims else "")
            params = {"site": site, "position": pos, "dim": dim, "seed": seed, "config": config}
            params |= {"label": f"{config}:seed{seed}"}
            kw = {"params": common | params, "rows": rows_used, "extra_sites": (site,)}
            jobs.append(Job(experiment=spec.label, op="das", **kw))
        return jobs

    def analyse(
        self,
        spec: DasSpec,
        ctx: CompileContext,
        jobs: Sequence[Job],
        results: Sequence[JobResult],
    ) -> ExperimentReport:
        rep = ExperimentReport(name=f"{spec.label}@{ctx.hypothesis}", kind=spec.kind)
        by_config: dict[str, list[tuple[Job, JobResult]]] = defaultdict(list)
        for job, res in zip(jobs, results, strict=True):
            by_config[job.params["config"]].append((job, res))
        stats, table = {}, []
        for config, runs in by_config.items():
            trained = np.mean([r.variants[0] for _, r in runs], axis=0)
            random_rot = np.mean([r.variants[1] for _, r in runs], axis=0)
            floor = np.asarray(runs[0][1].clean, dtype=float)
            est, low, high = bootstrap_ci(np.stack([trained, random_rot, floor]), seed=spec.seed)
            vals = [r.extra["best_val_iia"] for _, r in runs]
            val = float(np.mean(vals)) if None not in vals else float(est[0])
            stats[config] = (est, low, high, val, trained)
            for job, r in runs:
                table.append(_table_row(job, r))
        best = max(stats, key=lambda c: stats[c][3])
        est, low, high, _, trained = stats[best]
        keys = ("das.iia", "das.control.random_rotation", "das.control.base_label")
        for i, key in enumerate(keys):
            _put(rep, key, (est[i], low[i], high[i]), headline=True)
        if len(stats) > 1:
            for config, (e, lo, hi, _, _) in stats.items():
                _put(rep, f"das.iia.{metric_label(config)}", (e[0], lo[0], hi[0]))
                rep.metrics[f"das.control.random_rotation.{metric_label(config)}"] = float(e[1])
        first = jobs[0].params
        test = first["test"]
        swap = np.asarray(test["swap"])
        for s, names in enumerate(first["swap_sets"]):
            rep.metrics[f"das.iia.swap.{'_and_'.join(names)}"] = float(trained[swap == s].mean())
        differs = float(np.mean(np.asarray(test["labels"]) != np.asarray(test["base_labels"])))
        rep.metrics["das.pairs.cf_differs"] = differs
        extras = [r.extra for r in results]
        rep.metrics["das.base_accuracy"] = float(np.mean([x["base_accuracy"] for x in extras]))
        rep.metrics["das.orthogonality_error"] = max(x["orthogonality_error"] for x in extras)
        rep.params = {
            "variables": ",".join(first["variables"]),
            "output": first["output"],
            "intervention": first["intervention"],
            "best_config": best,
            "pairs.train": len(first["train"]["base"]),
            "pairs.test": len(test["base"]),
            "mode": ",".join(sorted({r.extra["mode"] for r in results})),
        }
        multi = len(results) > 1
        for job, r in zip(jobs, results, strict=True):
            tag = f".{metric_label(job.params['label'])}" if multi else ""
            rep.series[f"das.train.loss{tag}"] = list(r.extra["loss"])
            rep.series[f"das.val.iia{tag}"] = list(r.extra["val_iia"])
            name = metric_label(job.params["label"] if multi else job.params["config"])
            rep.files[f"rotation_{name}.pt"] = base64.b64decode(r.extra["rotation"])
        rep.tables["das.csv"] = table
        rep.figures["iia.png"] = _bars(rep.name, stats, best)
        if len(stats) > 1:
            rep.figures["iia_curve.png"] = _curve(rep.name, stats)
        aligned = by_config[best][0][0].params
        at = f"{aligned['site']}@{aligned['position']}"
        rep.figures["graph.png"] = hypothesis_graph_png(
            ctx.causal.graph if ctx.causal else None,
            {v: [at] for v in first["variables"]},
            [first["output"]],
            [],
            f"{rep.name}: {', '.join(first['variables'])} aligned at {at}",
        )
        rep.warnings += _warnings(differs, test, results)
        return rep


def _table_row(job: Job, r: JobResult) -> dict[str, Any]:
    p, x = job.params, r.extra
    return {
        "config": p["config"], "site": p["site"], "position": p["position"], "dim": x["dim"],
        "seed": p["seed"], "iia": float(np.mean(r.variants[0])),
        "random_rotation": float(np.mean(r.variants[1])), "base_label": float(np.mean(r.clean)),
        "best_val_iia": x["best_val_iia"], "steps": x["steps"], "mode": x["mode"],
        "seconds_per_step": x["seconds_per_step"], "orthogonality_error": x["orthogonality_error"],
    }  # fmt: skip


def _bars(title: str, stats: dict, best: str) -> bytes:
    labels = [*stats, "random rotation", "base-label floor"]
    est, low, high, _, _ = stats[best]
    rows = [(s[0][0], s[1][0], s[2][0]) for s in stats.values()]
    rows += [(est[i], low[i], high[i]) for i in (1, 2)]
    vals, lows, highs = (list(x) for x in zip(*rows, strict=True))
    return bars_png(labels, vals, lows, highs, title, "IIA (test pairs)")


def _curve(title: str, stats: dict) -> bytes:
    """IIA against layer (or config index), one line per site kind / position / dim."""
    lines: dict[str, list[tuple[int, float, float, float]]] = defaultdict(list)
    for i, (config, (est, low, high, _, _)) in enumerate(stats.items()):
        m = _LAYER.match(config)
        key = _LAYER.sub("L*.", config) if m else "configs"
        lines[key].append((int(m[1]) if m else i, est[0], low[0], high[0]))
    from matplotlib.ticker import MaxNLocator

    fig = _figure(width=7.0, height=4.5)
    ax = fig.add_subplot()
    for key, pts in lines.items():
        x, y, lo, hi = (np.asarray(v, dtype=float) for v in zip(*sorted(pts), strict=True))
        ax.plot(x, y, marker="o", label=key)
        ax.fill_between(x, lo, hi, alpha=0.2)
    ax.set_xlabel("layer" if "configs" not in lines else "config")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("IIA (test pairs)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=12)
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return _png(fig)


def _warnings(differs: float, test: dict, results: Sequence[JobResult]) -> list[str]:
    out = []
    if differs < 0.2:
        out.append(
            f"only {differs:.0%} of test pairs have a counterfactual label different from the "
            "base label: IIA is dominated by the base-label floor"
        )
    counts = np.bincount(np.asarray(test["labels"]))
    share = counts.max() / counts.sum()
    if share > 1 / max(1, (counts > 0).sum()) + 0.1:
        out.append(f"counterfactual labels are unbalanced: the largest class is {share:.0%}")
    if any(r.extra["mode"] == "run" and r.extra["steps"] for r in results):
        out.append("some runs could not skip the layers below the site (full forward per step)")
    if not (e := max(r.extra["orthogonality_error"] for r in results)) <= 1e-5:  # NaN too
        out.append(f"rotation is not orthogonal to 1e-5 (max |R^T R - I| = {e:.2g})")
    return out


register(Das())
