"""Logit lens: the op equals a plain-PyTorch lens (forward hooks + the model's own final norm and
unembedding) to 1e-5 on the bundled induction model, a GPT-2 config and a regression model (mse /
mae); the last lens point is the model's output; the shipped hypothesis runs and says it is
correlational."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from reference.regression_model import ADAPTER, regression_mlp

from mi_spec import api
from mi_spec.analysis.figure_check import capture_figures, check_figure
from mi_spec.api import compile_file
from mi_spec.errors import SpecError
from mi_spec.execute.logit_lens_op import run_logit_lens
from mi_spec.execute.worker import loaded_for
from mi_spec.tracking.base import InMemoryTracker

ROOT = Path(__file__).resolve().parents[2]
GPT2 = (
    "hf_config: {model_type: gpt2, n_layer: 3, n_embd: 32, n_head: 4, vocab_size: 40, "
    "n_positions: 32}"
)


def _write(tmp_path: Path, model: str, metric: str, vocab: int = 40, extra: str = "") -> Path:
    rng = random.Random(0)
    with open(tmp_path / "rows.jsonl", "w") as f:
        for _ in range(10):
            toks = [rng.randrange(vocab) for _ in range(12)]
            f.write(json.dumps({"tokens": toks, "y": rng.gauss(0, 1), "tgt": 3, "bad": 5}) + "\n")
    path = tmp_path / "h.yaml"
    path.write_text(f"""
name: lens
model:
  {model}
data:
  path: rows.jsonl
  positions: {{tail: {{start: -4, stop: -1}}, early: {{start: 1, stop: 3}}}}
metric: {metric}
max_batch_rows: 7
experiments:
  - {{kind: logit_lens, name: tail, batch_size: 6}}
  - {{kind: logit_lens, name: early, at: early, batch_size: 6}}
{extra}""")
    return path


def _hooked_forward(model, ids, pre: list[str], post: str):
    """Logits plus each ``pre`` module's input and ``post``'s output, by plain forward hooks."""
    modules, got, handles = dict(model.named_modules()), {}, []
    try:
        for name in pre:
            handles.append(modules[name].register_forward_pre_hook(
                lambda _m, args, name=name: got.__setitem__(name, args[0].clone())))  # fmt: skip
        handles.append(modules[post].register_forward_hook(
            lambda _m, _a, out: got.__setitem__("final", (out[0] if isinstance(out, tuple)
                                                          else out).clone())))  # fmt: skip
        with torch.no_grad():
            out = model(ids)
    finally:
        for h in handles:
            h.remove()
    logits = out.logits if hasattr(out, "logits") else out
    return logits, [got[n] for n in pre] + [got["final"]]


def _reference(model, family: str, data, rows, positions, metric: str):
    """Per lens point and row: (metric, rank) from the readout of each residual state."""
    ids = torch.tensor(data.padded(rows)[0])
    if family == "gpt2":
        pre = [f"transformer.h.{i}" for i in range(len(model.transformer.h))]
        post, head = pre[-1], lambda r: model.lm_head(model.transformer.ln_f(r))
    elif family == "toy":
        pre = [f"blocks.{i}" for i in range(len(model.blocks))]
        post, head = pre[-1], model.unembed
    else:
        pre = [f"blocks.{i}" for i in range(len(model.blocks))]
        post, head = pre[-1], model.readout
    logits, states = _hooked_forward(model, ids, pre, post)
    out = []
    for r in [*states, None]:
        with torch.no_grad():
            lg = logits if r is None else head(r)
        vals, ranks = [], []
        for b, row in enumerate(rows):
            ps = positions[b]
            if metric in ("mse", "mae"):
                err = lg[b, ps, 0].double() - data.columns["y"][row]
                vals.append(float((err**2 if metric == "mse" else err.abs()).mean()))
                ranks.append(0.0)
                continue
            tg = [data.tokens[row][p + 1] for p in ps]
            logp = torch.log_softmax(lg[b, ps].double(), -1)
            vals.append(float(-logp[range(len(ps)), tg].mean()))
            own = lg[b, ps, tg]
            ranks.append(float(((lg[b, ps] > own[:, None]).sum(-1) + 1).double().mean()))
        out.append((vals, ranks))
    return out[:-1], out[-1]


CASES = {
    "induction": ("factory: mi_spec.zoo:induction_2l", "{kind: loss, at: tail}", "toy", 100, ""),
    "gpt2": (GPT2, "{kind: loss, at: tail}", "gpt2", 40, ""),
    "mse": (
        f"factory: reference.regression_model:regression_mlp\n  adapter: {ADAPTER}",
        "{kind: mse, at: tail, target: y}",
        "regression",
        40,
        "mse",
    ),
    "mae": (
        f"factory: reference.regression_model:regression_mlp\n  adapter: {ADAPTER}",
        "{kind: mae, at: tail, target: y}",
        "regression",
        40,
        "mae",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lens_equals_plain_pytorch(tmp_path, case):
    """Every lens point (metric and target rank) = the plain readout of the hooked residual
    stream to 1e-5; the last point is the model's own output; rows split over jobs and passes."""
    model_line, metric_line, family, vocab, numeric = CASES[case]
    study, plan = compile_file(_write(tmp_path, model_line, metric_line, vocab))
    state = loaded_for(plan, model=study.model)
    calls = []
    real_run = state.engine.run
    state.engine.run = lambda ids, *a, **k: calls.append(len(ids)) or real_run(ids, *a, **k)
    try:
        results = [run_logit_lens(job, plan, state.engine, state.data) for job in plan.jobs]
    finally:
        del state.engine.run
    # the pass count `mi-spec plan` shows is the number of forward passes the op makes
    assert len(calls) == sum(j.forward_passes(plan.max_batch_rows) for j in plan.jobs)
    assert max(calls) <= plan.max_batch_rows
    for job, got in zip(plan.jobs, results, strict=True):
        rows = list(job.rows)
        n = state.data.lengths[rows[0]]
        pos = [list(range(n - 4, n - 1)) if job.experiment == "tail" else [1, 2]] * len(rows)
        lens, model_out = _reference(study.model.module, family, state.data, rows, pos,
                                     numeric or "loss")  # fmt: skip
        assert len(got.variants) == study.dims.n_layers + 1
        want = np.array([v for v, _ in lens])
        np.testing.assert_allclose(np.array(got.variants), want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got.clean, model_out[0], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got.variants[-1], got.clean, atol=1e-5, rtol=1e-5)
        if not numeric:
            np.testing.assert_array_equal(np.array(got.extra["rank"]), [r for _, r in lens])
            np.testing.assert_array_equal(got.extra["clean_rank"], model_out[1])
        assert np.ptp(want) > 1e-3  # the layers differ: the comparison is not vacuous
    points = study.dims.n_layers + 1  # rows 6 + 4 per experiment, at most 7 rows a pass
    want = sum(-(-b // 7) + -(-b * points // 7) for b in (6, 4))
    assert sum(j.forward_passes(plan.max_batch_rows) for j in plan.jobs_for("tail")) == want


def test_hypothesis_file_runs_and_is_labelled_correlational():
    with capture_figures() as saved:
        run = api.run(ROOT / "hypotheses" / "induction_logit_lens.yaml", InMemoryTracker(),
                      cache_dir=None, runner="synchronous")  # fmt: skip
    assert len(saved) == 2 and all(check_figure(s.figure) == [] for s in saved)
    repeat, first = run.reports
    m = repeat.metrics
    assert m["lens.loss.L0.resid_pre"] > 3.0 > 0.5 > m["lens.loss.L1.resid_post"]
    assert abs(m["lens.loss.L1.resid_post"] - m["lens.loss.model"]) < 1e-5
    assert m["lens.rank.L1.resid_post"] < 1.5 < 10 < m["lens.rank.L0.resid_pre"]
    assert m["lens.loss.L0.resid_pre.ci_low"] <= m["lens.loss.L0.resid_pre"]
    assert m["lens.loss.L0.resid_pre"] <= m["lens.loss.L0.resid_pre.ci_high"]
    assert repeat.params["first_top1_layer"] == "L1.resid_post"
    assert first.params["first_top1_layer"] == "none" and first.metrics["lens.loss.model"] > 3
    for rep in run.reports:
        assert rep.params["evidence"] == "correlational"
        assert b"validate it causally" in rep.files["notes.md"]
        assert len(rep.tables["lens.csv"]) == 3
        image = matplotlib.image.imread(io.BytesIO(rep.figures["logit_lens.png"]), format="png")
        assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 0.01
    api.validate(ROOT / "hypotheses" / "induction_logit_lens.yaml")


def test_bad_role_and_missing_target_are_located(tmp_path):
    path = _write(tmp_path, "factory: mi_spec.zoo:induction_2l", "{kind: loss, at: tail}", 100)
    path.write_text(path.read_text().replace("at: early", "at: nowhere"))
    with pytest.raises(SpecError, match=r"h\.yaml:\d+:\d+: experiments\.1: unknown position"):
        compile_file(path)
    path.write_text(path.read_text().replace("{kind: loss, at: tail}", "{kind: mse, at: tail}"))
    with pytest.raises(SpecError, match=r"metric: .*mse needs a `target` column"):
        compile_file(path)


def test_scrubbing_loss_recovered_on_mse(tmp_path):
    """Numeric outputs: scrubbing's loss recovered is defined on mse. On the regression model the
    true per-position hypothesis recovers it all; dropping the embedding does not; the model's
    mse equals a direct computation."""
    rng = random.Random(0)
    model = regression_mlp()
    with open(tmp_path / "rows.jsonl", "w") as f:
        for _ in range(40):
            toks = [rng.randrange(4) for _ in range(8)]
            with torch.no_grad():
                y = float(model(torch.tensor([toks]))[0, 5, 0]) + rng.gauss(0, 0.01)
            f.write(json.dumps({"tokens": toks, "y": y}) + "\n")
    path = tmp_path / "h.yaml"
    path.write_text(f"""
name: reg
model:
  factory: reference.regression_model:regression_mlp
  adapter: {ADAPTER}
data: {{path: rows.jsonl, positions: {{mid: 5}}}}
metric: {{kind: mse, at: mid, target: y}}
variables:
  tok: {{value: "tokens[pos]", per_position: true}}
  h0: {{value: "tok[pos]", per_position: true}}
  h1: {{value: "tok[pos] * 10 + h0[pos]", per_position: true}}
correspondence: {{tok: [embed], h0: [L0.mlp_out], h1: [L1.mlp_out]}}
experiments:
  - {{kind: causal_scrubbing, samples: 16, output: [tok, h0, h1],
      controls: {{n_random: 0, drop_one: true, min_agreeing: 3}}}}
""")
    (rep,) = api.run(path, InMemoryTracker(), cache_dir=None, runner="synchronous").reports
    m = rep.metrics
    study, plan = compile_file(path)
    rows = list(plan.jobs[0].rows)
    with torch.no_grad():
        out = model(torch.tensor([study.data.tokens[r] for r in rows]))[:, 5, 0].double()
    want = float(((out - torch.tensor([study.data.columns["y"][r] for r in rows])) ** 2).mean())
    assert m["scrub.loss_model"] == pytest.approx(want, rel=1e-4)
    assert m["scrub.loss_random"] > 100 * m["scrub.loss_model"]
    assert m["scrub.loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert m["scrub.drop.embed"] < 0.5


def test_float64_model(tmp_path):
    """``dtype: float64`` runs the model in double precision: the last lens point equals the
    model's output to 1e-12, and the numbers agree with the float32 run to float32 precision."""
    path = _write(tmp_path, "factory: mi_spec.zoo:induction_2l", "{kind: loss, at: tail}", 100)
    out = {}
    for dtype in ("float32", "float64"):
        path.write_text(path.read_text().replace("induction_2l\n", f"induction_2l\n  dtype: {dtype}\n")
                        if "dtype" not in path.read_text()
                        else path.read_text().replace("dtype: float32", f"dtype: {dtype}"))  # fmt: skip
        study, plan = compile_file(path)
        assert next(study.model.module.parameters()).dtype == getattr(torch, dtype)
        state = loaded_for(plan, model=study.model)
        out[dtype] = [run_logit_lens(j, plan, state.engine, state.data) for j in plan.jobs]
    for r32, r64 in zip(out["float32"], out["float64"], strict=True):
        np.testing.assert_allclose(r64.variants[-1], r64.clean, atol=1e-12)
        np.testing.assert_allclose(r64.variants, r32.variants, atol=1e-4)
