"""Clean-prefix reuse: a patched pass resumes at its first write, the modules below returning
their clean outputs. Its results equal whole passes (a resume point that failed its check runs
whole) and it is actually used, at every layer, on GPT-2 and the bundled architecture; in-place
writes at a residual point (GPT-2's block inputs) do not reach the cached outputs."""

from __future__ import annotations

import pytest
from conftest import write_rows
from reference.models import TINY_MODELS

from mi_spec.api import compile_file
from mi_spec.execute.run_job import run_job
from mi_spec.execute.worker import loaded_for


def sweep(tmp_path, model: str):
    write_rows(tmp_path / "rows.jsonl", n=8, length=10, seed=2)
    extra = ', "L*.resid_mid"' if model == "gpt2" else ""  # written in place (shared)
    (tmp_path / "h.yaml").write_text(f"""
name: prefix
model:
  {TINY_MODELS[model]}
data: {{path: rows.jsonl}}
metric: {{kind: loss, at: 6}}
max_batch_rows: 16
experiments:
  - {{kind: activation_patching, sites: ["L*.H*", "L1.resid_pre", "L0.H1:k"{extra}], positions: [6, all]}}
""")
    study, plan = compile_file(tmp_path / "h.yaml")
    return plan, loaded_for(plan, model=study.model)


@pytest.mark.parametrize("model", ["gpt2", "toy"])
def test_resumed_passes_equal_whole_passes(tmp_path, model):
    plan, state = sweep(tmp_path, model)
    engine = state.engine
    resumed = [run_job(j, plan, engine, state.data) for j in plan.jobs]
    used = dict(engine.resumable)
    assert used and all(used.values()), used  # every layer's resume point passed its check
    assert any(m.split(".")[-2:] != ["0", "attn"] for m in used)  # not only the first layer
    engine.resumable = dict.fromkeys(used, False)  # the same jobs with whole passes
    whole = [run_job(j, plan, engine, state.data) for j in plan.jobs]
    for a, b in zip(resumed, whole, strict=True):
        assert a.clean == b.clean
        for va, vb in zip(a.variants, b.variants, strict=True):
            assert va == pytest.approx(vb, abs=1e-6)
