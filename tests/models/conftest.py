"""File digests go to a per-test sidecar folder, never the user's cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    from mi_spec.models import identity

    folder = tmp_path / "digests"
    monkeypatch.setenv("MI_SPEC_DIGEST_CACHE", str(folder))
    monkeypatch.setattr(identity, "_MEMO", {})
    return folder
