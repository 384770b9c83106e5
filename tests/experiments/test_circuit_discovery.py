"""Circuit discovery: EAP scores equal finite differences of the edge-perturbed metric (float64),
EAP-IG with one step is EAP and with N steps the mean of finite differences along the input path,
circuit runs equal a hand-written split-input forward (full circuit = the clean model, empty = the
source), the faithfulness curve's ends are 1 and 0 by definition, EAP-IG and ACDC recover the known
circuits of the bundled induction model and the hand-built model, and discovered.yaml validates and
runs as written."""

from __future__ import annotations

import copy
import io
import random
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import yaml
from reference import discovery as ref

from mi_spec import api
from mi_spec.api import compile_file
from mi_spec.errors import SpecError
from mi_spec.execute.discovery_op import Discovery
from mi_spec.execute.engine import Engine
from mi_spec.execute.worker import loaded_for
from mi_spec.tracking.base import InMemoryTracker

ROOT = Path(__file__).resolve().parents[2]
TINY = """name: disc-tiny
model:
  factory: mi_spec.zoo:attn_only
  kwargs: {n_layers: 2, n_heads: 2, d_model: 16, d_head: 4, n_ctx: 16, d_vocab: 20, seed: 3}
data:
  generator: mi_spec.zoo.tasks:repeated_tokens
  params: {n: 12, seq_len: 9, seed: 3, d_vocab: 20}
  positions: {repeat: {start: 5, stop: 8}}
metric: {kind: loss, at: repeat}
max_batch_rows: 8
experiments:
"""
REPEAT = [5, 6, 7]
KNOWN = ["embed->L0.H2:v", "L0.H2->L1.H1:k", "embed->L1.H1:q", "embed->L1.H1:v", "L1.H1->logits"]
HANDBUILT_KNOWN = [e.replace("H2", "H0").replace("H1", "H0") for e in KNOWN]


def _tiny(tmp_path: Path, *experiments: str) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY + "".join(f"  - {e}\n" for e in experiments))
    return path


def _run64(tmp_path: Path, experiment: str):
    """The job's Discovery state on a float64 copy of the model, and the model."""
    study, plan = compile_file(_tiny(tmp_path, experiment))
    data = loaded_for(plan, model=study.model).data
    m64 = copy.deepcopy(study.model.module).double()
    engine = Engine(m64, torch.tensor(data.padded([0])[0]))
    job = plan.jobs[0]
    run = Discovery.start(job, plan, engine, data)
    base = torch.tensor(data.padded(list(job.rows))[0])
    source = torch.tensor(data.padded(list(job.source_rows))[0])
    edges = [tuple(e.split("->")) for e in job.params["items"]]
    return run, m64, base, source, edges


def test_eap_equals_finite_differences_float64(tmp_path):
    """Gradients are real: every edge's EAP score (per row) = the central finite difference of
    the loss when only that receiver's read of the stream moves along the sender's change."""
    run, m64, base, source, edges = _run64(tmp_path, "{kind: circuit_discovery, method: eap}")
    got = run.scores(1).numpy()
    assert len(edges) == 29 and got.shape == (29, len(base))
    want = np.stack(
        [ref.edge_finite_difference(m64, base, source, e, REPEAT).numpy() for e in edges]
    )
    scale = np.abs(want).max()
    assert scale > 1e-3 and (np.abs(want).max(1) > 1e-9).sum() >= 0.8 * len(edges)
    assert np.abs(got - want).max() <= 1e-6 * scale


def test_eap_ig_one_step_is_eap_and_n_steps_follow_the_input_path(tmp_path):
    run, m64, base, source, edges = _run64(tmp_path, "{kind: circuit_discovery, method: eap_ig}")
    eap, ig1 = run.scores(1), run.scores(1)
    assert torch.equal(eap, ig1)
    got = run.scores(3).numpy()
    picked = [0, 5, 13, 20, len(edges) - 1]
    want = [
        np.mean(
            [ref.edge_finite_difference(m64, base, source, edges[i], REPEAT, alpha=k / 3).numpy()
             for k in range(3)], axis=0,
        )
        for i in picked
    ]  # fmt: skip
    scale = np.abs(np.asarray(want)).max()
    assert scale > 1e-3
    assert np.abs(got[picked] - np.asarray(want)).max() <= 1e-6 * scale
    assert np.abs(got - eap.numpy()).max() > 1e-4 * scale  # the path matters


def test_circuit_runs_equal_split_input_reference(tmp_path):
    """Real runs with every edge outside the circuit ablated equal a hand-written forward where
    each receiver reads its own copy of the stream; the full circuit is the clean model exactly
    and the empty one the source run."""
    run, m64, base, source, edges = _run64(tmp_path, "{kind: circuit_discovery, method: eap}")
    rng = random.Random(0)
    keeps = torch.zeros(6, len(edges), dtype=torch.bool)
    keeps[0] = True  # full circuit
    for g in range(2, 6):
        keeps[g, rng.sample(range(len(edges)), rng.randrange(1, len(edges)))] = True
    got = run.metric_of(keeps).numpy()
    for g in range(6):
        circuit = {edges[e] for e in keeps[g].nonzero().flatten().tolist()}
        want = ref.circuit_metric(m64, base, source, circuit, edges, REPEAT).numpy()
        np.testing.assert_allclose(got[g], want, rtol=1e-9, atol=1e-9)
    assert np.array_equal(got[0], run.clean.numpy())
    np.testing.assert_allclose(got[1], run.source.numpy(), rtol=1e-9)


def test_faithfulness_curve_ends_cpr_cmd_and_report(tmp_path):
    path = _tiny(
        tmp_path, "{kind: circuit_discovery, name: eap, method: eap, minimality: 4, "
        "reference_edges: ['L0.H1->L1.H0:k', 'L1.H0->logits']}",
    )  # fmt: skip
    run = api.run(path, InMemoryTracker(), cache_dir=None, runner="synchronous")
    rep = run.reports[0]
    curve = rep.tables["faithfulness.csv"]
    assert curve[0]["n_edges"] == 0 and curve[0]["faithfulness"] == 0.0
    assert curve[-1]["n_edges"] == 29 and curve[-1]["faithfulness"] == 1.0
    m = rep.metrics
    for key in ("discovery.cpr", "discovery.cmd", "discovery.faithfulness"):
        assert m[f"{key}.ci_low"] <= m[key] + 1e-12 <= m[f"{key}.ci_high"] + 2e-12, key
        assert key in rep.headline
    assert m["discovery.cpr"] + m["discovery.cmd"] >= 1 - 1e-9  # equal when f <= 1 everywhere
    assert "discovery.n_edges" in rep.headline and 0 <= m["discovery.n_edges"] <= 29
    assert {"discovery.precision", "discovery.recall"} <= set(m)
    assert len(rep.tables["edges.csv"]) == 29
    for name in ("circuit.png", "faithfulness.png", "edge_scores.png"):
        image = matplotlib.image.imread(io.BytesIO(rep.figures[name]), format="png")
        assert image.shape[0] > 300 and image.std() > 0.01, name
    assert b"correspondence" in rep.files["discovered.yaml"]


def test_compile_errors_and_plan_counts(tmp_path):
    path = _tiny(tmp_path, "{kind: circuit_discovery, method: acdc, split_qkv: false}")
    _, plan = compile_file(path)
    job = plan.jobs[0]
    assert len(job.params["edges"]) == 2 + 3 * 2 + 5  # embed->L0, embed+L0->L1, all->logits
    assert job.forward_passes(plan.max_batch_rows) > len(
        job.params["edges"]
    )  # ACDC: a pass per edge
    bad = path.read_text().replace("kind: loss", "kind: accuracy").replace("acdc", "eap")
    path.write_text(bad)
    with pytest.raises(SpecError, match="differentiable metric"):
        compile_file(path)
    path.write_text(TINY + "  - {kind: circuit_discovery, reference_edges: ['L1.H0->L0.H1:q']}\n")
    with pytest.raises(SpecError, match="not edges of this graph"):
        compile_file(path)


@pytest.mark.parametrize("method", ["eap_ig", "acdc"])
def test_recovers_the_known_induction_circuit(tmp_path, method):
    """On the bundled induction model (mean ablation), EAP-IG and ACDC find exactly the known
    circuit: embed -> L0.H2:v, L0.H2 -> L1.H1:k, embed -> L1.H1:q/v, L1.H1 -> logits."""
    text = (ROOT / "hypotheses" / "induction_discovery.yaml").read_text()
    path = tmp_path / "ind.yaml"
    path.write_text(text.replace("n: 2000, seq_len: 21", "n: 64, seq_len: 21"))
    spec = yaml.safe_load(path.read_text())
    spec["experiments"] = [spec["experiments"][0 if method == "eap_ig" else 1]]
    path.write_text(yaml.safe_dump(spec))
    overrides = ["experiments.0.samples=16"]
    run = api.run(path, InMemoryTracker(), overrides, cache_dir=None, runner="synchronous")
    rep = run.reports[0]
    print(
        f"{method}: precision {rep.metrics['discovery.precision']:.2f} recall "
        f"{rep.metrics['discovery.recall']:.2f} CPR {rep.metrics['discovery.cpr']:.3f} "
        f"CMD {rep.metrics['discovery.cmd']:.3f} edges {rep.metrics['discovery.n_edges']:.0f}"
    )
    assert rep.metrics["discovery.precision"] == rep.metrics["discovery.recall"] == 1.0
    assert rep.metrics["discovery.faithfulness"] >= 0.9
    circuit = {r["edge"] for r in rep.tables["edges.csv"] if r["in_circuit"]}
    assert circuit == set(KNOWN)


def _handbuilt(tmp_path: Path, method: str) -> Path:
    path = tmp_path / "hb.yaml"
    path.write_text(f"""name: handbuilt-discovery
model: {{factory: mi_spec.zoo.handbuilt:induction_handbuilt, kwargs: {{d_vocab: 12, n_ctx: 16}}}}
data:
  generator: mi_spec.zoo.tasks:repeated_tokens
  params: {{n: 400, seq_len: 15, seed: 1, d_vocab: 12}}
  positions: {{repeat: {{start: 8, stop: 14}}}}
metric: {{kind: loss, at: repeat}}
max_batch_rows: 512
experiments:
  - {{kind: circuit_discovery, method: {method}, ablation: mean, samples: 16,
      reference_edges: {HANDBUILT_KNOWN}}}
""")
    return path


@pytest.mark.parametrize("method", ["eap_ig", "acdc"])
def test_recovers_the_handbuilt_circuit_and_writes_a_runnable_hypothesis(tmp_path, method):
    path = _handbuilt(tmp_path, method)
    run = api.run(path, InMemoryTracker(), cache_dir=None, runner="synchronous")
    rep = run.reports[0]
    print(f"handbuilt {method}: precision {rep.metrics['discovery.precision']:.2f} "
          f"recall {rep.metrics['discovery.recall']:.2f}")  # fmt: skip
    assert rep.metrics["discovery.precision"] == rep.metrics["discovery.recall"] == 1.0
    out = tmp_path / "discovered.yaml"
    out.write_bytes(rep.files["discovered.yaml"])
    written = yaml.safe_load(out.read_text())
    assert list(written["correspondence"]) == [
        "tok", "L0_H0_v", "L0_H0", "L1_H0_q", "L1_H0_k", "L1_H0_v", "L1_H0"
    ]  # fmt: skip
    assert written["variables"]["L1_H0_k"]["value"] == "L0_H0[pos]"
    kinds = [e["kind"] for e in written["experiments"]]
    assert kinds[0] == "causal_scrubbing" and "path_patching" in kinds
    few = ["experiments.0.samples=2", "experiments.0.controls.n_random=1"]  # scrubbing's cost
    if method == "eap_ig":
        api.validate(out, few)  # validates as written (fewer scrubbed rows)
    else:  # and runs as written
        done = api.run(out, InMemoryTracker(), few, cache_dir=None, runner="synchronous")
        assert [r.kind for r in done.reports][0] == "causal_scrubbing"


def test_gpt2_layer_norms_mlps_and_the_attribution_op(study_file):
    """GPT-2 (a layer norm before q/k/v, the MLP and the unembedding; MLP senders and receivers):
    each receiver's read is found and checked, the full circuit is the clean model and the empty
    one the source run, and EAP equals the (finite-difference checked) edge attribution op
    summed over sender positions."""
    path = study_file(
        "experiments:\n"
        "  - {kind: circuit_discovery, name: d, method: eap}\n"
        "  - {kind: attribution_patching, name: a, level: edge, senders: [embed, L0.H1, "
        "L0.mlp_out], receivers: ['L1.H2:k', L1.mlp_in, logits], positions: [all]}\n"
    )
    study, plan = compile_file(path)
    state = loaded_for(plan, model=study.model)
    job = plan.jobs_for("d")[0]
    run = Discovery.start(job, plan, state.engine, state.data)
    # embed -> L0 (q/k/v x 4 + mlp_in), L0 heads -> L0.mlp_in, embed + L0 -> L1, L1 heads ->
    # L1.mlp_in, everything -> logits
    assert len(job.params["edges"]) == 13 + 4 + 13 + 5 * 13 + 4 + 11
    eap = run.scores(1)
    full_empty = torch.ones(2, eap.shape[0], dtype=torch.bool)
    full_empty[1] = False
    got = run.metric_of(full_empty)
    assert torch.equal(got[0], run.clean)
    np.testing.assert_allclose(got[1], run.source, rtol=1e-5, atol=1e-5)
    from mi_spec.execute.attribution_op import run_attribution

    attrib = plan.jobs_for("a")[0]
    est = np.asarray(run_attribution(attrib, plan, state.engine, state.data).extra["estimates"])
    summed: dict[str, np.ndarray] = {}
    for (sender, _pos, receiver), row in zip(attrib.params["items"], est, strict=True):
        summed[f"{sender}->{receiver}"] = summed.get(f"{sender}->{receiver}", 0) + row
    index = {label: i for i, label in enumerate(job.params["items"])}
    assert len(summed) == 9
    for label, want in summed.items():
        np.testing.assert_allclose(eap[index[label]].numpy(), want, rtol=1e-3, atol=1e-5)


def test_emit_writes_beside_the_input_and_keeps_an_edited_copy(tmp_path):
    """``--emit``: one file per discovery experiment beside the hypothesis; a copy the researcher
    has edited is never overwritten (the new circuit goes to ``.new.yaml``)."""
    from mi_spec.analysis.report import ExperimentReport
    from mi_spec.experiments.discovered_yaml import emit_beside

    source = tmp_path / "study.yaml"
    found = ExperimentReport("eap-ig@study", "circuit_discovery", files={"discovered.yaml": b"a"})
    other = ExperimentReport("patch@study", "activation_patching")
    assert emit_beside(source, [found, other]) == [f"wrote {tmp_path}/study.eap-ig.discovered.yaml"]
    assert emit_beside(source, [found]) == [f"wrote {tmp_path}/study.eap-ig.discovered.yaml"]
    (tmp_path / "study.eap-ig.discovered.yaml").write_text("named by hand")
    lines = emit_beside(source, [found])
    assert lines[0].startswith("kept ") and lines[1].endswith("study.eap-ig.discovered.new.yaml")
    assert (tmp_path / "study.eap-ig.discovered.yaml").read_text() == "named by hand"
    assert (tmp_path / "study.eap-ig.discovered.new.yaml").read_bytes() == b"a"


def test_run_emit_writes_the_discovered_file_that_validates(tmp_path, tracking_uri, capsys):
    """``mi-spec run FILE --emit``: the chosen circuit lands beside FILE and validates as written."""
    from mi_spec.cli.main import main

    path = _tiny(tmp_path, "{kind: circuit_discovery, name: found, method: eap, samples: 8}")
    args = ["run", str(path), "--emit", "--no-cache", "--runner", "synchronous"]
    args += ["--set", "data.params.n=400"]  # rows enough for the emitted scrubbing to agree
    assert main(args) == 0
    out = tmp_path / "tiny.found.discovered.yaml"
    assert f"wrote {out}" in capsys.readouterr().out
    written = yaml.safe_load(out.read_text())
    assert written["experiments"][0]["kind"] == "causal_scrubbing"
    api.validate(out, ["experiments.0.samples=2"])
