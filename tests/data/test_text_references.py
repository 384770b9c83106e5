"""Path patching and attribution on IOI-style text rows of different lengths, with a text
counterfactual of another length, against plain-PyTorch references that handle each row alone.

The references share nothing with mi_spec's executor: the prompts are re-generated and tokenized
with the Hugging Face tokenizer directly, each row and its counterfactual run alone (no padding),
roles are read off the generator's columns (``end`` = the row's own last token), path patching
freezes every head output and MLP output (the textbook rule, not mi_spec's freeze list) with
plain hooks (``reference.paths``), and attribution estimates come from ``torch.autograd.grad``
on a zero added to the site (``reference.attribution``), themselves checked against central
finite differences of the patched metric on a float64 copy of the model. The logged metrics
(means over examples; normalised effects as mean(patched - clean) / mean(source - clean)) equal
the references' means. ``initializer_range: 0.2`` gives effects of 0.01-1 (GPT-2's 0.02 leaves
head-to-head paths near 1e-6, under the 1e-5 tolerance, so a wrong alignment would not show).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from reference.attribution import metric_rows, node_estimates, node_finite_difference
from reference.hooks import capture, metric_by_hand, patched_logits
from reference.paths import path_patched_logits

from mi_spec.api import compile_file
from mi_spec.compile.planner import compile_context
from mi_spec.execute.ops import op_for
from mi_spec.execute.worker import loaded_for
from mi_spec.experiments.base import kinds
from mi_spec.zoo import ioi

N, SEED, LAYERS, HEADS, WIDTH = 10, 1, 2, 4, 32
SENDERS = ["L0.H1", "L0.mlp_out"]
RECEIVERS = ["L1.H2:q", "L1.H0:v", "logits"]
ATTR_SITES = ["L0.H1", "L1.H0", "L1.H3", "L0.mlp_out", "L1.mlp_out"]
ROLES = ["end", "S2", "IO"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return ioi.train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)


def study_file(tmp_path, tokenizer, vocab: int, padding: str) -> str:
    path = tmp_path / f"ioi-ref-{padding}.yaml"
    path.write_text(f"""
name: ioi-ref-{padding}
model:
  hf_config: {{model_type: gpt2, n_layer: {LAYERS}, n_embd: {WIDTH}, n_head: {HEADS}, vocab_size: {vocab}, n_positions: 40, initializer_range: 0.2}}
data:
  generator: mi_spec.zoo.ioi:rows
  params: {{n: {N}, seed: {SEED}}}
  text: text
  tokenizer: {tokenizer}
  padding_side: {padding}
  positions:
    S2: {{column: s2_pos, counterfactual: cf_s2_pos}}
    IO: {{column: io_pos, counterfactual: cf_io_pos}}
    end: -1
metric: {{kind: logit_diff, at: end, target: io, wrong: s}}
max_batch_rows: 16
experiments:
  - kind: path_patching
    name: path
    senders: {SENDERS}
    receivers: {RECEIVERS}
    positions: [end, S2]
    receiver_positions: [all, end]
    source: {{column: cf_text}}
    batch_size: 4
  - {{kind: attribution_patching, name: attr, sites: {ATTR_SITES}, positions: {ROLES}, source: {{column: cf_text}}, verify: {{top_k: 3}}, batch_size: 6}}
""")
    return str(path)


def run_study(tmp_path, tokenizer, vocab: int, padding: str, experiment: str):
    """The study's ``experiment`` run batched by mi_spec: study, plan, results by job id."""
    study, plan = compile_file(study_file(tmp_path, tokenizer, vocab, padding))
    state = loaded_for(plan, model=study.model)
    assert state.engine.padding_side == padding
    jobs = plan.jobs_for(experiment)
    results = {job.id: op_for(job.op)(job, plan, state.engine, state.data) for job in jobs}
    return study, plan, results


def row_alone(hf_tokenizer, row: dict) -> dict:
    """One generated row, tokenized on its own: base and counterfactual ids (one row, no
    padding), each role's position in both, and the metric's target ids."""
    ids = hf_tokenizer(row["text"])["input_ids"]
    cf = hf_tokenizer(row["cf_text"])["input_ids"]
    assert len(ids) == len(row["text"].split()) and len(cf) == len(row["cf_text"].split())
    return {
        "base": (torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)),
        "source": (torch.tensor([cf]), torch.ones(1, len(cf), dtype=torch.long)),
        "pos": {"end": len(ids) - 1, "S2": row["s2_pos"], "IO": row["io_pos"]},
        "cf_pos": {"end": len(cf) - 1, "S2": row["cf_s2_pos"], "IO": row["cf_io_pos"]},
        "target": hf_tokenizer.convert_tokens_to_ids(row["io"]),
        "wrong": hf_tokenizer.convert_tokens_to_ids(row["s"]),
    }


def logit_diff_at_end(r: dict, logits: torch.Tensor) -> float:
    (value,) = metric_by_hand(
        "logit_diff", logits, [[logits.shape[1] - 1]], [[r["target"]]], [[r["wrong"]]]
    )
    return value


def whole(module: str, io: str) -> SimpleNamespace:
    return SimpleNamespace(
        name=f"{module}.{io}", module=module, io=io, start=None, stop=None, in_place=False
    )


def textbook_freeze() -> list[SimpleNamespace]:
    """Every head output (each layer's c_proj input, all heads) and every MLP output."""
    out = []
    for layer in range(LAYERS):
        out.append(whole(f"transformer.h.{layer}.attn.c_proj", "input"))
        out.append(whole(f"transformer.h.{layer}.mlp", "output"))
    return out


def path_reference(model, plan, r: dict, label: str, receivers: list[str], rpos) -> float:
    """The pair's metric for one row alone: sender ``label``'s source value at its role (the
    role's position in the counterfactual into its position in the base), textbook freeze."""
    sender, role = label.split("->")[0].split("@")
    logits = path_patched_logits(
        model,
        r["base"],
        r["source"],
        plan.sites[sender],
        ([[r["pos"][role]]], [[r["cf_pos"][role]]]),
        [plan.sites[s] for s in receivers],
        None if rpos is None else [[r["pos"][rpos]]],
        textbook_freeze(),
    )
    return logit_diff_at_end(r, logits)


@pytest.fixture(scope="module")
def rows(hf_tokenizer):
    out = [row_alone(hf_tokenizer, row) for row in ioi.rows(n=N, seed=SEED)]
    assert len({r["base"][0].shape[1] for r in out}) > 2  # lengths differ across rows
    assert sum(r["base"][0].shape[1] != r["source"][0].shape[1] for r in out) >= N // 2
    return out


def clean_and_source(model, r: dict) -> tuple[float, float]:
    """The row alone, and its counterfactual alone scored at its own end on the row's targets."""
    with torch.no_grad():
        clean = logit_diff_at_end(r, model(r["base"][0]).logits)
        source = logit_diff_at_end(r, model(r["source"][0]).logits)
    return clean, source


def report(study, plan, results, name: str):
    """The experiment's report (what is logged to MLflow), from the batched results."""
    (exp,) = [e for e in study.spec.experiments if e.label == name]
    jobs = plan.jobs_for(name)
    return kinds()[exp.kind].analyse(
        exp, compile_context(study), jobs, [results[j.id] for j in jobs]
    )


@pytest.mark.parametrize("padding", ["right", "left"])
def test_path_patching_equals_per_row_hooks(tmp_path, tokenizer, hf_tokenizer, rows, padding):
    study, plan, results = run_study(tmp_path, tokenizer, len(hf_tokenizer), padding, "path")
    model = study.model.module
    jobs = plan.jobs_for("path")
    labels = [v.label for v in jobs[0].variants]
    assert len(labels) == len(SENDERS) * 2 * len(RECEIVERS) * 2
    ref_clean, ref_source, ref = {}, {}, {}  # by dataset row
    worst = 0.0
    for job in jobs:
        got = results[job.id]
        assert len(job.rows) > 1  # batched, so padded
        for i, row in enumerate(job.rows):
            r = rows[row]
            ref_clean[row], ref_source[row] = clean_and_source(model, r)
            assert got.clean[i] == pytest.approx(ref_clean[row], abs=1e-5)
            assert got.source[i] == pytest.approx(ref_source[row], abs=1e-5)
            ref[row] = [
                path_reference(model, plan, r, label, receivers, rpos)
                for label, receivers, rpos in zip(
                    labels, job.params["receivers"], job.params["receiver_pos"], strict=True
                )
            ]
            for p, label in enumerate(labels):
                assert got.variants[p][i] == pytest.approx(ref[row][p], abs=1e-5), (label, row)
                worst = max(worst, abs(got.variants[p][i] - ref[row][p]))
    assert sorted(ref) == list(range(N))
    # what is logged: the mean over examples of (patched - clean), and its ratio to the
    # mean of (source - clean)
    clean = np.array([ref_clean[k] for k in range(N)])
    source = np.array([ref_source[k] for k in range(N)])
    effects = np.array([ref[k] for k in range(N)]).T - clean  # [pairs, N]
    assert np.abs(effects).max() > 1e-3  # the paths carry something
    rep = report(study, plan, results, "path")
    assert rep.metrics["path.metric.clean"] == pytest.approx(clean.mean(), abs=1e-5)
    assert rep.metrics["path.metric.source"] == pytest.approx(source.mean(), abs=1e-5)
    table = rep.tables["paths.csv"]
    assert len(table) == len(labels)
    for p, line in enumerate(table):
        assert labels[p].startswith(f"{line['sender']}@{line['sender_position']}->")
        assert line["effect"] == pytest.approx(effects[p].mean(), abs=1e-5)
        norm = effects[p].mean() / (source - clean).mean()
        assert line["effect_norm"] == pytest.approx(norm, rel=1e-4, abs=1e-5)
    print(
        f"path patching ({padding} padding): {len(labels)} pairs x {N} rows, max |diff| "
        f"{worst:.2e}, largest |effect| {np.abs(effects).max():.3f}"
    )


def attribution_reference(model, plan, r: dict, label: str, finite: bool = False) -> float:
    """Item ``label``'s gradient x (source - base) for one row alone (the role's position in
    the counterfactual against its position in the base); ``finite``: instead the central
    finite difference of the patched metric along (source - base)."""
    site_name, role = label.split("@")
    at = ([[r["pos"][role]]], [[r["cf_pos"][role]]])

    def metric(logits):
        end = [[logits.shape[1] - 1]]
        return metric_rows("logit_diff", logits, end, [[r["target"]]], [[r["wrong"]]])

    how = node_finite_difference if finite else node_estimates
    (value,) = how(model, r["base"], r["source"], plan.sites[site_name], *at, metric)
    return value


def patched_effect(model, plan, r: dict, label: str, clean: float) -> float:
    """Activation patching of the row alone at the item, minus its clean metric."""
    site_name, role = label.split("@")
    site = plan.sites[site_name]
    value = capture(model, *r["source"], [site])[site.name][0, r["cf_pos"][role]]
    edit = (site, [[r["pos"][role]]], lambda row_, p, v=value[site.start : site.stop]: v)
    return logit_diff_at_end(r, patched_logits(model, *r["base"], [edit])) - clean


@pytest.mark.parametrize("padding", ["right", "left"])
def test_attribution_equals_per_row_autograd(tmp_path, tokenizer, hf_tokenizer, rows, padding):
    study, plan, results = run_study(tmp_path, tokenizer, len(hf_tokenizer), padding, "attr")
    model = study.model.module
    model64 = copy.deepcopy(model).double()
    (job,) = plan.jobs_for("attr")
    got = results[job.id]
    labels, chosen = got.extra["labels"], got.extra["verified"]
    assert len(labels) == len(ATTR_SITES) * len(ROLES) and len(chosen) == 3
    assert list(job.rows) == list(range(N))  # one batch of every row, padded
    est = np.zeros((len(labels), N))
    truth = np.zeros((len(chosen), N))
    clean = np.zeros(N)
    worst_fd = 0.0
    for row in job.rows:
        r = rows[row]
        clean[row], source = clean_and_source(model, r)
        assert got.clean[row] == pytest.approx(clean[row], abs=1e-5)
        assert got.source[row] == pytest.approx(source, abs=1e-5)
        for k, label in enumerate(labels):
            est[k, row] = attribution_reference(model, plan, r, label)
            fd = attribution_reference(model64, plan, r, label, finite=True)
            assert est[k, row] == pytest.approx(fd, rel=1e-4, abs=1e-5), (label, row)
            worst_fd = max(worst_fd, abs(est[k, row] - fd))
        for j, k in enumerate(chosen):
            truth[j, row] = patched_effect(model, plan, r, labels[k], clean[row])
    np.testing.assert_allclose(got.extra["estimates"], est, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.extra["truth"], truth, rtol=0, atol=1e-5)
    assert np.abs(est).max() > 1e-3
    # the top-ranked items by |mean estimate| are the reference's
    order = np.argsort(-np.abs(est.mean(1)), kind="stable")
    assert set(chosen) == set(order[: len(chosen)].tolist())
    rep = report(study, plan, results, "attr")
    assert rep.metrics["attrib.metric.clean"] == pytest.approx(clean.mean(), abs=1e-5)
    for line in rep.tables["estimates.csv"]:
        k = labels.index(line["label"])
        assert line["estimate"] == pytest.approx(est[k].mean(), abs=1e-5)
        if line["verified"]:
            assert line["true_effect"] == pytest.approx(truth[chosen.index(k)].mean(), abs=1e-5)
    print(
        f"attribution ({padding} padding): {len(labels)} items x {N} rows, max |diff| "
        f"{np.abs(np.asarray(got.extra['estimates']) - est).max():.2e}, max |autograd - "
        f"finite difference| {worst_fd:.2e}"
    )
