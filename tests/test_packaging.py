"""What a Python user expects of the package: a license file, type information, the JSON schemas
inside the wheel (and current), and a wheel that builds with exactly those files."""

from __future__ import annotations

import sys
import tomllib
import zipfile
from pathlib import Path

import procs
import pytest

from mi_spec.compile.schema import NAMES, hypothesis_schema, render, schema_file
from mi_spec.schedule.profiles import profile_schema

ROOT = Path(__file__).resolve().parents[1]


def test_metadata_states_the_license_and_the_python_ci_runs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert project["requires-python"] == ">=3.11"
    assert sys.version_info >= (3, 11)


def test_packaged_schemas_equal_the_repository_copies_and_are_current():
    current = {"hypothesis": render(hypothesis_schema()), "runner": render(profile_schema())}
    for name in NAMES:
        assert schema_file(name).read_text() == current[name], "run `mi-spec schema`"
        assert (ROOT / "schemas" / f"{name}.schema.json").read_text() == current[name]


@pytest.mark.slow
def test_the_wheel_holds_license_types_schemas_and_checkpoints(tmp_path):
    done = procs.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("mi_spec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mi_spec/py.typed", "mi_spec/schemas/hypothesis.schema.json",
            "mi_spec/schemas/runner.schema.json", "mi_spec/schedule/runners/local.yaml",
            "mi_spec/zoo/checkpoints/induction_2l.pt"} <= names  # fmt: skip
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: Apache-2.0" in text and "Requires-Python: >=3.11" in text


def test_uv_lock_matches_the_declared_dependencies():
    """``uv.lock`` was regenerated after the last change of dependencies (no network needed)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    (me,) = [p for p in lock["package"] if p["name"] == "mi-spec"]
    locked = {
        (canonicalize_name(r["name"]), r.get("specifier", ""))
        for r in me["metadata"]["requires-dist"]
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]
    wanted = {(canonicalize_name(r.name), str(r.specifier)) for r in map(Requirement, declared)}
    assert wanted == locked, "run `uv lock` after changing dependencies in pyproject.toml"
