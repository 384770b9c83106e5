"""Every shipped hypothesis file validates as written (schema, model, data, every row, every site):
the files a researcher copies first must never be the ones that fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from mi_spec import api

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "hypotheses").glob("*.yaml")) + sorted(
    (ROOT / "hypotheses" / "arch").glob("*.yaml")
)


def test_the_shipped_files_are_found():
    assert len(FILES) >= 14


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_hypothesis_validates(path: Path):
    plan = api.validate(path)
    assert plan.jobs and plan.experiments
