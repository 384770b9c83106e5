"""A custom (non-HF) PyTorch model supported by a declarative YAML adapter: end to end against hooks,
malformed files reported with file and field, and the adapter rebuilt in a fresh worker process."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import procs
import pytest
import torch
import yaml
from reference.custom_model import tiny_lm
from reference.sweep import assert_report_matches, reference_sweep

from mi_spec.api import compile_file, run
from mi_spec.errors import ResolveError, SpecError
from mi_spec.execute import worker
from mi_spec.execute.engine import Engine
from mi_spec.execute.run_job import run_job
from mi_spec.execute.site_check import check_sites
from mi_spec.sites.adapter import adapters, bind_site
from mi_spec.sites.declarative import pick_adapter
from mi_spec.tracking.base import InMemoryTracker

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "hypotheses" / "arch" / "adapters" / "tiny_lm.yaml"
ROLES = {"repeat": list(range(7, 12))}


def positions_of(role, row):
    return [role] if isinstance(role, int) else ROLES[role]


def write_study(tmp_path: Path, adapter: str) -> Path:
    (tmp_path / "h.yaml").write_text(f"""
name: custom-model
model:
  factory: reference.custom_model:tiny_lm
  seed: 3
  adapter: {adapter}
data:
  generator: mi_spec.zoo.tasks:repeated_tokens
  params: {{n: 12, seq_len: 13, seed: 2, d_vocab: 48}}
  positions: {{repeat: {{start: 7, stop: 12}}}}
metric: {{kind: loss, at: repeat}}
experiments:
  - kind: activation_patching
    name: sweep
    sites: [embed, "L*.H*", "L*.H*:q", "L*.KV*:*", "L*.resid_mid", "L1.mlp_in", "L0.mlp_out",
            "L1.attn_out", "L1.resid_post"]
    positions: [repeat, 6]
    source: {{resample: true}}
    samples: 8
    batch_size: 5
""")
    return tmp_path / "h.yaml"


def test_adapter_file_maps_every_site_and_passes_the_contract():
    torch.manual_seed(0)
    model = tiny_lm().eval()
    adapter = pick_adapter(model, str(ADAPTER), ROOT)
    vocab = adapter.vocabulary(model)
    assert adapter.name == "tiny_lm" and len(vocab) == 2 + 2 * (6 + 4 + 4 + 4)
    assert "L1.KV1:v" in vocab and "L1.H1:k" not in vocab  # 2 kv heads for 4 query heads
    k = bind_site(adapter, model, "L1.KV1:k")  # fused [q: 4 heads | k: 2 | v: 2] * 8 columns
    assert (k.module, k.start, k.stop) == ("stack.1.attn.qkv", 40, 48)
    with pytest.raises(ResolveError, match="head 2's key is L0.KV1:k, shared by query heads 2..3"):
        bind_site(adapter, model, "L0.H2:k")
    ids = torch.randint(0, 48, (3, 9), generator=torch.Generator().manual_seed(0))

    def bind(s):
        return bind_site(adapter, model, s)

    check_sites(Engine(model, ids[:1]), [bind(s) for s in vocab], ids, torch.ones_like(ids),
                bind=bind, n_layers=2)  # fmt: skip


@pytest.mark.parametrize("form", ["file", "inline"])
def test_custom_model_runs_end_to_end_and_equals_hooks(tmp_path, form):
    if form == "file":
        (tmp_path / "adapters").mkdir()
        shutil.copy(ADAPTER, tmp_path / "adapters" / "mine.yaml")
        adapter = "adapters/mine.yaml"  # relative to the hypothesis file
    else:
        adapter = json.dumps(yaml.safe_load(ADAPTER.read_text()))
    tracker = InMemoryTracker()
    result = run(write_study(tmp_path, adapter), tracker, runner="synchronous", cache_dir=None)
    assert tracker.params["model.adapter"] == "tiny_lm"
    state = worker.loaded_for(result.plan)
    assert type(state.model.module).__name__ == "TinyLM"
    clean, values = reference_sweep(
        state.model.module, result.plan, state.data, "sweep", positions_of
    )
    assert len(values) == 2 * (1 + 8 + 8 + 8 + 2 + 4)
    assert assert_report_matches(result.reports[0], clean, values) > 0.05


BAD = {
    "unknown site kind": (
        lambda a: a["sites"].update(attn_outt="stack.{layer}.attn.out"),
        r"tiny_lm.yaml:\d+:\d+: sites.attn_outt: unknown site kind 'attn_outt' "
        r"\(did you mean 'attn_out'\?\)",
    ),
    "module that does not exist": (
        lambda a: a["sites"].update(mlp_out="stack.{layer}.ffn"),
        r"tiny_lm.yaml:\d+:\d+: sites.mlp_out: no module 'stack.0.ffn' in the model \(layer 0\)",
    ),
    "missing dimension": (
        lambda a: a["dims"].pop("d_head"),
        r"tiny_lm.yaml:\d+:\d+: dims.d_head: required field is missing",
    ),
    "dimension the model lacks": (
        lambda a: a["dims"].update(d_model="config.width"),
        r"dims.d_model: cannot read 'config.width' from the model: TinyConfig has no attribute "
        r"'width' \(it has: d_head, ",
    ),
    "wrong fused block": (
        lambda a: a["sites"].update(
            v={"module": "stack.{layer}.attn.qkv", "block": 2, "layout": "heads"}
        ),  # fmt: skip
        r"sites.v.layout: layout 'heads' needs n_kv_heads == n_heads",
    ),
    "head columns beyond the module": (
        lambda a: a["sites"].update(k={"module": "stack.{layer}.attn.out", "block": 1}),
        r"sites.k: 'k' heads need columns up to 48, but 'stack.\{layer\}.attn.out' has 32",
    ),
    "layer placeholder missing": (
        lambda a: a["sites"].update(resid_post="stack.0"),
        r"sites.resid_post: module template 'stack.0': a 'resid_post' site needs \{layer\}",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_adapter_file_names_file_and_field(tmp_path, case):
    edit, pattern = BAD[case]
    data = yaml.safe_load(ADAPTER.read_text())
    edit(data)
    bad = tmp_path / "tiny_lm.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ResolveError, match=pattern) as err:
        pick_adapter(tiny_lm(), "tiny_lm.yaml", tmp_path)
    assert f"declarative adapter {bad}: 1 problem:" in str(err.value)
    with pytest.raises(SpecError) as located:  # and from a hypothesis: located at model.adapter
        compile_file(write_study(tmp_path, "tiny_lm.yaml"))
    assert "h.yaml:6:12: model.adapter: declarative adapter" in str(located.value)
    assert str(bad) in str(located.value)


def test_all_problems_reported_at_once(tmp_path):
    data = yaml.safe_load(ADAPTER.read_text())
    data["sites"]["qq"] = "stack.{layer}.attn.qkv"
    data["sites"]["mlp_out"] = "stack.{layer}.ffn"
    data["matches"] = ["OtherModel"]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ResolveError, match="3 problems") as err:
        pick_adapter(tiny_lm(), "a.yaml", tmp_path)
    for field in ("sites.qq", "sites.mlp_out", "matches: describes OtherModel"):
        assert field in str(err.value)
    with pytest.raises(ResolveError, match="adapter file not found"):
        pick_adapter(tiny_lm(), "gone.yaml", tmp_path)


def test_fresh_worker_process_rebuilds_the_declarative_adapter(tmp_path):
    """A worker sees only the plan: it reloads the model section and the adapter file itself."""
    (tmp_path / "adapters").mkdir()
    shutil.copy(ADAPTER, tmp_path / "adapters" / "tiny_lm.yaml")
    study, plan = compile_file(write_study(tmp_path, "adapters/tiny_lm.yaml"))
    assert "tiny_lm" not in adapters()  # never registered globally
    job = plan.jobs[0]
    local = run_job(job, plan, Engine(study.model.module, torch.tensor([[1, 2, 3]])), study.data)

    worker._LOADED.clear()  # this process, as a worker that never resolved the study
    state = worker.loaded_for(plan)
    assert state.model is not study.model and state.model.adapter.name == "tiny_lm"
    want = flat(local.variants)
    clean = flat([local.clean] * len(job.variants))
    assert max(abs(v - c) for v, c in zip(want, clean, strict=True)) > 0.05  # real effects
    assert flat(worker.execute_job(plan, job).variants) == pytest.approx(want, abs=1e-6)

    (tmp_path / "plan.json").write_text(plan.to_json())
    script = (
        "import json, sys\n"
        "from mi_spec.plan.ir import Plan\n"
        "from mi_spec.execute.worker import execute_job, loaded_for\n"
        "plan = Plan.from_json(open(sys.argv[1]).read())\n"
        "state = loaded_for(plan)\n"
        "res = execute_job(plan, plan.jobs[0])\n"
        "print(json.dumps({'adapter': state.model.adapter.name, 'variants': res.variants}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}  # where the factory lives
    out = procs.run(  # its own process group, ended whatever happens; a generous limit
        [sys.executable, "-c", script, str(tmp_path / "plan.json")], env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert fresh["adapter"] == "tiny_lm"
    assert flat(fresh["variants"]) == pytest.approx(want, abs=1e-6)


def flat(rows) -> list[float]:
    return [float(x) for row in rows for x in row]
