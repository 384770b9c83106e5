"""Two real studies (patching and causal scrubbing of the bundled induction model) logged into
one temporary sqlite store, read back through the MLflow client: runs, tags, params, the
dataset input, metrics on children and parents, artifacts and figures."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import struct
from pathlib import Path

import procs
import pytest
import yaml
from mlflow.tracking import MlflowClient
from tracking.studies import HEADLINE, PATCHING, SCRUB, run_small

from mi_spec.plan.ir import Plan


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(client, {run name: run}, {hypothesis file: tracker}) for both studies in one store."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    trackers = {path: run_small(path, uri) for path in (PATCHING, SCRUB)}
    client = MlflowClient(uri)
    (exp_id,) = {t.experiment_id for t in trackers.values()}
    runs = {r.info.run_name: r for r in client.search_runs([exp_id])}
    return client, runs, trackers


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def download(client: MlflowClient, run_id: str, path: str) -> bytes:
    return Path(client.download_artifacts(run_id, path)).read_bytes()


def test_one_parent_per_file_one_child_per_experiment(store):
    _, runs, trackers = store
    assert set(runs) == {
        "induction-patching",
        "heads@induction-patching",
        "residual@induction-patching",
        "heads-mean-ablation@induction-patching",
        "induction-scrub",
        "causal_scrubbing@induction-scrub",
    }
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    parents = {runs["induction-patching"].info.run_id, runs["induction-scrub"].info.run_id}
    assert parents == {t.parent_run_id for t in trackers.values()}
    for name, run in runs.items():
        if "@" in name:
            hypothesis = name.split("@")[1]
            assert run.data.tags["mlflow.parentRunId"] == runs[hypothesis].info.run_id


def test_parent_tags_identify_file_spec_commit_model_and_runner(store):
    _, runs, _ = store
    tags = runs["induction-scrub"].data.tags
    assert tags["mi_spec.hypothesis"] == "induction-scrub"
    assert tags["mi_spec.file_hash"] == hashlib.sha256(SCRUB.read_bytes()).hexdigest()
    assert tags["mi_spec.file"] == str(SCRUB)
    assert len(tags["mi_spec.spec_hash"]) == 16
    assert tags["mi_spec.model"] == runs["induction-scrub"].data.params["model.weights_hash"]
    assert tags["mi_spec.model_name"] == "mi_spec.zoo:induction_2l"
    assert tags["mi_spec.runner"] == "synchronous"
    assert tags["mi_spec.overrides"] == (
        "experiments.0.samples=8 experiments.0.controls.n_random=2"
    )
    head = procs.run(["git", "-C", str(SCRUB.parent), "rev-parse", "HEAD"])
    if head.returncode == 0:  # the checkout is a git work tree: HEAD then, or an ancestor of now
        commit = tags["mi_spec.git_commit"]
        assert len(commit) == 40 and tags["mi_spec.git_dirty"] in ("true", "false")
        ancestor = procs.run(
            ["git", "-C", str(SCRUB.parent), "merge-base", "--is-ancestor", commit, "HEAD"]
        )
        assert ancestor.returncode == 0, commit
    else:
        assert "mi_spec.git_commit" not in tags
    # same model, different hypothesis files and specs
    other = runs["induction-patching"].data.tags
    assert other["mi_spec.model"] == tags["mi_spec.model"]
    assert other["mi_spec.file_hash"] != tags["mi_spec.file_hash"]
    assert other["mi_spec.spec_hash"] != tags["mi_spec.spec_hash"]


def test_children_carry_kind_hypothesis_and_headline_names(store):
    _, runs, _ = store
    for name, run in runs.items():
        if "@" not in name:
            continue
        tags = run.data.tags
        hypothesis = name.split("@")[1]
        assert tags["mi_spec.hypothesis"] == hypothesis
        assert tags["mi_spec.file_hash"] == runs[hypothesis].data.tags["mi_spec.file_hash"]
        assert tags["mi_spec.headline"].split(",") == HEADLINE[tags["mi_spec.kind"]]


def test_dataset_is_logged_as_run_input(store):
    _, runs, _ = store
    parent = runs["induction-patching"]
    (entry,) = parent.inputs.dataset_inputs
    ds = entry.dataset
    assert ds.name == "repeated_tokens"
    assert ds.digest == parent.data.params["data.hash"]
    assert ds.source_type == "code"
    assert json.loads(ds.source) == {
        "tags": {
            "generator": "mi_spec.zoo.tasks:repeated_tokens",
            "params": {"n": 32, "seq_len": 41, "seed": 1},
        }
    }
    assert json.loads(ds.profile) == {"num_rows": 32} and parent.data.params["data.rows"] == "32"
    columns = {c["name"]: c for c in json.loads(ds.schema)["mlflow_colspec"]}
    assert columns["tokens"]["type"] == "array" and columns["tokens"]["items"] == {"type": "long"}
    assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "eval")]
    scrub = runs["induction-scrub"].inputs.dataset_inputs[0].dataset
    assert json.loads(scrub.profile) == {"num_rows": 2000} and scrub.digest != ds.digest


def test_headline_metrics_on_child_and_parent_with_cis(store):
    _, runs, _ = store
    child = runs["causal_scrubbing@induction-scrub"].data.metrics
    parent = runs["induction-scrub"].data.metrics
    for name in HEADLINE["causal_scrubbing"]:
        assert parent[f"causal_scrubbing/{name}"] == child[name]
    for name in HEADLINE["causal_scrubbing"][:4]:
        assert child[f"{name}.ci_low"] <= child[name] <= child[f"{name}.ci_high"]
        assert parent[f"causal_scrubbing/{name}.ci_low"] == child[f"{name}.ci_low"]
    # loss_recovered is (L_random - L_scrubbed) / (L_random - L_model) of the logged means
    rnd, scrubbed, model = (child[f"scrub.loss_{k}"] for k in ("random", "scrubbed", "model"))
    assert child["scrub.loss_recovered"] == pytest.approx((rnd - scrubbed) / (rnd - model))
    assert child["scrub.loss_recovered"] > 0.9  # the standard induction circuit holds
    assert child["scrub.control.random_mean"] < 0.5  # random circuits of its size do not
    # parent metrics are `<experiment>/<metric>`: two experiments of a kind never collide, and
    # the key does not name the hypothesis (v1 and v2 of a study share it)
    patch = runs["induction-patching"].data.metrics
    for run in ("heads", "residual", "heads-mean-ablation"):
        child = runs[f"{run}@induction-patching"]
        for name in child.data.tags["mi_spec.headline"].split(","):
            assert patch[f"{run}/{name}"] == child.data.metrics[name]
    assert all("/" in k and "induction" not in k for k in patch), sorted(patch)


def test_description_is_the_parents_note(store):
    _, runs, _ = store
    note = runs["induction-patching"].data.tags["mlflow.note.content"]
    assert note == yaml.safe_load(PATCHING.read_text())["description"] and note


def test_logged_tables_agree_with_logged_metrics(store):
    client, runs, _ = store
    heads = runs["heads@induction-patching"]
    with open(client.download_artifacts(heads.info.run_id, "effects.csv")) as f:
        rows = list(csv.DictReader(f))
    heads_, positions = {r["site"] for r in rows}, {r["position"] for r in rows}
    assert positions == {"repeat", "first"} and len(rows) == 2 * len(heads_) >= 8
    top = max(rows, key=lambda r: abs(float(r["effect_norm"])))
    assert top["label"] == heads.data.params["top_site"] == "L1.H1@repeat"
    assert math.isclose(float(top["effect_norm"]), heads.data.metrics["patch.max_effect"])
    with open(client.download_artifacts(heads.info.run_id, "effects.json")) as f:
        table = json.load(f)  # the same rows as an MLflow table (log_table, pandas "split")
    assert json.loads(heads.data.tags["mlflow.loggedArtifacts"]) == [
        {"path": "effects.json", "type": "table"}
    ]
    assert table["columns"] == list(rows[0])
    for row, cells in zip(rows, table["data"], strict=True):
        assert row["label"] == cells[table["columns"].index("label")]
        got = cells[table["columns"].index("effect_norm")]
        # MLflow writes tables with pandas' default of 10 decimal places; the CSV is exact
        assert math.isclose(float(row["effect_norm"]), got, rel_tol=0, abs_tol=5.1e-11)
    scrub = runs["causal_scrubbing@induction-scrub"]
    with open(client.download_artifacts(scrub.info.run_id, "variants.csv")) as f:
        variants = {r["variant"]: r for r in csv.DictReader(f)}
    main = next(r for k, r in variants.items() if not k.startswith(("drop:", "control:")))
    assert float(main["loss_recovered"]) == pytest.approx(
        scrub.data.metrics["scrub.loss_recovered"]
    )


def test_study_artifacts(store):
    client, runs, _ = store
    parent = runs["induction-patching"]
    root = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"resolved.yaml", "hypothesis.yaml", "plan.json"} <= root
    resolved = yaml.safe_load(download(client, parent.info.run_id, "resolved.yaml"))
    assert resolved["name"] == "induction-patching"
    assert [e["samples"] for e in resolved["experiments"]] == [16, 16, 16]  # overrides applied
    plan = Plan.from_json(download(client, parent.info.run_id, "plan.json").decode())
    assert plan.content_hash == parent.data.params["plan.hash"]


@pytest.mark.parametrize(
    ("run", "figures", "tables"),
    [
        ("heads@induction-patching", ["heatmap.png"], ["effects.csv"]),
        ("heads-mean-ablation@induction-patching", ["heatmap.png"], ["effects.csv"]),
        (
            "causal_scrubbing@induction-scrub",
            ["graph.png", "loss_recovered.png"],
            ["variants.csv", "power.csv"],
        ),
    ],
)
def test_figures_are_real_pngs_on_child_and_parent(store, run, figures, tables):
    client, runs, _ = store
    child = runs[run]
    assert set(figures + tables) <= {a.path for a in client.list_artifacts(child.info.run_id)}
    folder = run.split("@")[0]  # the experiment's label
    parent_id = child.data.tags["mlflow.parentRunId"]
    for name in figures:
        data = download(client, child.info.run_id, name)
        width, height = png_size(data)
        assert width >= 400 and height >= 300 and len(data) > 10_000
        assert download(client, parent_id, f"{folder}/{name}") == data  # copy on the parent
