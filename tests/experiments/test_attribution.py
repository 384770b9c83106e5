"""Attribution patching: gradients are real (estimates = central finite differences in float64,
node and edge level), the op equals an independent hook + autograd reference, the estimates rank
the induction model's heads × positions like exhaustive activation patching does, verification
re-runs real (path) patching of the top-ranked items, and the end-to-end report."""

from __future__ import annotations

import copy
import functools
import io
import json
import random
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from reference import attribution as ref
from reference.models import TINY_MODELS
from reference.subspaces import SUBSPACES, change, space_of, subspace_maps, write_subspaces

from mi_spec import api
from mi_spec.analysis.figures import scatter_png
from mi_spec.analysis.stats import bootstrap_correlation_ci, ranks, spearman
from mi_spec.api import compile_file
from mi_spec.errors import ExecutionError, SpecError
from mi_spec.execute.attribution_op import choose, run_attribution
from mi_spec.execute.engine import Engine
from mi_spec.execute.worker import loaded_for
from mi_spec.tracking.base import InMemoryTracker

ROOT = Path(__file__).resolve().parents[2]
MODELS = TINY_MODELS
NODES = {
    "gpt2": ["L0.H1", "L1.H3:q", "L0.H2:k", "L1.H0:v", "embed", "L1.resid_pre", "L0.mlp_out",
             "L1.mlp_in", "L0.resid_mid", "L1.resid_post[sae:*]", "L0.H1[hd]"],
    "toy": ["L0.H1", "L1.H3:q", "L0.H2:k", "L1.H0:v", "embed", "L1.resid_pre", "L0.attn_out",
            "L1.resid_pre[dirs]", "L1.resid_post[sae]"],
}  # fmt: skip
SENDERS = {"gpt2": ["L0.H1", "embed", "L0.mlp_out", "L0.attn_out"], "toy": ["L0.H1", "embed"]}
RECEIVERS = {
    "gpt2": ["L1.H3:q", "L1.H2:k", "L1.H0:v", "logits", "L*.mlp_in"],
    "toy": ["L1.H3:q", "L1.H2:k", "L1.H0:v", "logits"],
}
POS = {"mid": [3], "early": [1, 2], 7: [7]}  # rows of 10 tokens; the metric scores 7 and 8


def _tiny(tmp_path: Path, model: str, metric: str = "loss", top_k: int = 3) -> Path:
    rng = random.Random(1)
    with open(tmp_path / "rows.jsonl", "w") as f:
        for _ in range(12):
            row = {"tokens": [rng.randrange(40) for _ in range(10)], "tgt": rng.randrange(40)}
            f.write(json.dumps(row | {"wrong": rng.randrange(40)}) + "\n")
    metric_line = {
        "loss": "{kind: loss, at: tail}",
        "logit_diff": "{kind: logit_diff, at: tail, target: tgt, wrong: wrong}",
    }[metric]
    write_subspaces(tmp_path)
    path = tmp_path / "h.yaml"
    path.write_text(f"""{SUBSPACES}
name: attrib-{model}
model:
  {MODELS[model]}
data:
  path: rows.jsonl
  positions: {{mid: 3, early: {{start: 1, stop: 3}}, tail: {{start: -3, stop: -1}}}}
metric: {metric_line}
max_batch_rows: 8
experiments:
  - {{kind: attribution_patching, name: nodes, sites: {json.dumps(NODES[model])},
      positions: [mid, early, 7], verify: {{top_k: {top_k}}}}}
  - {{kind: attribution_patching, name: edges, level: edge, senders: {json.dumps(SENDERS[model])},
      receivers: {json.dumps(RECEIVERS[model])}, positions: [mid, early, 7],
      verify: {{top_k: {top_k}}}}}
""")
    return path


def _reference(model, plan, data, job, metric_kind: str, fd: bool, spaces=None):
    """Per item, the reference estimate (and the central finite difference) per row."""
    rows, srcs = list(job.rows), list(job.source_rows)
    base = tuple(torch.tensor(x) for x in data.padded(rows))
    source = tuple(torch.tensor(x) for x in data.padded(srcs))
    tail = [[7, 8]] * len(rows)
    if metric_kind == "loss":
        targets, wrong = [[data.tokens[r][p + 1] for p in ps] for r, ps in zip(rows, tail)], None  # noqa: B905
    else:
        targets = [[data.columns["tgt"][r]] * 2 for r in rows]
        wrong = [[data.columns["wrong"][r]] * 2 for r in rows]

    def metric(logits):
        return ref.metric_rows(metric_kind, logits, tail, targets, wrong)

    modules = dict(model.named_modules())
    out = []
    for item in job.params["items"]:
        site, pos = plan.sites[item[0]], [POS[item[1]]] * len(rows)
        if len(item) == 2:
            args = (model, base, source, site, pos, pos, metric)
            if site.subspace is not None:  # the change is what writing the coordinates does
                args += (functools.partial(change, space_of(spaces, site)),)
            est = ref.node_estimates(*args)
            diff = ref.node_finite_difference(*args) if fd else None
        else:
            proj = modules[site.module] if item[0] in job.params["through"] else None
            point = plan.sites[job.params["points"][item[2]]]
            args = (model, base, source, site, proj, point, plan.sites[item[2]], pos, metric)
            est = ref.edge_estimates(*args)
            diff = ref.edge_finite_difference(*args) if fd else None
        out.append((est, diff))
    return out


@pytest.mark.parametrize(("model", "metric"), [("gpt2", "loss"), ("toy", "logit_diff")])
def test_estimates_equal_finite_differences_in_float64(tmp_path, model, metric):
    """Gradients are real: node and edge estimates = central finite differences (and the
    reference's autograd), float64, for head z / q / k / v, embed, resid, attn_out, mlp sites and
    subspace sites (a basis, SAE features one by one and together)."""
    study, plan = compile_file(_tiny(tmp_path, model, metric, top_k=1))
    data = loaded_for(plan, model=study.model).data
    m64 = copy.deepcopy(study.model.module).double()
    engine = Engine(m64, torch.tensor(data.padded([0])[0]))
    for job in plan.jobs:
        got = np.asarray(run_attribution(job, plan, engine, data).extra["estimates"])
        want = _reference(m64, plan, data, job, metric, fd=True, spaces=subspace_maps())
        est = np.asarray([w[0] for w in want])
        diff = np.asarray([w[1] for w in want])
        scale = np.abs(diff).max()
        assert scale > 1e-3 and (np.abs(diff).max(1) > 1e-9).sum() >= 0.6 * len(diff)
        assert np.abs(got - diff).max() <= 1e-6 * scale, job.experiment
        # subspaces come from float32 files (orthonormalised in float32): agree to float32 digits
        sub = np.asarray(["[" in item[0] for item in job.params["items"]])
        assert np.abs(got - est)[~sub].max() <= 1e-12 * scale, job.experiment
        assert np.abs(got - est)[sub].max(initial=0) <= 1e-7 * scale, job.experiment


@pytest.mark.parametrize("model", ["gpt2", "toy"])
def test_op_equals_hook_reference_float32(tmp_path, model):
    """The op (nnsight, one forward + backward) equals plain hooks + torch.autograd to 1e-5."""
    study, plan = compile_file(_tiny(tmp_path, model))
    state = loaded_for(plan, model=study.model)
    for job in plan.jobs:
        got = np.asarray(run_attribution(job, plan, state.engine, state.data).extra["estimates"])
        want = np.asarray([w[0] for w in _reference(study.model.module, plan, state.data, job,
                                                    "loss", fd=False, spaces=subspace_maps())])  # fmt: skip
        assert np.abs(got).max() > 1e-3
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_verification_is_real_patching_of_the_top_k(tmp_path):
    """Verification re-runs the top_k by |mean estimate| (+ the bottom control) and its truths
    equal separate activation patching / path patching runs on the same rows and sources."""
    path = _tiny(tmp_path, "gpt2", top_k=4)
    text = path.read_text().replace("verify: {top_k: 4}}", "verify: {top_k: 4, include_bottom: 2}}")
    text += """  - {kind: activation_patching, name: ap, sites: %s, positions: [mid, early, 7]}
  - {kind: path_patching, name: pp, senders: %s, receivers: %s, positions: [mid, early, 7]}
""" % tuple(json.dumps(x) for x in (NODES["gpt2"], SENDERS["gpt2"], RECEIVERS["gpt2"]))  # noqa: UP031
    path.write_text(text)
    run = api.run(path, InMemoryTracker(), cache_dir=None, runner="synchronous")
    reports = {r.name.split("@")[0]: r for r in run.reports}
    for level, other, table in (("nodes", "ap", "effects.csv"), ("edges", "pp", "paths.csv")):
        job = run.plan.jobs_for(level)[0]
        result = _result_of(run, job)
        est = np.asarray(result.extra["estimates"]).mean(1)
        chosen = result.extra["verified"]
        order = np.argsort(-np.abs(est), kind="stable")
        assert chosen[:4] == order[:4].tolist() and chosen[4:] == order[-2:].tolist()
        assert choose(torch.tensor(est), 4, 2) == chosen
        truth = {r["label"]: r["true_effect"] for r in reports[level].tables["verification.csv"]}
        assert len(truth) == 6
        for row in reports[other].tables[table]:
            label = (
                row.get("label") or f"{row['sender']}@{row['sender_position']}->{row['receiver']}"
            )
            if label in truth:
                assert truth.pop(label) == pytest.approx(row["effect"], abs=1e-5), label
        assert not truth  # every verified item was found in the separate run


def _result_of(run, job):
    """Re-run ``job`` in process (results are not kept on RunResult)."""
    state = loaded_for(run.plan)
    return run_attribution(job, run.plan, state.engine, state.data)


def test_induction_heads_rank_like_exhaustive_patching(tmp_path):
    """The validation: every head × position (8 heads × 41 positions) of the induction model,
    attribution vs exhaustive activation patching of the same sites on the same rows and
    sources. Spearman of |effect| >= 0.8; saturation (the induction head's loss effect is ~50x
    its linear estimate) is flagged by the verification step."""
    body = """name: induction-attribution-validation
model: {factory: mi_spec.zoo:induction_2l}
data:
  generator: mi_spec.zoo.tasks:repeated_tokens
  params: {n: 256, seq_len: 41, seed: 1}
  positions: {repeat: {start: 21, stop: 40}, first: {start: 1, stop: 20}}
metric: {kind: loss, at: repeat}
experiments:
  - {kind: attribution_patching, name: attrib, sites: ["L*.H*"], positions: [all], samples: 32,
     verify: {top_k: 12, include_bottom: 4}}
  - {kind: activation_patching, name: exhaustive, sites: ["L*.H*"], positions: %s,
     samples: 32, batch_size: 32}
""" % json.dumps(list(range(41)))  # noqa: UP031
    (tmp_path / "v.yaml").write_text(body)
    run = api.run(tmp_path / "v.yaml", InMemoryTracker(), cache_dir=None, runner="synchronous")
    attrib, exhaustive = run.reports
    est = {r["label"]: r["estimate"] for r in attrib.tables["estimates.csv"]}
    true = {r["label"]: r["effect"] for r in exhaustive.tables["effects.csv"]}
    assert sorted(est) == sorted(true) and len(est) == 8 * 41
    labels = sorted(est)
    e, t = np.array([[est[k]] for k in labels]), np.array([[true[k]] for k in labels])
    rho = bootstrap_correlation_ci(e, t, magnitude=True, zero_tol=1e-6, n_boot=1)[0]
    signed = bootstrap_correlation_ci(e, t, zero_tol=1e-6, n_boot=1)[0]
    print(f"induction heads x 41 positions: Spearman |effect| {rho:.3f}, signed {signed:.3f}")
    assert rho >= 0.8
    # the two live heads' sites are the top estimates, as they are the top true effects
    top_e = {k.split("@")[0] for k in sorted(est, key=lambda k: -abs(est[k]))[:30]}
    top_t = {k.split("@")[0] for k in sorted(true, key=lambda k: -abs(true[k]))[:30]}
    assert top_e == top_t == {"L0.H2", "L1.H1"}
    # saturation: the induction head's true effect dwarfs its estimate, and the report says so
    rows = {r["label"]: r for r in attrib.tables["verification.csv"]}
    live = [r for r in rows.values() if r["label"].startswith("L1.H1@")]
    assert live and all(r["true_effect"] > 10 * r["estimate"] > 0 for r in live)
    assert any("saturation" in w and "L1.H1@" in w for w in attrib.warnings)


def test_hypothesis_file_end_to_end(tmp_path):
    """hypotheses/induction_attribution.yaml: metrics, tables and non-empty figures."""
    run = api.run(
        ROOT / "hypotheses" / "induction_attribution.yaml",
        InMemoryTracker(),
        cache_dir=None,
        runner="synchronous",
    )
    assert [r.kind for r in run.reports] == ["attribution_patching"] * len(run.reports) != []
    for rep in run.reports:
        m = rep.metrics
        for key in ("attrib.spearman", "attrib.spearman.ci_low", "attrib.spearman.ci_high",
                    "attrib.spearman_signed", "attrib.pearson", "attrib.top_k", "attrib.n_sites",
                    "attrib.top1_agrees", "attrib.metric.clean", "attrib.metric.source"):  # fmt: skip
            assert key in m, (rep.name, key)
        assert m["attrib.metric.source"] > 5 > 1 > m["attrib.metric.clean"]
        assert m["attrib.spearman.ci_low"] <= m["attrib.spearman"] + 1e-9
        assert m["attrib.spearman"] >= 0.8, rep.name
        assert "attrib.spearman" in rep.headline
        verified = [k for k in m if k.startswith("attrib.verified.") and "ci_" not in k]
        estimated = [k for k in m if k.startswith("attrib.estimate.") and "ci_" not in k]
        assert len(verified) == len(estimated) == rep.params["n_verified"] > m["attrib.top_k"]
        assert rep.params["top_site_estimate"] and rep.params["top_site_verified"]
        assert len(rep.tables["estimates.csv"]) == m["attrib.n_sites"]
        assert len(rep.tables["verification.csv"]) == rep.params["n_verified"]
        for name in ("attribution_vs_patching.png", "attribution_heatmap.png"):
            image = matplotlib.image.imread(io.BytesIO(rep.figures[name]), format="png")
            assert image.shape[0] > 300 and image.std() > 0.01, name
    edges = [r for r in run.reports if r.params["level"] == "edge"]
    assert edges and edges[0].params["top_site_verified"].startswith("L0.H2@")


def test_metric_without_useful_gradient_is_a_compile_error(tmp_path):
    for kind in ("accuracy", "kl"):
        path = _tiny(tmp_path, "toy")
        path.write_text(
            path.read_text().replace("{kind: loss, at: tail}", f"{{kind: {kind}, at: tail}}")
        )
        with pytest.raises(SpecError, match=f"differentiable metric.*{kind}"):
            compile_file(path)


def test_spec_errors_and_top_k_clamp(tmp_path):
    path = _tiny(tmp_path, "toy", top_k=500)
    text = path.read_text()
    run = api.run(path, InMemoryTracker(), cache_dir=None, runner="synchronous")
    nodes = run.reports[0]
    n = len(NODES["toy"]) * 3
    assert nodes.metrics["attrib.top_k"] == nodes.metrics["attrib.n_sites"] == n
    assert any("top_k 500" in w and "clamped" in w for w in nodes.warnings)
    bad = text.replace("level: edge,", "level: edge, sites: [L0.H1],").replace(
        "name: nodes,", "name: nodes, senders: [embed],"
    )
    path.write_text(bad + "  - {kind: attribution_patching, name: e2, level: edge}\n")
    with pytest.raises(SpecError) as err:
        compile_file(path)
    msg = str(err.value)
    assert "sites is for level: node" in msg and "senders/receivers are for level: edge" in msg
    assert "level: edge needs senders and receivers" in msg


def test_edge_level_checks_the_residual_identity(tmp_path):
    """A component left out of the residual sum breaks the identity: a clear error, not a number."""
    study, plan = compile_file(_tiny(tmp_path, "gpt2"))
    state = loaded_for(plan, model=study.model)
    job = plan.jobs_for("edges")[0]
    before = {r: [c for c in cs if c != "L0.attn_out"] for r, cs in job.params["before"].items()}
    broken = job.model_copy(update={"params": {**job.params, "before": before}})
    with pytest.raises(ExecutionError, match="residual identity .* does not hold"):
        run_attribution(broken, plan, state.engine, state.data)


def test_spearman_ranks_and_scatter():
    x = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    assert ranks(x).tolist() == [4.0, 1.0, 2.5, 2.5, 5.0]
    rng = np.random.default_rng(0)
    a = rng.normal(size=30)
    b = a + rng.normal(size=30)
    stats = pytest.importorskip("scipy.stats")
    assert float(spearman(a, b)) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    per_example = a[:, None] + rng.normal(size=(30, 40))
    est, low, high = bootstrap_correlation_ci(per_example, per_example + 0.1, n_boot=200)
    assert est == pytest.approx(1.0) and low <= high
    png = scatter_png([0.1, 0.5, -0.2], [0.2, 2.0, 0.1], ["a", "b", "c"], "t", "x", "y", [1])
    assert png.startswith(b"\x89PNG") and len(png) > 5000
