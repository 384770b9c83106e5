"""Study provenance for the run tags and the dataset input: the hypothesis file's content hash
(with its ``extends`` chain), the git commit and dirtiness, the model's name, the data's identity."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import procs
import pytest

from mi_spec.api import compile_file, study_record
from mi_spec.spec.load import load_yaml
from mi_spec.tracking.provenance import dataset_identity, file_hash, git_info, model_name

GIT_ID = ["-c", "user.name=mi_spec tests", "-c", "user.email=tests@mi-spec.invalid"]


def git(repo: Path, *args: str) -> str:
    done = procs.run(["git", "-C", str(repo), *GIT_ID, *args], check=True)
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git work tree with one committed hypothesis and one committed other file."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    try:
        procs.run(["git", "--version"], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not installed")
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "h.yaml").write_text("name: h\n")
    (root / "notes.txt").write_text("x\n")
    git(root, "add", "h.yaml", "notes.txt")
    git(root, "commit", "-q", "-m", "first")
    return root


def test_file_hash_is_sha256sum_and_covers_the_extends_chain(tmp_path):
    base, child = tmp_path / "base.yaml", tmp_path / "child.yaml"
    base.write_text("name: base\nmetric: {kind: loss}\n")
    child.write_text("extends: base.yaml\nname: child\n")
    assert file_hash([base]) == hashlib.sha256(base.read_bytes()).hexdigest()
    doc = load_yaml(child)
    assert doc.files == [base, child]
    chained = file_hash(doc.files)
    assert chained == hashlib.sha256(base.read_bytes() + child.read_bytes()).hexdigest()
    base.write_text("name: base\nmetric: {kind: kl}\n")  # the base changes, the child does not
    assert file_hash(load_yaml(child).files) != chained


def test_git_commit_and_dirty(repo):
    head = git(repo, "rev-parse", "HEAD")
    hyp = repo / "h.yaml"
    assert git_info([hyp]) == {"commit": head, "dirty": "false"}
    (repo / "notes.txt").write_text("changed\n")  # another tracked file changed
    assert git_info([hyp]) == {"commit": head, "dirty": "true"}
    git(repo, "checkout", "-q", "notes.txt")
    (repo / "new.yaml").write_text("name: new\n")  # an untracked hypothesis
    assert git_info([repo / "new.yaml"]) == {"commit": head, "dirty": "true"}
    assert git_info([hyp]) == {"commit": head, "dirty": "false"}  # other untracked files: clean
    (repo / ".gitignore").write_text("ignored.yaml\n")
    (repo / "ignored.yaml").write_text("name: ignored\n")
    assert git_info([repo / "ignored.yaml"])["dirty"] == "true"
    hyp.write_text("name: h2\n")  # the hypothesis itself changed
    assert git_info([hyp])["dirty"] == "true"


def test_no_git_tags_outside_a_repo_or_without_git(tmp_path, repo, monkeypatch):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "h.yaml").write_text("name: h\n")
    assert git_info([outside / "h.yaml"]) == {}
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")  # a repository without commits
    (empty / "h.yaml").write_text("name: h\n")
    assert git_info([empty / "h.yaml"]) == {}
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # git cannot be found
    assert git_info([repo / "h.yaml"]) == {}


def test_model_name():
    assert model_name({"factory": "mi_spec.zoo:induction_2l"}) == "mi_spec.zoo:induction_2l"
    assert model_name({"hf": "models/pythia", "checkpoint": "ft.pt"}) == "hf:models/pythia+ft.pt"
    assert model_name({"hf_config": {"model_type": "gpt2", "n_layer": 2}}) == "hf_config:gpt2"


def test_dataset_identity_of_a_file(tmp_path):
    ds = dataset_identity(
        {"path": "rows.jsonl", "limit": 8},
        tmp_path,
        "abc",
        8,
        {"tokens": [1, 2], "label": 1.5, "name": "x", "ok": True, "mixed": [1, 2.5]},
    )
    assert ds["name"] == "rows.jsonl" and ds["source_type"] == "local"
    assert ds["source"] == {"uri": (tmp_path / "rows.jsonl").as_uri(), "tags": {"limit": 8}}
    assert ds["digest"] == "abc" and ds["n_rows"] == 8
    assert ds["columns"] == {
        "tokens": {"type": "array", "items": {"type": "long"}},
        "label": {"type": "double"},
        "name": {"type": "string"},
        "ok": {"type": "boolean"},
        "mixed": {"type": "array", "items": {"type": "double"}},
    }


def test_study_record_tags_for_a_committed_hypothesis(repo, study_file, tmp_path):
    """A study file committed in a repository: every provenance tag, and the dataset."""
    src = study_file("experiments:\n  - {kind: ablation, sites: ['L1.H*'], method: zero}\n")
    for name in ("tiny.yaml", "rows.jsonl"):
        (repo / name).write_bytes((tmp_path / name).read_bytes())
    git(repo, "add", "tiny.yaml", "rows.jsonl")
    git(repo, "commit", "-q", "-m", "study")
    study, plan = compile_file(repo / "tiny.yaml", ["experiments.0.method=mean"])
    record = study_record(study, plan, runner="local")
    tags = record.tags
    assert tags["mi_spec.file_hash"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert tags["mi_spec.git_commit"] == git(repo, "rev-parse", "HEAD")
    assert tags["mi_spec.git_dirty"] == "false"
    assert tags["mi_spec.model_name"] == "hf_config:gpt2"
    assert tags["mi_spec.model"] == record.params["model.weights_hash"]
    assert tags["mi_spec.overrides"] == "experiments.0.method=mean"
    assert tags["mi_spec.runner"] == "local" and "mi_spec.extends" not in tags
    assert record.dataset["name"] == "rows.jsonl"
    assert record.dataset["digest"] == plan.data.data_hash and record.dataset["n_rows"] == 16
