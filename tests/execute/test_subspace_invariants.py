"""The three invariants of a subspace site, through the engine, on the bundled induction model and
on GPT-2: a self-patch is the identity; the full space is the whole site; a patch changes the
activation inside the subspace only (read back downstream, at the same tensor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_rows
from reference.models import TINY_MODELS

from mi_spec.api import compile_file
from mi_spec.execute.engine import Read, Write
from mi_spec.execute.worker import loaded_for

MODELS = {"induction": "factory: mi_spec.zoo:induction_2l", "gpt2": TINY_MODELS["gpt2"]}
WIDTH = {"induction": 64, "gpt2": 32}


def study(tmp_path, model: str):
    d = WIDTH[model]
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(d, 5, generator=g, dtype=torch.float64))[0]
    np.save(tmp_path / "dirs.npy", basis.numpy())
    np.save(tmp_path / "full.npy", np.eye(d))
    write_rows(tmp_path / "rows.jsonl", n=6, length=12)
    (tmp_path / "h.yaml").write_text(f"""
name: invariants
model:
  {MODELS[model]}
data: {{path: rows.jsonl}}
metric: {{kind: loss, at: 5}}
subspaces:
  dirs: {{basis: dirs.npy}}
  full: {{basis: full.npy}}
experiments:
  - {{kind: activation_patching, sites: ["L0.resid_post[dirs]", "L0.resid_post[full]",
      "L0.resid_post", "L1.resid_pre"], positions: [all]}}
""")
    s, plan = compile_file(tmp_path / "h.yaml")
    state = loaded_for(plan, model=s.model)
    ids, mask = (torch.tensor(x) for x in state.data.padded(list(range(6))))
    return plan.sites, state.engine, ids, mask, basis.float()


@pytest.mark.parametrize("model", ["induction", "gpt2"])
def test_subspace_invariants(tmp_path, model):
    sites, engine, ids, mask, basis = study(tmp_path, model)
    sub, full, whole, after = (
        sites[k] for k in ("L0.resid_post[dirs]", "L0.resid_post[full]", "L0.resid_post",
                           "L1.resid_pre")
    )  # fmt: skip
    clean, got = engine.run(ids, mask, reads=[Read("c", sub, None), Read("x", whole, None)])
    coords, x = got["c"], got["x"]
    assert torch.allclose(coords, x @ basis, atol=1e-5)
    # a self-patch is the identity
    same, _ = engine.run(ids, mask, writes=[Write(sub, slice(None), None, coords)])
    assert torch.allclose(same, clean, atol=1e-6)
    # the full space is the whole site: other rows' coordinates = other rows' activations
    perm = torch.roll(torch.arange(6), 1)
    _, got = engine.run(ids, mask, reads=[Read("f", full, None)])
    via_full, _ = engine.run(ids, mask, writes=[Write(full, slice(None), None, got["f"][perm])])
    via_site, _ = engine.run(ids, mask, writes=[Write(whole, slice(None), None, x[perm])])
    assert torch.allclose(via_full, via_site, atol=1e-5)
    assert not torch.allclose(via_site, clean, atol=1e-3)  # the patch did something
    # a patch moves the activation inside the subspace only, to the source's coordinates
    _, got = engine.run(
        ids, mask, reads=[Read("y", after, None)],
        writes=[Write(sub, slice(None), None, coords[perm])],
    )  # fmt: skip
    change = got["y"] - x
    proj = basis @ basis.T
    assert (change - change @ proj).abs().max() < 1e-5  # the complement is untouched
    assert torch.allclose(got["y"] @ basis, coords[perm], atol=1e-5)
    assert change.abs().max() > 1e-2
