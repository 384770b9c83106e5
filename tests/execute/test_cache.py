"""The result cache holds results of this code only: keys carry the mi_spec, op, torch and
transformers versions, so an upgrade that changes any of them recomputes instead of reusing."""

from __future__ import annotations

from mi_spec.execute import cache as cache_module
from mi_spec.execute import ops
from mi_spec.execute.cache import ResultCache, code_version
from mi_spec.plan.ir import JobResult


def test_a_result_is_found_again_by_the_same_code(tmp_path):
    store = ResultCache(tmp_path)
    store.put(JobResult(job_id="abcd1234", clean=(1.0, 2.0)))
    assert store.get("abcd1234") == JobResult(job_id="abcd1234", clean=(1.0, 2.0))
    assert store.get("ffff0000") is None


def test_an_op_version_bump_invalidates_its_results(tmp_path, monkeypatch):
    store = ResultCache(tmp_path)
    store.put(JobResult(job_id="abcd1234", clean=(1.0,)))
    before = code_version("patch")
    ops.op_for("patch")
    monkeypatch.setitem(ops._VERSIONS, "patch", ops._VERSIONS["patch"] + 1)
    assert code_version("patch") != before
    assert store.get("abcd1234") is None


def test_a_library_upgrade_invalidates_results(tmp_path, monkeypatch):
    store = ResultCache(tmp_path)
    store.put(JobResult(job_id="abcd1234", clean=(1.0,)))
    versions = dict(cache_module.library_versions())
    for package, new in [("mi_spec", "99.0.0"), ("torch", "99.0"), ("transformers", "99")]:
        monkeypatch.setattr(
            cache_module, "library_versions", lambda v={**versions, package: new}: v
        )
        assert store.get("abcd1234") is None, package
    monkeypatch.setattr(cache_module, "library_versions", lambda: versions)
    assert store.get("abcd1234") is not None


def test_versions_in_the_key():
    versions = cache_module.library_versions()
    assert set(versions) == {"mi_spec", "torch", "transformers"}
    assert versions["torch"].count(".") == 1 and "." not in versions["transformers"]
