"""Causal scrubbing: tree semantics, the batched engine against a slow hook-based reference, a
hand-built model whose mechanism is known exactly, and the report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from reference.hooks import metric_by_hand
from reference.models import TINY_MODELS
from reference.scrub import Reference, hyp_of

from mi_spec import api
from mi_spec.analysis.graph_figure import causal_panel, model_panel
from mi_spec.errors import SpecError
from mi_spec.execute.ops import op_for
from mi_spec.execute.worker import loaded_for
from mi_spec.experiments.causal_scrubbing import check_hypothesis
from mi_spec.experiments.scrub_tree import (
    Arch,
    Hypothesis,
    Pools,
    Sampling,
    ScrubError,
    TreeBuilder,
    levels,
)
from mi_spec.tracking.base import InMemoryTracker
from mi_spec.zoo import INDUCTION_2L_CHECKPOINT, INDUCTION_2L_METADATA

ROOT = Path(__file__).resolve().parents[2]
HANDBUILT = ROOT / "hypotheses" / "handbuilt_scrub.yaml"
INDUCTION = ROOT / "hypotheses" / "induction_scrub.yaml"
MODELS = TINY_MODELS


def write_study(tmp_path: Path, model: str, unnamed: str) -> Path:
    rng = random.Random(3)
    with open(tmp_path / "rows.jsonl", "w") as f:
        for _ in range(48):
            f.write(json.dumps({"tokens": [rng.randrange(40) for _ in range(8)]}) + "\n")
    mlp = model == "gpt2"
    v_value = "mm" if mlp else "tp[0]"
    (tmp_path / "h.yaml").write_text(f"""
name: ref-{model}
model:
  {MODELS[model]}
data:
  path: rows.jsonl
  positions: {{tail: {{start: 4, stop: 7}}, pre: 6}}
metric: {{kind: loss, at: tail}}
variables:
  tp: {{value: "tokens[pos] % 2", per_position: true}}
  pa: {{value: "tp[pos - 1] if pos > 0 else 0", per_position: true}}
  w: {{value: "tp[1]"}}
  mm: {{value: "sum(tp) % 3"}}
  q: {{value: "pa[pos]", per_position: true}}
  k: {{value: "tp[pos] + w", per_position: true}}
  v: {{value: "{v_value}"}}
  o: {{value: "q[pos] + k[pos] + v", per_position: true}}
  side: {{value: "tp[-1]"}}
correspondence:
  tp: [embed]
  pa: [L0.H1]
  w: [L0.H0]
  {"mm: [L0.mlp_out]" if mlp else ""}
  q: ["L1.H2:q"]
  k: ["L1.H2:k"]
  v: ["L1.H2:v"]
  o: [L1.H2]
  side: ["L0.H3@pre"]
max_batch_rows: 64
experiments:
  - kind: causal_scrubbing
    samples: 5
    unnamed: {unnamed}
    controls: {{n_random: 1, drop_one: false, min_agreeing: 2}}
""")
    return tmp_path / "h.yaml"


@pytest.mark.parametrize(
    "model,unnamed", [("toy", "independent"), ("gpt2", "independent"), ("gpt2", "joint")]
)
def test_batched_engine_equals_recursive_reference(tmp_path, model, unnamed):
    study, plan = api.compile_file(write_study(tmp_path, model, unnamed))
    state = loaded_for(plan, model=study.model)
    main = job_hyp = None
    for job in plan.jobs:
        result = op_for(job.op)(job, plan, state.engine, state.data)
        positions = [[4, 5, 6]] * len(job.rows)
        targets = [[state.data.tokens[r][p + 1] for p in (4, 5, 6)] for r in job.rows]
        forwards = 0
        for variant, got in zip(job.params["variants"], result.variants, strict=True):
            job_hyp = hyp_of(study, variant)
            main = main or job_hyp
            ref = Reference(study.model.module, plan.sites, state.data, job.params, job_hyp)
            logits = torch.stack([ref.root_logits(k) for k in variant["roots"]])
            forwards += ref.forwards
            want = metric_by_hand("loss", logits, positions, targets)
            assert got == pytest.approx(want, abs=1e-5), variant["label"]
        ids = torch.tensor([state.data.tokens[r] for r in job.rows])
        clean = study.model.module(ids)
        clean = clean.logits if hasattr(clean, "logits") else clean
        assert result.clean == pytest.approx(
            metric_by_hand("loss", clean, positions, targets), abs=1e-5
        )
        nodes = len(job.params["nodes"])
        assert forwards >= nodes > 10 * result.extra["passes"]  # batched: many nodes a pass
    assert main is not None and main.split == {"L1.H2"}  # the split head is exercised


def test_tree_sampling_semantics():
    tokens = [[1, 2, 3, 4], [1, 2, 3, 5], [2, 2, 4, 4], [1, 2, 4, 4], [7, 7, 7], [8, 8, 8]]
    values = {"first": [t[0] for t in tokens], "tok": [list(t) for t in tokens]}
    pools = Pools(values, {"first": False, "tok": True}, [len(t) for t in tokens])
    assert pools.agreeing("first", None, 0) == [0, 1, 3] and pools.agreeing("tok", 2, 4) == [4]
    arch = Arch(n_layers=2, n_heads=1, has_mlp=False)
    hyp = Hypothesis.build(
        {"tok": ["embed"], "first": ["L0.H0"]}, {"first": ["tok"], "tok": ["tokens"]}
    )
    assert hyp.output == {"first"}
    builder = TreeBuilder(arch, pools, lambda role, row: [], "independent")
    record: dict = {}
    root = builder.root(Sampling(hyp, random.Random(0), record), 0, [2])
    assert levels(builder.nodes)[root] == 2
    site, row, need, edges = builder.nodes[root]
    assert builder.sites[site] == "logits" and row == 0 and need == [2]
    by_site = {builder.sites[e[0]]: e for e in edges}
    assert set(by_site) == {"embed", "L0.H0", "L1.H0"}
    assert by_site["embed"][1] in (1, 2, 3) and by_site["L1.H0"][1] in (
        1,
        2,
        3,
    )  # random, same length
    child = -by_site["L0.H0"][1] - 1  # per-example `first`: one child for every needed position
    assert builder.nodes[child][1] in (1, 3) and builder.nodes[child][2] == [2]
    (embed_edge,) = builder.nodes[child][3]  # the head reads embed at positions 0..2, ...
    sources = {q: embed_edge[1] for q in (0, 1, 2)} | dict(embed_edge[2])
    for q, src in sources.items():  # ... each from an input agreeing on `tok` there
        assert (
            tokens[src][q] == tokens[builder.nodes[child][1]][q] and src != builder.nodes[child][1]
        )
    assert record[("first", None, 1)] == [2, 1]  # 2 other rows agreed, used once
    direct = Hypothesis.build({"tok": ["embed"]}, {"tok": ["tokens"]})
    builder.root(Sampling(direct, random.Random(0)), 0, [3])  # tok[3] = 4: rows 2 and 3 agree too
    with pytest.raises(ScrubError, match="no dataset input other than row 1 agrees with it on tok"):
        builder.root(Sampling(direct, random.Random(0)), 1, [3])  # tok[3] = 5: nobody else


def test_tree_is_reproducible_and_plain_data(tmp_path):
    path = write_study(tmp_path, "toy", "independent")
    _, a = api.compile_file(path)
    _, b = api.compile_file(path)
    assert a.content_hash == b.content_hash
    assert type(a).from_json(a.to_json()).content_hash == a.content_hash
    _, c = api.compile_file(path, ["experiments.0.seeds=[5]"])
    assert c.jobs[0].params["nodes"] != a.jobs[0].params["nodes"]
    assert c.jobs[0].rows == a.jobs[0].rows  # seeds resample trees, not base rows


def test_hypothesis_errors_and_warnings(tmp_path):
    arch = Arch(n_layers=2, n_heads=2, has_mlp=False)
    parents = {"a": ["tokens"], "b": ["a"], "c": ["b"]}
    backwards = Hypothesis.build({"a": ["embed"], "b": ["L1.H0"], "c": ["L0.H1"]}, parents)
    with pytest.raises(ScrubError, match=r"c \(L0.H1\) reads b, but none of b's sites"):
        check_hypothesis(backwards, arch)
    with pytest.raises(ScrubError, match="'L0.attn_out' is none of these"):
        check_hypothesis(Hypothesis.build({"a": ["L0.attn_out"]}, parents), arch)
    warn = check_hypothesis(Hypothesis.build({"a": ["embed"], "b": ["L1.H0:k"]}, parents), arch)
    assert any("not reached from the output" in w for w in warn)
    path = write_study(tmp_path, "toy", "independent")
    with pytest.raises(SpecError, match="no dataset input other than row"):
        api.compile_file(path, ["variables.side.value=tokens"])  # every row unique


def handbuilt_report(overrides: list[str]):
    tracker = InMemoryTracker()
    base = ["metric.at=13", "experiments.0.samples=32", "experiments.0.seeds=[0]"]
    result = api.run(HANDBUILT, tracker, base + overrides, cache_dir=None, runner="synchronous")
    return result.reports[0]


def test_known_mechanism_true_hypothesis_and_controls():
    rep = handbuilt_report(["experiments.0.controls.n_random=3", "experiments.0.samples=40"])
    m = rep.metrics
    assert m["scrub.loss_recovered"] >= 0.95 and m["scrub.loss_recovered.ci_low"] >= 0.95
    assert m["scrub.loss_random"] > 5 > 0.01 > m["scrub.loss_model"]
    assert m["scrub.control.random_max"] < m["scrub.loss_recovered.ci_low"]
    drops = [k for k in m if k.startswith("scrub.drop.") and "ci_" not in k]
    assert len(drops) == 6 and all(m[f"{k}.ci_high"] < 0.95 for k in drops)
    assert {"graph.png", "loss_recovered.png"} <= set(rep.figures)
    assert all(png.startswith(b"\x89PNG") for png in rep.figures.values())
    assert rep.headline["scrub.loss_recovered.ci_low"] == m["scrub.loss_recovered.ci_low"]
    assert {r["variant"] for r in rep.tables["variants.csv"]} >= {"hypothesis", "random"}
    assert rep.metrics["scrub.power.min_agreeing"] >= 10 and not rep.warnings


WRONG = {
    "no K-composition (key reads the embedding)": ["variables.ind_k.value=tok[pos]"],
    "Q-composition (query reads L0.H0)": ["variables.ind_q.value=prev[pos]"],
    "wrong previous-token head": ["correspondence.prev=[L0.H1]"],
    "attention by position only (OV only)": ["variables.copied.parents=[ind_v]"],
    "L0.H0 carries the current token": ["variables.prev.value=tok[pos]"],
}


def test_known_mechanism_wrong_hypotheses_score_clearly_lower():
    off = ["experiments.0.controls.n_random=0", "experiments.0.controls.drop_one=false"]
    true = handbuilt_report(off).metrics
    for name, change in WRONG.items():
        m = handbuilt_report(off + change).metrics
        assert m["scrub.loss_recovered.ci_high"] < true["scrub.loss_recovered.ci_low"] - 0.3, name


@pytest.mark.skipif(not INDUCTION_2L_CHECKPOINT.exists(), reason="induction_2l not trained yet")
def test_bundled_induction_hypothesis_beats_its_controls():
    heads = json.loads(INDUCTION_2L_METADATA.read_text())["heads"]
    prev, ind = (f"L{heads[r]['layer']}.H{heads[r]['head']}" for r in ("prev_token", "induction"))
    text = INDUCTION.read_text()
    assert f"prev: [{prev}]" in text and f"copied: [{ind}]" in text  # the identified heads
    small = ["experiments.0.samples=12", "experiments.0.controls.n_random=2"]
    rep = api.run(
        INDUCTION, InMemoryTracker(), small, cache_dir=None, runner="synchronous"
    ).reports[0]
    m = rep.metrics
    assert m["scrub.loss_recovered.ci_low"] > 0.9 > 0.3 > m["scrub.control.random_max"]
    assert m[f"scrub.drop.{ind}"] < 0.3 and m["scrub.loss_random"] > 5 * m["scrub.loss_model"]


def test_power_warning_and_graph_names_every_node():
    rep = handbuilt_report(
        ["experiments.0.controls.min_agreeing=1000"]
        + ["experiments.0.controls.n_random=0", "experiments.0.controls.drop_one=false"]
    )
    assert rep.metrics["scrub.power.below_threshold"] == rep.metrics["scrub.power.conditions"]
    assert any("fewer than 1000 other agreeing inputs" in w for w in rep.warnings)
    assert all(row["below_threshold"] for row in rep.tables["power.csv"])
    corr = {"tok": ["embed"], "prev": ["L0.H0"], "copied": ["L1.H0"]}
    left = causal_panel(None, corr, ["copied"])
    right = model_panel(corr, [("embed", "L0.H0", "tok"), ("L0.H0", "L1.H0", "prev")])
    for g in (left, right):
        assert all(d["label"] for _, d in g.nodes(data=True))
    assert "output" in left and "logits" in right
