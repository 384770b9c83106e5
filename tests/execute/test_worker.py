"""A worker keeps its model across plans: the next file of ``mi-spec run a.yaml b.yaml`` on the
same model loads only its data."""

from __future__ import annotations

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
