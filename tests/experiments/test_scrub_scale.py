"""Causal scrubbing at scale: hash-consed trees, values computed once per distinct input, passes
cut short (truncated rows, early stops, logits at scored positions only) and sampled positions;
every one must leave the per-example metrics of the recursive reference unchanged."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
import torch
from reference.hooks import metric_by_hand
from reference.models import TINY_MODELS as MODELS
from reference.scrub import Reference, hyp_of

from mi_spec import api
from mi_spec.execute.ops import op_for
from mi_spec.execute.worker import loaded_for
from mi_spec.experiments import causal_scrubbing
from mi_spec.experiments.scrub_schedule import schedule
from mi_spec.experiments.scrub_tree import ScrubError, TreeBuilder
from mi_spec.tracking.base import InMemoryTracker

T = 7  # tokens per row


def write_study(tmp_path: Path, model: str, extra: str = "", rows: int = 8) -> Path:
    """Rows i and i + rows/2 share every token's parity (so parity pools never run dry); `pa`
    (parity) at L0.H1 reads nothing named, `o` at L1.H2 reads `pa`; the output is `o`."""
    rng = random.Random(2)
    half = [[rng.randrange(38) for _ in range(T)] for _ in range(rows // 2)]
    with open(tmp_path / "rows.jsonl", "w") as f:
        for tokens in half + [[t + 2 for t in r] for r in half]:
            f.write(json.dumps({"tokens": tokens}) + "\n")
    (tmp_path / "h.yaml").write_text(f"""
name: scale-{model}
model:
  {MODELS[model]}
data:
  path: rows.jsonl
  positions: {{tail: {{start: 3, stop: 6}}}}
metric: {{kind: loss, at: tail}}
variables:
  pa: {{value: "tokens[pos] % 2", per_position: true}}
  o: {{value: "pa[pos]", per_position: true}}
correspondence:
  pa: [L0.H1]
  o: [L1.H2]
max_batch_rows: 64
experiments:
  - kind: causal_scrubbing
    samples: {rows}
    seeds: [0]
    controls: {{n_random: 1, drop_one: true, min_agreeing: 1}}
{extra}
""")
    return tmp_path / "h.yaml"


def reference_values(study, plan, state, job) -> list[list[float]]:
    """Per variant, per-row metric of the recursive reference (one plain forward per node)."""
    positions = job.params.get("positions") or [[3, 4, 5]] * len(job.rows)
    targets = [
        [state.data.tokens[r][p + 1] for p in ps] for r, ps in zip(job.rows, positions, strict=True)
    ]
    out = []
    for variant in job.params["variants"]:
        ref = Reference(
            study.model.module, plan.sites, state.data, job.params, hyp_of(study, variant)
        )
        logits = torch.stack([ref.root_logits(k) for k in variant["roots"]])
        out.append(metric_by_hand("loss", logits, positions, targets))
    return out


def run_jobs(plan, state, **params):
    """Every job through the op (with ``params`` added to each job's)."""
    out = []
    for job in plan.jobs:
        job = job.model_copy(update={"params": {**job.params, **params}}) if params else job
        out.append(op_for(job.op)(job, plan, state.engine, state.data))
    return out


@pytest.mark.parametrize("model", ["gpt2", "toy"])
def test_hash_consed_trees_equal_reference_and_unshared_trees(tmp_path, model, monkeypatch):
    path = write_study(tmp_path, model, "    unnamed: joint")
    study, plan = api.compile_file(path)
    (job,) = plan.jobs
    built, distinct = job.params["tree_nodes"], job.params["distinct_nodes"]
    assert distinct == len(job.params["nodes"]) < built  # joint: equal subtrees, stored once
    state = loaded_for(plan, model=study.model)
    (result,) = run_jobs(plan, state)
    for got, want in zip(result.variants, reference_values(study, plan, state, job), strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    assert result.extra["batch_rows"] < distinct  # equal inputs: one value, whatever the node
    unshared = functools.partial(TreeBuilder, dedup=False)
    monkeypatch.setattr(causal_scrubbing.tree, "TreeBuilder", unshared)
    _, flat = api.compile_file(path)
    assert len(flat.jobs[0].params["nodes"]) == flat.jobs[0].params["tree_nodes"] == built
    (again,) = run_jobs(flat, state)
    assert again.clean == pytest.approx(result.clean, abs=1e-6)
    for a, b in zip(again.variants, result.variants, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


@pytest.mark.parametrize("model,kind", [("gpt2", "loss"), ("gpt2", "kl"), ("toy", "accuracy")])
def test_short_passes_equal_full_passes(tmp_path, model, kind):
    study, plan = api.compile_file(write_study(tmp_path, model), [f"metric.kind={kind}"])
    state = loaded_for(plan, model=study.model)
    calls: list[tuple[int, str]] = []
    run = state.engine.run

    def spy(ids, mask, reads=(), writes=(), skips=(), logits=True):
        how = "some" if isinstance(logits, torch.Tensor) else "all" if logits else "none"
        calls.append((ids.shape[1], how))
        return run(ids, mask, reads=reads, writes=writes, skips=skips, logits=logits)

    state.engine.run = spy
    short = run_jobs(plan, state)
    passes = sum(r.extra["passes"] for r in short)
    assert passes == len(calls) == sum(j.forward_passes(plan.max_batch_rows) for j in plan.jobs)
    assert {"none", "some"} == {how for _, how in calls}  # early stops; logits where scored
    assert min(width for width, _ in calls) < T  # rows cut after their last position used
    calls.clear()
    full = run_jobs(plan, state, full_passes=True)
    assert {(width, how) for width, how in calls} == {(T, "all")}
    for a, b in zip(short, full, strict=True):
        assert a.clean == pytest.approx(b.clean, abs=1e-5)
        for x, y in zip(a.variants, b.variants, strict=True):
            assert x == pytest.approx(y, abs=1e-5)
    assert sum(r.extra["batch_rows"] for r in short) < sum(r.extra["batch_rows"] for r in full)
    job, got = plan.jobs[0], short[0]
    ids = torch.tensor([state.data.tokens[r] for r in job.rows])
    clean = study.model.module(ids)
    clean = clean.logits if hasattr(clean, "logits") else clean
    targets = [[state.data.tokens[r][p + 1] for p in (3, 4, 5)] for r in job.rows]
    want = metric_by_hand(kind, clean, [[3, 4, 5]] * len(job.rows), targets, clean_logits=clean)
    assert got.clean == pytest.approx(want, abs=1e-5)


def test_sampled_positions(tmp_path):
    path = write_study(tmp_path, "gpt2")
    study, plan = api.compile_file(path)
    _, every = api.compile_file(path, ["experiments.0.sample_positions=3"])  # all of them
    assert every.jobs[0].params == plan.jobs[0].params
    _, two = api.compile_file(path, ["experiments.0.sample_positions=2"])
    (job,) = two.jobs
    positions = job.params["positions"]
    assert all(len(ps) == 2 and set(ps) <= {3, 4, 5} for ps in positions)
    assert len({tuple(ps) for ps in positions}) > 1  # drawn per row
    for variant in job.params["variants"]:
        assert [job.params["nodes"][k][2] for k in variant["roots"]] == positions
    assert job.params["tree_nodes"] < plan.jobs[0].params["tree_nodes"]
    state = loaded_for(two, model=study.model)
    (result,) = run_jobs(two, state)
    for got, want in zip(result.variants, reference_values(study, two, state, job), strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    targets = [
        [state.data.tokens[r][p + 1] for p in ps] for r, ps in zip(job.rows, positions, strict=True)
    ]
    ids = torch.tensor([state.data.tokens[r] for r in job.rows])
    clean = study.model.module(ids).logits
    assert result.clean == pytest.approx(
        metric_by_hand("loss", clean, positions, targets), abs=1e-5
    )
    over = ["experiments.0.sample_positions=2"]
    rep = api.run(path, InMemoryTracker(), over, cache_dir=None, runner="synchronous").reports[0]
    assert (
        rep.params["sample_positions"] == 2 and rep.params["tree_nodes"] == job.params["tree_nodes"]
    )
    assert rep.metrics["scrub.loss_model"] == pytest.approx(sum(result.clean) / len(result.clean))


SITES = ["embed", "L0.H0", "logits"]
NODES = [
    [1, 0, [2], [[0, 5, []]]],  # L0.H0 needed at 2, embed from row 5 everywhere
    [1, 1, [4], [[0, 5, []]]],  # the same inputs, needed later: its row serves node 0 too
    [1, 2, [3], [[0, 6, [[1, 5]]]]],  # other inputs
    [2, 0, [2, 4], [[0, 7, []], [1, -1, [[4, -2]]]]],  # the output: node 0 at 2, node 1 at 4
    [2, 1, [3], [[0, 7, []], [1, -3, []]]],  # node 2 at 3
]
BASE = {0: [2, 4], 1: [3]}


def test_schedule_computes_each_value_once_at_the_positions_read():
    got = schedule(NODES, SITES, 6, BASE, [8, 4, 10])
    (heads, outputs) = got.levels
    assert [(r.length, r.reads) for r in heads] == [(4, [3]), (5, [2, 4])]
    assert got.cell_index[(1, 4)] == got.cell_index[(0, 2)] + 1  # one row, two values
    assert [(len(r.reads), r.length) for r in outputs] == [(3, 5)]  # three positions, one row
    (embed_rows, base_rows) = got.clean
    assert [(c.row, c.length, c.reads) for c in embed_rows] == [
        (6, 4, {0: [0, 2, 3]}), (5, 5, {0: [0, 1, 2, 3, 4]}), (7, 5, {0: [2, 3, 4]}),
    ]  # fmt: skip
    assert [(c.row, c.logits) for c in base_rows] == [(1, [3]), (0, [2, 4])]
    assert got.sizes == {0: 11, 2: 3 + 3, 1: 3}  # values at positions read, not nodes x T
    assert got.stage_rows == [3, 2, 2, 1]
    tiny = schedule(NODES, SITES, 6, BASE, [8, 4, 10], budget=1)  # every row its own stage
    assert tiny.stage_rows == [1] * 8
    plain = schedule(NODES, SITES, 6, BASE, [8, 4, 10], share=False, truncate=False)
    assert len(plain.levels[0]) == 3 and {r.length for s in plain.levels for r in s} == {6}
    both = schedule(NODES, SITES, 6, BASE, [8, 4, 10], attention="bidirectional")
    assert [(r.length, r.reads) for r in both.levels[0]] == [(6, [2, 4]), (6, [3])]
    bad = [*NODES[:3], [2, 0, [3], [[0, 7, []], [1, -1, []]]]]  # node 0 read where not computed
    with pytest.raises(ScrubError, match="reads node 0 .* at position 3, where that node is not"):
        schedule(bad, SITES, 6, {0: [3]}, [8, 4, 10])
