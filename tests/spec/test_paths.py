"""Relative paths written in an `extends` base are relative to the base, not the main file.

`load_yaml` rewrites them to name the same file relative to the main file's folder, the folder
every downstream reader (data, checkpoints, adapters, DAS rotations) resolves against.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from mi_spec.cli.main import main
from mi_spec.spec.load import PATH_FIELDS, load_yaml
from mi_spec.zoo import attn_only


@pytest.fixture
def tmp_path(tmp_path: Path) -> Path:
    """The temporary folder without symbolic links, to compare resolved paths with."""
    return tmp_path.resolve()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def points_at(main: Path, value: str) -> Path:
    """Where a value resolves, the way downstream code resolves it (against the main's folder)."""
    return (main.parent / value).resolve()


def test_base_in_a_subfolder(tmp_path: Path) -> None:
    base = write(
        tmp_path,
        "base/common.yaml",
        """
        model: {factory: "m:f", checkpoint: weights/w.pt, hf: hf_dir}
        data: {path: rows.jsonl, tokenizer: ./tok}
        """,
    )
    main = write(tmp_path, "studies/study.yaml", "extends: ../base/common.yaml\nname: s\n")
    doc = load_yaml(main)
    assert doc.data["data"]["path"] == os.path.join("..", "base", "rows.jsonl")
    assert points_at(main, doc.data["data"]["path"]) == tmp_path / "base" / "rows.jsonl"
    assert points_at(main, doc.data["data"]["tokenizer"]) == tmp_path / "base" / "tok"
    assert points_at(main, doc.data["model"]["checkpoint"]) == tmp_path / "base/weights/w.pt"
    assert points_at(main, doc.data["model"]["hf"]) == tmp_path / "base" / "hf_dir"
    assert doc.data["model"]["factory"] == "m:f"  # a reference, not a path
    # marks and provenance still say where the value was written
    assert doc.provenance[("data", "path")] == str(main.parent / "../base/common.yaml")
    assert doc.value_marks[("data", "path")][1:] == (2, 14)
    assert base.exists()


def test_base_in_a_parent_folder(tmp_path: Path) -> None:
    write(tmp_path, "common.yaml", "data: {path: data/rows.jsonl}\n")
    main = write(tmp_path, "a/b/study.yaml", "extends: ../../common.yaml\n")
    doc = load_yaml(main)
    assert doc.data["data"]["path"] == os.path.join("..", "..", "data", "rows.jsonl")
    assert points_at(main, doc.data["data"]["path"]) == tmp_path / "data" / "rows.jsonl"


def test_nested_chain_in_three_folders(tmp_path: Path) -> None:
    """a -> b -> c: each value is relative to the file that wrote it."""
    write(
        tmp_path,
        "c/c.yaml",
        """
        model: {factory: "m:f", checkpoint: c.pt}
        data: {path: c.jsonl}
        """,
    )
    write(tmp_path, "b/b.yaml", "extends: ../c/c.yaml\ndata: {path: b.jsonl}\n")
    main = write(tmp_path, "a/a.yaml", "extends: ../b/b.yaml\nname: a\n")
    doc = load_yaml(main)
    assert points_at(main, doc.data["data"]["path"]) == tmp_path / "b" / "b.jsonl"
    assert points_at(main, doc.data["model"]["checkpoint"]) == tmp_path / "c" / "c.pt"
    assert [p.parent.name for p in doc.files] == ["c", "b", "a"]


def test_base_in_the_same_folder_is_unchanged(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "data: {path: ./rows.jsonl}\n")
    doc = load_yaml(write(tmp_path, "main.yaml", "extends: base.yaml\n"))
    assert doc.data["data"]["path"] == "./rows.jsonl"


def test_absolute_paths_are_unchanged(tmp_path: Path) -> None:
    rows = str(tmp_path / "elsewhere" / "rows.jsonl")
    write(tmp_path, "base/common.yaml", f"data: {{path: {json.dumps(rows)}}}\n")
    doc = load_yaml(write(tmp_path, "studies/s.yaml", "extends: ../base/common.yaml\n"))
    assert doc.data["data"]["path"] == rows


def test_values_written_in_the_main_file_are_unchanged(tmp_path: Path) -> None:
    write(tmp_path, "base/common.yaml", "data: {path: base.jsonl, limit: 4}\n")
    main = write(
        tmp_path,
        "studies/s.yaml",
        "extends: ../base/common.yaml\ndata: {path: mine.jsonl}\nmodel: {checkpoint: w.pt}\n",
    )
    doc = load_yaml(main)
    assert doc.data["data"] == {"path": "mine.jsonl", "limit": 4}
    assert doc.data["model"] == {"checkpoint": "w.pt"}


def test_set_values_are_relative_to_the_main_file(tmp_path: Path) -> None:
    write(tmp_path, "base/common.yaml", "data: {path: base.jsonl}\n")
    main = write(tmp_path, "studies/s.yaml", "extends: ../base/common.yaml\n")
    doc = load_yaml(main, ["data.path=other.jsonl", "model.checkpoint=w.pt"])
    assert doc.data["data"]["path"] == "other.jsonl"
    assert doc.data["model"]["checkpoint"] == "w.pt"


@pytest.mark.parametrize(
    ("adapter", "rebased"),
    [("adapters/tiny.yaml", True), ("gpt2", False), ({"dims": {}}, False)],
)
def test_adapter_is_a_path_only_when_a_yaml_file(
    tmp_path: Path, adapter: object, rebased: bool
) -> None:
    write(tmp_path, "base/common.yaml", f"model: {{adapter: {json.dumps(adapter)}}}\n")
    main = write(tmp_path, "studies/s.yaml", "extends: ../base/common.yaml\n")
    value = load_yaml(main).data["model"]["adapter"]
    if rebased:
        assert points_at(main, value) == tmp_path / "base" / "adapters" / "tiny.yaml"
    else:
        assert value == adapter


def test_das_init_files_are_rebased_but_not_the_keywords(tmp_path: Path) -> None:
    write(
        tmp_path,
        "base/common.yaml",
        """
        experiments:
          - {kind: das, init: random}
          - {kind: das, init: identity}
          - {kind: das, init: rotations/r.pt}
          - {kind: ablation}
        """,
    )
    main = write(tmp_path, "studies/s.yaml", "extends: ../base/common.yaml\n")
    experiments = load_yaml(main).data["experiments"]
    assert [e.get("init") for e in experiments[:2]] == ["random", "identity"]
    assert points_at(main, experiments[2]["init"]) == tmp_path / "base" / "rotations" / "r.pt"
    assert experiments[3] == {"kind": "ablation"}


def test_a_tokenizer_built_by_code_is_a_reference_not_a_path(tmp_path: Path) -> None:
    write(tmp_path, "base/common.yaml", "data: {tokenizer: mi_spec.zoo.ioi:tokenizer}\n")
    write(tmp_path, "base/folder.yaml", "data: {tokenizer: tok}\n")
    main = write(tmp_path, "studies/s.yaml", "extends: ../base/common.yaml\n")
    assert load_yaml(main).data["data"]["tokenizer"] == "mi_spec.zoo.ioi:tokenizer"
    main = write(tmp_path, "studies/t.yaml", "extends: ../base/folder.yaml\n")
    assert points_at(main, load_yaml(main).data["data"]["tokenizer"]) == tmp_path / "base" / "tok"


def test_non_string_values_are_left_for_validation(tmp_path: Path) -> None:
    write(tmp_path, "base/common.yaml", "data: {path: 3, tokenizer: ''}\nmodel: [1]\n")
    doc = load_yaml(write(tmp_path, "studies/s.yaml", "extends: ../base/common.yaml\n"))
    assert doc.data == {"data": {"path": 3, "tokenizer": ""}, "model": [1]}


def test_path_fields_cover_the_sections() -> None:
    """The constant names the fields the sections document as paths."""
    named = {".".join(f.path) for f in PATH_FIELDS}
    assert named == {
        "model.checkpoint",
        "model.hf",
        "model.adapter",
        "data.path",
        "data.tokenizer",
        "experiments.*.init",
    }


def test_validate_with_data_and_checkpoint_beside_a_base(tmp_path: Path) -> None:
    """End to end: the CLI validates a study whose data and weights live next to its base."""
    kwargs = {"n_layers": 2, "n_heads": 2, "d_model": 16, "d_head": 8, "n_ctx": 16, "d_vocab": 20}
    shared = tmp_path / "shared"
    shared.mkdir()
    torch.save(attn_only(**kwargs).state_dict(), shared / "weights.pt")
    with (shared / "rows.jsonl").open("w") as f:
        for i in range(8):
            f.write(json.dumps({"tokens": [(i + j) % 20 for j in range(8)]}) + "\n")
    write(
        tmp_path,
        "shared/base.yaml",
        f"""
        name: shared-base
        model:
          factory: mi_spec.zoo:attn_only
          kwargs: {json.dumps(kwargs)}
          checkpoint: weights.pt
        data:
          path: rows.jsonl
          positions: {{mid: 4}}
        metric: {{kind: loss, at: mid}}
        """,
    )
    study = write(
        tmp_path,
        "studies/study.yaml",
        """
        extends: ../shared/base.yaml
        name: beside-a-base
        experiments:
          - {kind: ablation, sites: [L0.H0], method: zero}
        """,
    )
    assert main(["validate", str(study)]) == 0
