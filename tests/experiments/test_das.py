"""DAS: the interchange equals a plain-PyTorch reference, rotation invariants (orthogonal, fp32,
parametrized once per step, full rank = vanilla patch, source = base is a no-op), compiled pairs
and labels, and the hierarchical-equality validation: true variables vs a wrong one vs controls."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from reference.das import interchange_logits

from mi_spec import api
from mi_spec.api import compile_file
from mi_spec.cli.main import main
from mi_spec.errors import SpecError
from mi_spec.execute import das_op
from mi_spec.execute.engine import Read, Write
from mi_spec.execute.worker import loaded_for
from mi_spec.tracking.base import InMemoryTracker

ROOT = Path(__file__).resolve().parents[2]
TOY = (
    "factory: mi_spec.zoo:attn_only\n  kwargs: {n_layers: 2, n_heads: 4, d_model: 32, d_head: 8, "
    "n_ctx: 32, d_vocab: 40}"
)
GPT2 = (
    "hf_config: {model_type: gpt2, n_layer: 2, n_embd: 32, n_head: 4, vocab_size: 40, "
    "n_positions: 32}"
)
RANDOM_ROWS = """variables:
  x: {value: "tokens[2]"}
  y: {value: "x %% 7"}
experiments:
  - {kind: das, variables: x, output: y, site: "%s", intervention: %s, dim: %s,
     pairs: {train: 8, val: 0, test: 12}, training: {epochs: 0}}
"""
EQUALITY = """name: eq
model: {factory: "mi_spec.zoo.equality:%s", dtype: %s}
data:
  generator: mi_spec.zoo.equality:hierarchical_equality
  params: {n: 1500, seed: 1}
metric: {kind: accuracy, at: last, target: label}
variables:
  WX: {value: "a == b"}
  YZ: {value: "c == d"}
  O:  {value: "WX == YZ"}
  W:  {column: a}
  O_first: {value: "(W == b) == YZ"}
experiments:
"""


def _equality(tmp_path, experiments: str, model: str = "equality_mlp", dtype: str = "float32"):
    path = tmp_path / "eq.yaml"
    text = EQUALITY % (model, dtype) + experiments
    if model == "equality_handbuilt":  # 20 entities: far apart, so its thresholds are not steep
        text = text.replace("seed: 1}", "seed: 1, n_entities: 20}").replace(
            '", dtype', '", kwargs: {n_entities: 20}, dtype'
        )
    path.write_text(text)
    return path


def _run(path):
    return api.run(path, InMemoryTracker(), cache_dir=None, runner="synchronous")


def _setup(path):
    """The first DAS job, its captured values, a random Interchange, its test split, a Runner."""
    study, plan = compile_file(path)
    state = loaded_for(plan, model=study.model)
    job = plan.jobs[0]
    p = job.params
    site = plan.sites[p["site"]]
    keep = set(p["train"]["base"])
    cap = das_op._capture(job, plan, state.engine, state.data, site, p["position"], keep)
    width = cap.values.shape[-1]
    inter = das_op.Interchange(width, 1, p["dim"] or width, p["intervention"], seed=3)
    index = {r: i for i, r in enumerate(job.rows)}
    split = das_op.Split.of(p["test"], index)
    runner = das_op.Runner(state.engine, site, state.data)
    return SimpleNamespace(study=study, plan=plan, job=job, state=state, site=site, cap=cap,
                           inter=inter, split=split, runner=runner, index=index)  # fmt: skip


def _intervened(t, split, full=None) -> torch.Tensor:
    cap, inter = t.cap, t.inter
    hs = [cap.values[split.src[v]] for v in range(inter.n_vars)]
    values = inter.apply(inter.matrix(), inter.masks(None), cap.values[split.base], hs, split.on)
    with torch.no_grad():
        return t.runner.forward(split.rows, cap.pos[split.base], values, full)


def _rows(t, idx: torch.Tensor) -> list[int]:
    return [t.job.rows[i] for i in idx.tolist()]


CASES = [
    ("toy", TOY, "L1.resid_pre@4", "low_rank", 3),
    ("toy", TOY, "L0.H1:v@4", "low_rank", 2),
    ("toy", TOY, "L1.resid_post@last", "boundless", "null"),
    ("gpt2", GPT2, "L1.resid_mid@4", "low_rank", 5),
]


@pytest.mark.parametrize(
    ("arch", "model", "site", "kind", "dim"), CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES]
)
def test_interchange_equals_reference(study_file, arch, model, site, kind, dim):
    t = _setup(study_file(RANDOM_ROWS % (site, kind, dim), model=model))
    got = _intervened(t, t.split)
    data, split, cap = t.state.data, t.split, t.cap
    base = tuple(torch.tensor(x) for x in data.padded(split.rows))
    src = tuple(torch.tensor(x) for x in data.padded(_rows(t, split.src[0])))
    positions = (cap.pos[split.base].tolist(), [cap.pos[split.src[0]].tolist()])
    want = interchange_logits(
        t.study.model.module, t.site, base, [src], positions, t.inter.matrix().detach(),
        t.inter.k, split.on.tolist(), t.inter.masks(None).tolist(),
    )  # fmt: skip
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_skip_mode_equals_whole_model(study_file):
    """Skipping the modules below the site (cached outputs) gives the same logits as running it."""
    t = _setup(study_file(RANDOM_ROWS % ("L1.resid_post@4", "low_rank", 2), model=TOY))
    train, cap = das_op.Split.of(t.job.params["train"], t.index), t.cap
    full = cap.full[torch.tensor([cap.full_of[r] for r in train.rows])]
    b = train.base
    assert t.runner.try_skip(train.rows, cap.pos[b], cap.values[b], full)
    assert [p for p, _ in t.runner.prefix] == ["embed", "pos_embed", "blocks.0"]
    assert torch.allclose(_intervened(t, train, full), _intervened(t, train), atol=1e-5)


@pytest.mark.parametrize("model", [TOY, GPT2], ids=["toy", "gpt2"])
def test_full_rank_is_vanilla_patch_and_source_base_is_noop(study_file, model):
    site = "L1.resid_pre@4" if model == TOY else "L1.resid_mid@4"
    t = _setup(study_file(RANDOM_ROWS % (site, "full", "null"), model=model))
    engine, data, split, cap = t.state.engine, t.state.data, t.split, t.cap
    s_ids, s_mask = (torch.tensor(x) for x in data.padded(_rows(t, split.src[0])))
    _, read = engine.run(s_ids, s_mask, [Read("v", t.site, cap.pos[split.src[0]])])
    ids, mask = (torch.tensor(x) for x in data.padded(split.rows))
    write = Write(t.site, slice(None), cap.pos[split.base], read["v"])
    vanilla, _ = engine.run(ids, mask, writes=[write])
    assert torch.allclose(_intervened(t, split), vanilla, atol=1e-5)
    same = das_op.Split(split.base, split.base[None], split.on, split.labels, split.rows)
    clean, _ = engine.run(ids, mask)
    assert torch.allclose(_intervened(t, same), clean, atol=1e-5)


@pytest.mark.parametrize("kind", ["full", "low_rank", "boundless"])
def test_rotation_fp32_orthogonal_in_bf16_model(tmp_path, kind, monkeypatch):
    """R stays fp32 and orthogonal; the parametrization runs once per training step."""
    calls = []
    matrix = das_op.Interchange.matrix
    monkeypatch.setattr(
        das_op.Interchange,
        "matrix",
        lambda self: calls.append(torch.is_grad_enabled()) or matrix(self),
    )
    exp = (
        f"  - {{kind: das, variables: [WX, YZ], site: L0.resid_post@last, intervention: {kind},"
        " pairs: {train: 256, val: 32, test: 64}, training: {epochs: 2, patience: null}}\n"
    )
    study, plan = compile_file(_equality(tmp_path, exp, dtype="bfloat16"))
    state = loaded_for(plan, model=study.model)
    assert next(state.model.module.parameters()).dtype == torch.bfloat16
    res = das_op.run_das(plan.jobs[0], plan, state.engine, state.data)
    assert res.extra["steps"] == 2 * (256 // 64)
    assert sum(calls) == res.extra["steps"]  # grad-enabled parametrizations: one per step
    assert res.extra["rotation_dtype"] == "float32" and res.extra["orthogonality_error"] <= 1e-5
    r = das_op.load_rotation(base64.b64decode(res.extra["rotation"]))["rotation"]
    assert r.dtype == torch.float32
    assert (r.T @ r - torch.eye(r.shape[1])).abs().max() <= 1e-5


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("kind", ["full", "low_rank", "boundless"])
def test_every_optimizer_keeps_the_rotation_orthogonal(tmp_path, kind, optimizer):
    """No weight decay on the rotation: AdamW's once shrank the low_rank (Householder) map's +-1
    diagonal, which it truncates to int, to 0: zero columns, |R^T R - I| = 1."""
    exp = (
        f"  - {{kind: das, variables: [WX, YZ], site: L0.resid_post@last, intervention: {kind}, "
        "pairs: {train: 128, val: 0, test: 32}, "
        f"training: {{epochs: 2, patience: null, optimizer: {optimizer}}}}}\n"
    )
    study, plan = compile_file(_equality(tmp_path, exp))
    state = loaded_for(plan, model=study.model)
    res = das_op.run_das(plan.jobs[0], plan, state.engine, state.data)
    assert res.extra["steps"] == 2 * (128 // 64)
    assert res.extra["orthogonality_error"] <= 1e-5


def test_compiled_pairs_labels_and_splits(tmp_path):
    exp = "  - {kind: das, variables: [WX, YZ], site: L0.resid_post@last, pairs: {test: 300}}\n"
    study, plan = compile_file(_equality(tmp_path, exp))
    job = plan.jobs[0]
    p = job.params
    assert p["output"] == "O" and p["swap_sets"] == [["WX"], ["YZ"], ["WX", "YZ"]]
    assert job.op == "das" and job.extra_sites == ("L0.resid_post",)
    causal, data = study.causal, study.data
    for i in range(50):
        fixed = {}
        for v, col in zip(p["variables"], p["test"]["sources"], strict=True):
            if col[i] >= 0:
                fixed[v] = causal.compute(data.row(col[i]))[v]
        want = causal.compute(data.row(p["test"]["base"][i]), fixed)["O"]
        assert p["test"]["labels"][i] == int(want)
    labels = np.asarray(p["train"]["labels"])
    assert abs(labels.mean() - 0.5) < 0.02  # balanced counterfactual labels
    rows = {k: set(p[k]["base"]) | {s for c in p[k]["sources"] for s in c if s >= 0} for k in
            ("train", "val", "test")}  # fmt: skip
    assert not rows["test"] & rows["train"] and not rows["val"] & rows["train"]
    counts = np.bincount(p["test"]["swap"])
    assert counts.tolist() == [100, 100, 100]


@pytest.mark.parametrize(
    ("exp", "message"),
    [
        ("{kind: das, variables: Q, site: L0.resid_post}", "not a declared variable"),
        ("{kind: das, variables: W, output: O, site: L0.resid_post}", "does not depend on"),
        ("{kind: das, variables: WX, site: L0.resid_post@nowhere}", "unknown position"),
        ("{kind: das, variables: WX, site: L7.resid_post}", "out of range"),
    ],
)
def test_compile_errors(tmp_path, exp, message):
    with pytest.raises(SpecError, match=message):
        compile_file(_equality(tmp_path, f"  - {exp}\n"))


def test_handbuilt_reaches_one(tmp_path):
    """Known mechanism: WX in L0 dims 0-7, YZ in 8-15. The given (identity) rotation: IIA exactly
    1, on any machine. The learned one: IIA ~1, not exactly: the trained rotation, so which of the
    256 test pairs land on the wrong side of a threshold, depends on float rounding, which differs
    between CPUs (1.0 on AMD EPYC, 0.996 on an Intel Xeon for this seed). Over 104 trainings here
    with other seeds and learning rates (perturbations larger than rounding) the test IIA was
    >= 0.988 (1.0 in 80 %), and 0.99 failed 2 of 40 seeds: 0.98 is the method's guarantee here."""
    exp = (
        "  - {name: given, kind: das, variables: [WX, YZ], site: L0.resid_post@last, "
        "intervention: full, init: identity, training: {epochs: 0}, pairs: {test: 256}}\n"
        "  - {name: learned, kind: das, variables: [WX, YZ], site: L0.resid_post@last, "
        "intervention: full, pairs: {train: 1024, test: 256}}\n"
    )
    given, learned = _run(_equality(tmp_path, exp, model="equality_handbuilt")).reports
    assert given.metrics["das.iia"] == 1.0  # not learned: exact everywhere
    assert learned.metrics["das.iia"] >= 0.98, learned.metrics["das.iia"]
    assert given.metrics["das.control.random_rotation.ci_high"] < 0.9
    assert (
        learned.metrics["das.iia.ci_low"] > learned.metrics["das.control.random_rotation.ci_high"]
    )


def test_das_inside_a_given_subspace_is_exact_on_the_known_mechanism(tmp_path):
    """DAS searches inside a subspace site: its rotation acts on the subspace's coordinates. With
    the hand-built model's L0 dims as the subspace's columns in their own order, the identity
    rotation puts WX on dims 0-7 and YZ on 8-15: IIA exactly 1 (as on the whole site); with the two
    blocks' columns swapped the same rotation claims each variable where the other lives."""
    eye = np.eye(16, dtype=np.float32)
    np.save(tmp_path / "ordered.npy", eye)
    np.save(tmp_path / "swapped.npy", eye[:, list(range(8, 16)) + list(range(8))])
    exp = "".join(
        f"  - {{name: {n}, kind: das, variables: [WX, YZ], site: 'L0.resid_post[{n}]@last', "
        "intervention: full, init: identity, training: {epochs: 0}, pairs: {test: 256}}\n"
        for n in ("ordered", "swapped")
    )
    path = _equality(tmp_path, exp, model="equality_handbuilt")
    spaces = "subspaces:\n  ordered: {basis: ordered.npy}\n  swapped: {basis: swapped.npy}\n"
    path.write_text(spaces + path.read_text())
    ordered, swapped = _run(path).reports
    assert ordered.metrics["das.iia"] == 1.0
    assert swapped.metrics["das.iia.ci_high"] < 0.9


@pytest.mark.parametrize(
    ("kind", "init"), [("full", "random"), ("low_rank", "identity"), ("boundless", "random")]
)
def test_training_repeats_bit_for_bit(tmp_path, kind, init):
    """One job trained twice on this machine: the same rotation, losses, validation and test IIA,
    bit for bit, whatever the global RNG state and the number of intra-op threads (init, the
    low_rank completion of ``init: identity`` and the batch order come from the job's seed)."""
    exp = (
        f"  - {{kind: das, variables: [WX, YZ], site: L0.resid_post@last, intervention: {kind}, "
        f"init: {init}, pairs: {{train: 256, val: 64, test: 128}}, "
        "training: {epochs: 3, patience: null}}\n"
    )
    study, plan = compile_file(_equality(tmp_path, exp))
    state = loaded_for(plan, model=study.model)
    runs = []
    with torch.random.fork_rng(devices=[]):
        try:
            for seed, threads in ((1, 1), (2, 2)):
                torch.manual_seed(seed)
                torch.set_num_threads(threads)
                runs.append(das_op.run_das(plan.jobs[0], plan, state.engine, state.data))
        finally:
            torch.set_num_threads(1)
    first, second = runs
    assert first.extra["steps"] == second.extra["steps"] == 3 * (256 // 64)
    rotations = [das_op.load_rotation(base64.b64decode(r.extra["rotation"])) for r in runs]
    assert torch.equal(rotations[0]["rotation"], rotations[1]["rotation"])
    assert torch.equal(rotations[0]["boundary"], rotations[1]["boundary"])
    assert first.extra["loss"] == second.extra["loss"]
    assert first.extra["val_iia"] == second.extra["val_iia"]
    assert first.variants == second.variants  # test IIA per pair: learned and random rotation
    assert first.extra["rotation_sha256"] == second.extra["rotation_sha256"]


@pytest.mark.slow
def test_trained_mlp_true_vs_wrong_variable(tmp_path):
    """The bundled MLP: WX/YZ at L0 >= 0.95; the identity of the first argument (Geiger et al.)
    and the random rotation stay below, with non-overlapping CIs."""
    exp = (
        "  - {name: true-vars, kind: das, variables: [WX, YZ], site: L0.resid_post@last, "
        "intervention: full}\n"
        "  - {name: wrong-var, kind: das, variables: W, output: O_first, site: L0.resid_post@last, "
        "intervention: full, dim: 4}\n"
    )
    true, wrong = (r.metrics for r in _run(_equality(tmp_path, exp)).reports)
    assert true["das.iia"] >= 0.95
    assert true["das.iia.ci_low"] > wrong["das.iia.ci_high"]
    assert true["das.iia.ci_low"] > true["das.control.random_rotation.ci_high"]
    assert true["das.iia.ci_low"] > true["das.control.base_label.ci_high"]
    assert true["das.base_accuracy"] >= 0.99
    assert 0.4 < true["das.pairs.cf_differs"] < 0.6


def test_sweep_boundless_mlflow_and_reuse(tmp_path, tracking_uri):
    """A layers x k sweep is one experiment; metrics, curves and the rotation reach MLflow; the
    saved rotation evaluates to the same IIA when reused with ``init``."""
    exp = (
        "  - {name: sweep, kind: das, variables: [WX, YZ], site: 'L*.resid_post@last', "
        "dim: [1, 4], pairs: {train: 256, val: 64, test: 128}, training: {epochs: 2}}\n"
        "  - {name: boundless, kind: das, variables: WX, site: L0.resid_post@last, "
        "intervention: boundless, pairs: {train: 256, val: 64, test: 128}, "
        "training: {epochs: 2, temperature: [5, 0.5]}}\n"
    )
    path = _equality(tmp_path, exp)
    assert main(["run", str(path), "--no-cache", "--runner", "synchronous"]) == 0
    client = MlflowClient(tracking_uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name(
        "mi_spec").experiment_id])}  # fmt: skip
    parent, sweep = runs["eq"], runs["sweep@eq"]
    for key in ("das.iia", "das.iia.ci_low", "das.iia.ci_high", "das.control.random_rotation",
                "das.control.base_label"):  # fmt: skip
        assert key in sweep.data.metrics and f"sweep/{key}" in parent.data.metrics
    assert len([k for k in sweep.data.metrics if k.startswith("das.iia.L")]) == 3 * 2 * 3
    history = client.get_metric_history(
        sweep.info.run_id, "das.train.loss.L0.resid_post.last.k4.seed0"
    )
    assert len(history) == 2 * (256 // 64) and history[-1].step == 7
    files = {a.path for a in client.list_artifacts(sweep.info.run_id)}
    assert {
        "iia.png",
        "iia_curve.png",
        "graph.png",
        "das.csv",
        "rotation_L0.resid_post.last.k4.seed0.pt",
    } <= files
    bound = runs["boundless@eq"]
    local = client.download_artifacts(bound.info.run_id, "rotation_L0.resid_post.last.pt", tmp_path)
    saved = das_op.load_rotation(local)
    assert saved["kind"] == "boundless" and saved["variables"] == ["WX"]
    reuse = (
        "  - {name: reuse, kind: das, variables: WX, site: L0.resid_post@last, "
        f"intervention: boundless, init: {json.dumps(local)}, "
        "pairs: {train: 256, val: 64, test: 128}, training: {epochs: 0}}\n"
    )
    (report,) = _run(_equality(tmp_path, reuse)).reports
    assert report.metrics["das.iia"] == pytest.approx(bound.data.metrics["das.iia"], abs=1e-9)
    # validate catches a rotation file that run would refuse: missing, another kind
    for init, needle in [("nope.pt", "init rotation file not found"),
                         (local, "holds a boundless rotation; this experiment is full")]:  # fmt: skip
        wrong = reuse.replace("intervention: boundless", "intervention: full")
        wrong = wrong.replace(json.dumps(local), json.dumps(init))
        with pytest.raises(SpecError, match=needle) as err:
            compile_file(_equality(tmp_path, wrong))
        assert "experiments.0" in str(err.value)
