"""Causal tracing: the op equals a plain-hook implementation (same noise, independently measured
embedding std) to 1e-5 on the bundled induction model and a GPT-2 config (resid, MLP and attention
windows); restoring a layer's whole residual stream gives the clean metric, restoring what cannot
matter gives the corrupted one; the plan's pass count is what runs; the shipped hypothesis runs."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from mi_spec import api
from mi_spec.analysis.figure_check import capture_figures, check_figure
from mi_spec.api import compile_file
from mi_spec.compile.planner import compile_context
from mi_spec.errors import SpecError
from mi_spec.execute.tracing_op import run_causal_tracing, trace_noise
from mi_spec.execute.worker import loaded_for
from mi_spec.experiments.base import kinds
from mi_spec.experiments.causal_tracing import window_layers
from mi_spec.plan.summary import summarize
from mi_spec.tracking.base import InMemoryTracker

ROOT = Path(__file__).resolve().parents[2]
MODELS = {
    "induction": "factory: mi_spec.zoo:induction_2l",
    "gpt2": "hf_config: {model_type: gpt2, n_layer: 3, n_embd: 32, n_head: 4, vocab_size: 40, "
    "n_positions: 32}",
}
POSITIONS = ["all", 0, 2, 3, 8, 9]  # rows of 10 tokens: noise at 2..3, the metric scores 8


def _write(tmp_path: Path, model: str, extra: str = "") -> Path:
    rng = random.Random(2)
    with open(tmp_path / "rows.jsonl", "w") as f:
        for _ in range(9):
            f.write(json.dumps({"tokens": [rng.randrange(1, 40) for _ in range(10)]}) + "\n")
    path = tmp_path / "h.yaml"
    path.write_text(f"""
name: trace
model:
  {MODELS[model]}
data:
  path: rows.jsonl
  positions: {{subj: {{start: 2, stop: 4}}, q: 8}}
metric: {{kind: loss, at: q}}
max_batch_rows: 16
experiments:
  - {{kind: causal_tracing, source: {{noise: 3.0, at: subj}}, positions: {POSITIONS},
      window: 2, batch_size: 5, seed: 4}}
{extra}""")
    return path


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _run(model, ids, edits: dict[str, callable], capture: list[str]):
    """Logits of one forward where module ``name``'s output goes through ``edits[name]``;
    the outputs of ``capture`` are returned (after edits). Plain forward hooks."""
    modules, got, handles = dict(model.named_modules()), {}, []

    def hook(name):
        def fn(_m, _args, out):
            value = _first(out)
            if name in edits:
                value = edits[name](value.clone())
            got[name] = value.clone()
            return (value, *out[1:]) if isinstance(out, tuple) else value

        return fn

    try:
        for name in set(edits) | set(capture):
            handles.append(modules[name].register_forward_hook(hook(name)))
        with torch.no_grad():
            out = model(ids)
    finally:
        for h in handles:
            h.remove()
    return (out.logits if hasattr(out, "logits") else out), got


def _loss(logits, data, rows, pos=8):
    logp = torch.log_softmax(logits[:, pos].double(), -1)
    return [float(-logp[b, data.tokens[r][pos + 1]]) for b, r in enumerate(rows)]


def _reference(model, plan, data, job):
    """(embedding std, clean, corrupted, restored per cell) by plain hooks."""
    p, sites = job.params, plan.sites
    embed = sites["embed"].module
    all_ids, mask = (torch.tensor(x) for x in data.padded(list(p["scale_rows"])))
    with torch.no_grad():
        std = float(dict(model.named_modules())[embed](all_ids)[mask.bool()].double().std())
    rows = list(job.rows)
    ids = torch.tensor(data.padded(rows)[0])
    noise = torch.stack([trace_noise(p["seed"], r, 2, plan.dims["d_model"]) for r in rows])

    def corrupt(e):
        e[:, 2:4] += 3.0 * std * noise
        return e

    modules = sorted({sites[s].module for c in p["cells"] for s in c[3]})
    clean_logits, clean = _run(model, ids, {}, modules)
    corrupted = _loss(_run(model, ids, {embed: corrupt}, [])[0], data, rows)
    restored = []
    for _, _, pos, cell_sites in p["cells"]:
        where = slice(None) if pos == "all" else slice(pos, pos + 1)

        def restore(value, name, where=where):
            value[:, where] = clean[name][:, where]
            return value

        edits = {embed: corrupt} | {
            sites[s].module: (lambda v, n=sites[s].module: restore(v, n)) for s in cell_sites
        }
        restored.append(_loss(_run(model, ids, edits, [])[0], data, rows))
    return std, _loss(clean_logits, data, rows), corrupted, restored


@pytest.mark.parametrize("model", ["induction", "gpt2"])
def test_op_equals_plain_hooks_and_restoration_invariants(tmp_path, model):
    study, plan = compile_file(_write(tmp_path, model))
    state = loaded_for(plan, model=study.model)
    calls = []
    real_run = state.engine.run
    state.engine.run = lambda ids, *a, **k: calls.append(len(ids)) or real_run(ids, *a, **k)
    try:
        results = [run_causal_tracing(j, plan, state.engine, state.data) for j in plan.jobs]
    finally:
        del state.engine.run
    assert len(calls) == sum(j.forward_passes(plan.max_batch_rows) for j in plan.jobs)
    assert max(calls) <= plan.max_batch_rows
    panels = {c[0] for c in plan.jobs[0].params["cells"]}
    assert panels == ({"resid", "mlp", "attn"} if model == "gpt2" else {"resid", "attn"})
    for job, got in zip(plan.jobs, results, strict=True):
        std, clean, corrupted, restored = _reference(study.model.module, plan, state.data, job)
        assert got.extra["embed_std"] == pytest.approx(std, rel=1e-6)
        assert got.extra["noise_sigma"] == pytest.approx(3.0 * std, rel=1e-6)
        np.testing.assert_allclose(got.clean, clean, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got.source, corrupted, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got.variants, restored, atol=1e-5, rtol=1e-5)
        assert np.mean(np.abs(np.subtract(got.source, got.clean))) > 1e-3  # noise matters
        for (panel, _, pos, _), values in zip(job.params["cells"], got.variants, strict=True):
            if panel == "resid" and pos == "all":  # a whole layer restored: the clean run
                np.testing.assert_allclose(values, got.clean, atol=1e-6)
            if pos == 9:  # after the scored position: restores nothing that matters
                np.testing.assert_allclose(values, got.source, atol=1e-6)
    assert "forward passes" in summarize(plan) and "causal_tracing" in summarize(plan)
    with capture_figures() as saved:  # the report and its three-panel figure, on this model
        rep = kinds()["causal_tracing"].analyse(
            study.spec.experiments[0], compile_context(study), plan.jobs, results
        )
    assert check_figure(saved[0].figure) == []
    assert len(saved[0].figure.axes) == len(panels) + 1  # panels + the colour bar
    assert len(rep.tables["indirect_effects.csv"]) == len(plan.jobs[0].params["cells"])


def test_windows_and_spec_errors(tmp_path):
    assert window_layers(0, 10, 2) == [0, 1]
    assert window_layers(5, 10, 48) == list(range(0, 10))
    assert window_layers(1, 2, 3) == [0, 1] and window_layers(3, 1, 4) == [3]
    path = _write(tmp_path, "induction")
    plan = compile_file(path)[1]
    attn = [c for c in plan.jobs[0].params["cells"] if c[0] == "attn" and c[1] == 1]
    assert attn[0][3] == ["L0.attn_out", "L1.attn_out"]
    path.write_text(path.read_text().replace("window: 2,", "window: 2, restore: [mlp],"))
    with pytest.raises(SpecError, match=r"experiments\.0: restore: this model has no mlp_out"):
        compile_file(path)
    path.write_text(
        path.read_text().replace("at: subj", "at: subject").replace("noise: 3.0", "noise: -1")
    )
    with pytest.raises(SpecError) as err:
        compile_file(path)
    assert "experiments.0.source.noise" in str(err.value)


def test_hypothesis_file_runs():
    path = ROOT / "hypotheses" / "induction_tracing.yaml"
    api.validate(path)
    with capture_figures() as saved:
        (rep,) = api.run(path, InMemoryTracker(), cache_dir=None, runner="synchronous").reports
    assert len(saved) == 1 and check_figure(saved[0].figure) == []
    m = rep.metrics
    assert m["trace.metric.corrupted"] > 1.0 > 0.2 > m["trace.metric.clean"]
    assert m["trace.noise.sigma"] == pytest.approx(3 * m["trace.noise.embed_std"])
    assert rep.params["top_resid"] in ("L0@20", "L1@39") and rep.params["top_attn"] == "L1@39"
    assert m["trace.ie_norm.resid.L1.39"] > 0.9 and abs(m["trace.ie_norm.resid.L1.5"]) < 0.05
    assert len(rep.tables["indirect_effects.csv"]) == 2 * 2 * 41
    image = matplotlib.image.imread(io.BytesIO(rep.figures["causal_tracing.png"]), format="png")
    assert image.shape[0] > 400 and image.std() > 0.01
