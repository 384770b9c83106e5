"""Causal scrubbing (Chan et al. 2022): how much of the model's performance survives resampling
everything the hypothesis says does not matter. The formulation is in ``scrub_tree``.

Compile: the variables' values on every row, then per seed and chunk of base rows one ``scrub`` job
holding the trees of every variant: the hypothesis, the random baseline (no named edges), each
hypothesis node dropped in turn, and random hypotheses (the same nodes moved to random heads/MLPs).
Analyse: ``loss_recovered = (L_random - L_scrubbed) / (L_random - L_model)`` per variant with
bootstrap CIs over examples (per-example values averaged over seeds; seeds also reported one by
one), the random controls' distribution, drop-one results and sampling power. "loss" is the
metric, whatever its kind: the ratio is sign-free.
"""

from __future__ import annotations

import random
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any, Literal

import networkx as nx
import numpy as np
from pydantic import Field

from mi_spec.analysis.figures import bars_png
from mi_spec.analysis.graph_figure import hypothesis_graph_png
from mi_spec.analysis.report import ExperimentReport
from mi_spec.analysis.stats import bootstrap_ci, bootstrap_ratio_ci
from mi_spec.data.positions import metric_positions, resolve_role
from mi_spec.experiments import scrub_schedule
from mi_spec.experiments import scrub_tree as tree
from mi_spec.experiments.base import (
    CompileContext,
    ExperimentSpec,
    chunks,
    metric_label,
    register,
    sample_rows,
)
from mi_spec.experiments.effects import near_zero_denominator
from mi_spec.plan.ir import Job, JobResult
from mi_spec.spec.sections import Section

MAIN, RANDOM = "hypothesis", "random"


class ScrubControls(Section):
    """Controls run next to the hypothesis (on the same base rows)."""

    n_random: int = Field(10, ge=0, description="Random hypotheses: same nodes on random heads")
    drop_one: bool = Field(True, description="Also scrub with each hypothesis node removed")
    min_agreeing: int = Field(
        10, ge=1, description="Warn when an agreement condition had fewer other agreeing inputs"
    )


class CausalScrubbingSpec(ExperimentSpec):
    """Resample every input the hypothesis says should not matter; measure the loss recovered."""

    kind: Literal["causal_scrubbing"]
    seeds: list[int] | None = Field(
        None, min_length=1, description="Resampling seeds (default: [seed]); base rows use seed"
    )
    output: list[str] | None = Field(
        None,
        description="Variables the model's output reads (default: variables of embed/head/MLP "
        "sites that no other variable with sites reads)",
    )
    unnamed: Literal["independent", "joint"] = Field(
        "independent",
        description="Unnamed inputs of a tree node: one random input per edge, or one per node",
    )
    controls: ScrubControls = Field(default_factory=ScrubControls)
    max_tree_nodes: int = Field(500_000, ge=1, description="Cap on distinct tree nodes per job")
    sample_positions: int | None = Field(
        None,
        ge=1,
        description="Score k seeded random positions of the metric's role per example (default: "
        "all). The same positions for the model, every variant and seed. CIs stay over examples; "
        "each example's value is then an unbiased estimate of its all-positions mean, with extra "
        "variance, so CIs widen. The trees shrink about in proportion (long sequences)",
    )

    kind_name = "causal_scrubbing"


def hypothesis_of(
    spec: CausalScrubbingSpec, ctx: CompileContext
) -> tuple[tree.Hypothesis, tree.Arch]:
    if ctx.causal is None or not ctx.correspondence:
        raise tree.ScrubError("causal scrubbing needs `variables` and a `correspondence`")
    for var in spec.output or ():
        if var not in ctx.causal.variables:
            raise tree.ScrubError(f"output: {var!r} is not a declared variable")
    parents = {v: ctx.causal.parents(v) for v in ctx.causal.variables}
    hyp = tree.Hypothesis.build(ctx.correspondence, parents, spec.output)
    has_mlp = "L0.mlp_out" in ctx.vocabulary
    return hyp, tree.Arch(ctx.dims.n_layers, ctx.dims.n_heads, has_mlp, attention_of(ctx))


def attention_of(ctx: CompileContext) -> str:
    """The model's attention pattern, if the scrub trees can model it; else a ScrubError."""
    if ctx.attention is None:
        return "causal"
    pattern = ctx.attention()
    if pattern.kind not in tree.ATTENTION:
        raise tree.ScrubError(
            "causal scrubbing gives a head its inputs at every position it can see, and models "
            "causal attention (position p reads positions <= p) and full bidirectional attention "
            f"(every position reads the whole row); this model has {pattern.describe()}"
        )
    return pattern.kind


def variants_of(
    spec: CausalScrubbingSpec, hyp: tree.Hypothesis, arch: tree.Arch
) -> list[tuple[str, tree.Hypothesis, str]]:
    """(label, hypothesis, description) of every variant, the hypothesis first."""
    nothing = tree.Hypothesis((), hyp.parents, frozenset())
    out = [(MAIN, hyp, "the hypothesis"), (RANDOM, nothing, "no named edges")]
    if spec.controls.drop_one:
        out += [(f"drop:{n.label}", hyp.without(i), n.var) for i, n in enumerate(hyp.nodes)]
    rng = random.Random(f"{spec.seed}:controls")
    for i, (h, m) in enumerate(random_hypotheses(hyp, arch, spec.controls.n_random, rng)):
        out.append((f"control:{i}", h, ", ".join(f"{k}->{v}" for k, v in m.items())))
    return out


def named_edges(hyp: tree.Hypothesis, arch: tree.Arch) -> list[tuple[tree.Node, tree.Node | None]]:
    """(writer node, reader node or None: the output) of every named edge, positions aside."""
    readers: list[tuple[tree.Node | None, str, str]] = [(None, tree.LOGITS, tree.OUTPUT)]
    readers += [(n, n.site, n.var) for n in hyp.nodes if n.site != "embed"]
    return [
        (w, r)
        for r, site, var in readers
        for s in hyp.inputs(arch, site)
        for w in hyp.named(s, var)
    ]


def check_hypothesis(hyp: tree.Hypothesis, arch: tree.Arch) -> list[str]:
    """Raise ScrubError for hypotheses the model cannot implement; return warnings."""
    for site in (n.site for n in hyp.nodes):
        if not (
            site == "embed" or re.match(r"^L\d+\.(H\d+(:[qkv])?|mlp_out|resid_(pre|post))$", site)
        ):
            raise tree.ScrubError(
                "causal scrubbing nodes are embed, heads (L1.H2, optionally L1.H2:q/k/v), "
                "MLPs (L1.mlp_out) and residual points (L1.resid_pre, L0.resid_post), each "
                f"optionally a subspace (site[name]); {site!r} is none of these"
            )
        if (
            site != "embed"
            and tree.layer_of(site) >= arch.n_layers
            or (site.endswith("mlp_out") and not arch.has_mlp)
        ):
            raise tree.ScrubError(f"site {site!r} is not in this model")
    hyp.cuts  # noqa: B018 (two nodes at one residual point: a ScrubError here)
    edges = named_edges(hyp, arch)
    sites_of: dict[str, list[str]] = {}
    for n in hyp.nodes:
        sites_of.setdefault(n.var, []).append(n.label)
    fed = {(r.label if r else tree.LOGITS, w.var) for w, r in edges}
    for r, var in [(None, tree.OUTPUT), *((n, n.var) for n in hyp.nodes if n.site != "embed")]:
        name = r.label if r else tree.LOGITS
        for parent in sorted(hyp.parents_of(var) & set(sites_of)):
            if (name, parent) not in fed:
                raise tree.ScrubError(
                    f"{var if r else 'the output'} ({name}) reads {parent}, but none of {parent}'s "
                    f"sites ({', '.join(sites_of[parent])}) feeds {name} in the model"
                )
    warnings = []
    graph = nx.DiGraph([(w, r or tree.OUTPUT) for w, r in edges])
    reach = nx.ancestors(graph, tree.OUTPUT) if tree.OUTPUT in graph else set()
    for n in hyp.nodes:
        if n not in reach:
            warnings.append(f"{n.label} ({n.var}) is not reached from the output: it has no effect")
        elif n.site != "embed" and not any(r == n for _, r in edges):
            warnings.append(
                f"{n.label} ({n.var}) has no named inputs: it is computed from random inputs only "
                "(give embed a variable and make it a parent to say it reads the tokens)"
            )
    for head in sorted(hyp.split):
        named = {
            tree.head_of(n.site) and n.site[-1] for n in hyp.nodes if tree.head_of(n.site) == head
        }
        if missing := sorted(set("qkv") - named):
            warnings.append(f"{head} is split but :{', :'.join(missing)} are not named: random")
    return warnings


def random_hypotheses(
    hyp: tree.Hypothesis, arch: tree.Arch, n: int, rng: random.Random
) -> list[tuple[tree.Hypothesis, dict[str, str]]]:
    """``n`` controls: the same nodes moved to randomly drawn heads / MLPs (never all in place)."""
    moved = sorted(
        {
            tree.head_of(x.site) or x.site
            for x in hyp.nodes
            if x.site != "embed" and tree.cut_of(x.site) is None  # residual points stay put
        }
    )
    units = [u for u in moved if not u.endswith("mlp_out")]
    mlps = [u for u in moved if u.endswith("mlp_out")]
    heads = [w for w in arch.writers if "H" in w]
    all_mlps = [w for w in arch.writers if w.endswith("mlp_out")]
    out: list[tuple[tree.Hypothesis, dict[str, str]]] = []
    for _ in range(n * 20 if moved else 0):
        mapping = dict(zip(units, rng.sample(heads, len(units)), strict=True))
        mapping |= dict(zip(mlps, rng.sample(all_mlps, len(mlps)), strict=True))
        if any(k != v for k, v in mapping.items()):
            out.append((hyp.remap(mapping), mapping))
        if len(out) == n:
            break
    return out


class CausalScrubbing:
    spec = CausalScrubbingSpec

    def compile(self, spec: CausalScrubbingSpec, ctx: CompileContext) -> list[Job]:
        hyp, arch = hypothesis_of(spec, ctx)
        check_hypothesis(hyp, arch)
        assert ctx.causal is not None
        used = sorted({n.var for n in hyp.nodes})
        values: dict[str, list[Any]] = {v: [] for v in used}
        for r in range(len(ctx.data)):
            computed = ctx.causal.compute(ctx.data.row(r))
            for v in used:
                values[v].append(computed[v])
        per_pos = {v: ctx.causal.variables[v].per_position for v in used}
        lengths = ctx.data.lengths
        pools = tree.Pools(values, per_pos, lengths)
        role_cache: dict[tuple[Any, int], list[int]] = {}

        def roles(role: str | int, row: int) -> list[int]:
            if (role, row) not in role_cache:
                role_cache[(role, row)] = resolve_role(role, ctx.positions, ctx.data, [row])[0]
            return role_cache[(role, row)]

        variants = variants_of(spec, hyp, arch)
        base = sample_rows(len(ctx.data), spec.samples, spec.seed)
        by_length: dict[int, list[int]] = defaultdict(list)
        for r in base:
            by_length[lengths[r]].append(r)
        jobs = []
        for seed in spec.seeds or [spec.seed]:
            for group in by_length.values():
                for batch in chunks(group, spec.batch_size):
                    jobs.append(self._job(spec, ctx, arch, pools, roles, variants, seed, batch))
        return jobs

    def _job(self, spec, ctx, arch, pools, roles, variants, seed, batch) -> Job:
        builder = tree.TreeBuilder(arch, pools, roles, spec.unnamed, spec.max_tree_nodes)
        record: dict = {}
        scored, sampled = {}, False
        for row in batch:
            scored[row], fewer = scored_positions(spec, ctx, row)
            sampled |= fewer
        out = []
        for label, hyp, _ in variants:
            roots = []
            for row in batch:
                rng = random.Random(f"{seed}:{label}:{row}")
                sampling = tree.Sampling(hyp, rng, record if label == MAIN else None)
                roots.append(builder.root(sampling, row, scored[row]))
            nodes = [[n.var, n.label] for n in hyp.nodes]
            out.append(
                {"label": label, "nodes": nodes, "output": sorted(hyp.output), "roots": roots}
            )
        widths = [_width(ctx, s) for s in builder.sites]
        length = ctx.data.lengths[batch[0]]
        plan = scrub_schedule.schedule(
            builder.nodes, builder.sites, length, scored, widths, arch.attention
        )
        power = [
            [v, p, repr(k), n, uses] for (v, p, k), (n, uses) in sorted(record.items(), key=str)
        ]
        params = {
            "seed": seed,
            "sites": builder.sites,
            "nodes": builder.nodes,
            "variants": out,
            "level_rows": plan.stage_rows,  # batch rows per stage: clean pass, then each level
            "tree_nodes": builder.built,  # as built, one evaluation per node
            "distinct_nodes": len(builder.nodes),  # after hash-consing equal subtrees
            "attention": arch.attention,
            "widths": widths,
            "pass_floats": scrub_schedule.PASS_FLOATS,
            "power": power,
        }
        if sampled:  # the metric's positions, restricted (the op scores these only)
            params["positions"] = [scored[row] for row in batch]
        return Job(
            experiment=spec.label,
            op="scrub",
            rows=tuple(batch),
            params=params,
            extra_sites=tuple(s for s in builder.sites if s != "logits"),
        )

    def analyse(
        self,
        spec: CausalScrubbingSpec,
        ctx: CompileContext,
        jobs: Sequence[Job],
        results: Sequence[JobResult],
    ) -> ExperimentReport:
        hyp, arch = hypothesis_of(spec, ctx)
        variants = variants_of(spec, hyp, arch)
        labels = [v[0] for v in variants]
        seeds = spec.seeds or [spec.seed]
        model, per_seed = _gather(jobs, results, labels, seeds)
        vals = {k: np.mean([per_seed[s][k] for s in seeds], axis=0) for k in labels}
        rep = ExperimentReport(name=f"{spec.label}@{ctx.hypothesis}", kind=spec.kind)
        rep.warnings += check_hypothesis(hyp, arch)
        random_ = vals[RANDOM]
        den = random_ - model
        for key, x, head in (("loss_model", model, True), ("loss_random", random_, True)):
            _put(rep, f"scrub.{key}", bootstrap_ci(x, seed=spec.seed), head)
        _put(rep, "scrub.loss_scrubbed", bootstrap_ci(vals[MAIN], seed=spec.seed), True)
        rows, recovered = [], {}
        for label, _, desc in variants:
            ci = bootstrap_ratio_ci(random_ - vals[label], den, seed=spec.seed)
            recovered[label] = tuple(float(x) for x in ci)
            rows.append(
                {"variant": label, "detail": desc, "loss": float(vals[label].mean()),
                 "loss_recovered": recovered[label][0], "ci_low": recovered[label][1],
                 "ci_high": recovered[label][2]}
            )  # fmt: skip
        _put(rep, "scrub.loss_recovered", recovered[MAIN], True)
        ratio = "scrub.loss_recovered (÷ loss_random − loss_model)"
        rep.warnings += near_zero_denominator(ratio, random_, model, spec.seed)
        if len(seeds) > 1:
            by_seed = [_ratio(per_seed[s], model) for s in seeds]
            rep.series["scrub.loss_recovered.by_seed"] = by_seed
            rep.metrics["scrub.loss_recovered.seed_std"] = float(np.std(by_seed))
        for label in labels:
            if label.startswith("drop:"):
                _put(rep, f"scrub.drop.{metric_label(label[5:])}", recovered[label])
        controls = [recovered[k][0] for k in labels if k.startswith("control:")]
        if controls:
            c = np.asarray(controls)
            stats = {"mean": c.mean(), "std": c.std(), "max": c.max()}
            stats["p"] = (c >= recovered[MAIN][0]).mean()  # share scoring at least as high
            rep.metrics |= {f"scrub.control.random_{k}": float(v) for k, v in stats.items()}
            rep.headline["scrub.control.random_mean"] = float(c.mean())
        elif spec.controls.n_random:
            rep.warnings.append("no random hypothesis differs from this one: no random control")
        _power(rep, jobs, spec.controls.min_agreeing)
        rep.params = {
            "n_examples": len(model),
            "seeds": seeds,
            "unnamed": spec.unnamed,
            "attention": arch.attention,
            "output": sorted(hyp.output),
            "n_random": len(controls),
            "sample_positions": spec.sample_positions,
            **{
                k: sum(r.extra.get(k, 0) for r in results)
                for k in ("passes", "tree_nodes", "distinct_nodes")
            },
        }
        rep.tables["variants.csv"] = rows
        rep.figures["loss_recovered.png"] = _bars(rep.name, variants, recovered, controls)
        graph = ctx.causal.graph if ctx.causal else None
        edges = [(w.label, r.label if r else "logits", w.var) for w, r in named_edges(hyp, arch)]
        png = hypothesis_graph_png(graph, ctx.correspondence, sorted(hyp.output), edges, rep.name)
        rep.figures["graph.png"] = png
        return rep


def scored_positions(
    spec: CausalScrubbingSpec, ctx: CompileContext, row: int
) -> tuple[list[int], bool]:
    """The positions the metric scores on ``row``: all of them, or ``sample_positions`` of them
    drawn with a generator seeded by the experiment's seed and the row (fixed across seeds);
    and whether that is fewer than all."""
    got = sorted(set(metric_positions(ctx.metric, ctx.positions, ctx.data, [row])[0]))
    k = spec.sample_positions
    if k is None or k >= len(got):
        return got, False
    return sorted(random.Random(f"{spec.seed}:positions:{row}").sample(got, k)), True


def _width(ctx: CompileContext, site: str) -> int:
    """Floats per value of ``site`` (the memory cap's unit): the vocabulary for the output."""
    if site == tree.LOGITS:
        return ctx.dims.d_vocab
    if "[" not in site:
        width = ctx.bind(site).width
        if width is not None:
            return width
    return ctx.dims.d_model


def _gather(jobs, results, labels, seeds) -> tuple[np.ndarray, dict[int, dict[str, np.ndarray]]]:
    """Per-row clean values and, per seed, per-variant values, in one row order for all seeds."""
    per: dict[int, dict[str, dict[int, float]]] = {s: defaultdict(dict) for s in seeds}
    clean: dict[int, float] = {}
    for job, res in zip(jobs, results, strict=True):
        got = [v["label"] for v in job.params["variants"]]
        if got != labels:
            raise ValueError(f"job {job.id} has variants {got[:3]}..., expected {labels[:3]}...")
        for i, row in enumerate(job.rows):
            clean[row] = res.clean[i]
            for label, values in zip(labels, res.variants, strict=True):
                per[job.params["seed"]][label][row] = values[i]
    order = sorted(clean)
    arrays = {
        s: {k: np.asarray([per[s][k][r] for r in order], dtype=float) for k in labels}
        for s in seeds
    }
    return np.asarray([clean[r] for r in order], dtype=float), arrays


def _ratio(vals: dict[str, np.ndarray], model: np.ndarray) -> float:
    return float((vals[RANDOM] - vals[MAIN]).mean() / (vals[RANDOM] - model).mean())


def _put(rep: ExperimentReport, key: str, ci, headline: bool = False) -> None:
    for k, v in zip((key, f"{key}.ci_low", f"{key}.ci_high"), ci, strict=True):
        rep.metrics[k] = float(v)
        if headline:
            rep.headline[k] = float(v)


def _power(rep: ExperimentReport, jobs: Sequence[Job], threshold: int) -> None:
    """Merge the jobs' agreement conditions; metrics, a table and warnings on thin ones."""
    merged: dict[tuple, list[int]] = {}
    for job in jobs:
        for var, pos, key, n, uses in job.params["power"]:
            merged.setdefault((var, pos, key), [n, 0])[1] += uses
    if not merged:
        return
    counts = [n for n, _ in merged.values()]
    thin = {k: v for k, v in merged.items() if v[0] < threshold}
    rep.metrics |= {
        "scrub.power.min_agreeing": float(min(counts)),
        "scrub.power.median_agreeing": float(statistics.median(counts)),
        "scrub.power.conditions": float(len(counts)),
        "scrub.power.below_threshold": float(len(thin)),
    }
    rep.tables["power.csv"] = [
        {"variable": v, "position": "" if p is None else p, "value": k, "n_agreeing": n,
         "uses": u, "below_threshold": n < threshold}
        for (v, p, k), (n, u) in sorted(merged.items(), key=lambda kv: (kv[1][0], str(kv[0])))
    ]  # fmt: skip
    if thin:
        per_var = Counter(v for v, _, _ in thin)
        (var, pos, key), (n, _) = min(thin.items(), key=lambda kv: kv[1][0])
        rep.warnings.append(
            f"{len(thin)} of {len(counts)} agreement conditions had fewer than {threshold} other "
            f"agreeing inputs ({', '.join(f'{v}: {c}' for v, c in sorted(per_var.items()))}); "
            f"thinnest: {var} at {pos} = {key} with {n}"
        )


def _bars(title: str, variants, recovered: dict, controls: list[float]) -> bytes:
    names = [v[0] for v in variants if not v[0].startswith(("control:", RANDOM))]
    labels = [n.replace("drop:", "− ") for n in names]
    est, low, high = (list(x) for x in zip(*(recovered[n] for n in names), strict=True))
    if controls:  # the controls' mean, with their range as the bar
        labels.append(f"random hyp. (n={len(controls)})")
        est, low, high = est + [np.mean(controls)], low + [min(controls)], high + [max(controls)]
    return bars_png(
        labels, est, low, high, f"{title}: loss recovered", "loss recovered",
        reference_lines={"model": 1.0},
    )  # fmt: skip


register(CausalScrubbing())
