"""A worker keeps its model across plans: the next file of ``mi-spec run a.yaml b.yaml`` on the
same model loads only its data."""

from __future__ import annotations

import pytest
from conftest import TOY, write_rows

from mi_spec.api import compile_file
from mi_spec.execute import worker


def test_a_plan_on_the_same_model_with_other_data_reuses_the_model(
    study_file, tmp_path, monkeypatch
):
    first = compile_file(
        study_file(
            "experiments:\n  - {kind: activation_patching, sites: [L0.H0], positions: [mid]}\n",
            model=TOY,
        )
    )[1]
    write_rows(tmp_path / "other.jsonl", seed=1)
    text = (tmp_path / "tiny.yaml").read_text().replace("rows.jsonl", "other.jsonl")
    (tmp_path / "b.yaml").write_text(text)
    second = compile_file(tmp_path / "b.yaml")[1]
    assert first.model.key == second.model.key and first.data.data_hash != second.data.data_hash
    worker._LOADED.clear()
    a = worker.loaded_for(first)
    loads = []
    monkeypatch.setattr(worker, "load_model", lambda *a, **k: loads.append(a))
    b = worker.loaded_for(second)
    assert loads == [] and b.model is a.model and b.data is not a.data
    assert worker.loaded_for(second) is b and list(worker._LOADED) == [
        (second.model.key, second.data.data_hash)
    ]


def test_a_worker_checks_the_plans_sites_before_its_first_job_once(study_file, monkeypatch):
    """Site checks run where the model is (a worker loading an hf model the driver never loaded):
    before the first job of a process, once per set of sites; a broken site stops the job with
    the checks' error; ``check_sites: false`` skips them."""
    from mi_spec.errors import ResolveError
    from mi_spec.execute import site_check

    body = (
        "experiments:\n  - {kind: activation_patching, sites: [L0.H0, L1.H1], positions: [mid]}\n"
    )
    plan = compile_file(study_file(body, model=TOY))[1]
    calls = []
    real = site_check.check_sites
    monkeypatch.setattr(site_check, "check_sites", lambda *a, **k: calls.append(a) or real(*a, **k))
    worker._LOADED.clear()
    first = worker.execute_job(plan, plan.jobs[0])
    worker.execute_job(plan, plan.jobs[0])
    assert len(calls) == 1 and {s.name for s in calls[0][1]} == {"L0.H0", "L1.H1"}
    assert len(first.clean) == len(plan.jobs[0].rows)

    def broken(*_a, **_k):
        raise ResolveError("site 'L1.H1': writing its own value back changed the logits")

    monkeypatch.setattr(site_check, "check_sites", broken)
    worker._LOADED.clear()
    with pytest.raises(ResolveError, match="L1.H1"):
        worker.execute_job(plan, plan.jobs[0])
    off = plan.model_copy(
        update={"model": plan.model.model_copy(update={"section": {**plan.model.section,
                                                                    "check_sites": False}})}
    )  # fmt: skip
    worker._LOADED.clear()
    assert worker.execute_job(off, off.jobs[0]).clean == first.clean
