"""The same studies on the GPU and the CPU agree; a bf16 model keeps an fp32, orthogonal DAS
rotation on the GPU; a sharded checkpoint loads onto the GPU with device_map."""

from __future__ import annotations

import pytest
import torch

from mi_spec.api import compile_file, validate
from mi_spec.execute import das_op
from mi_spec.execute.worker import execute_job, loaded_for

PATCHING = (
    "experiments:\n  - {kind: activation_patching, name: heads, sites: ['L*.H*', 'L1.resid_pre'],"
    " positions: [mid], samples: 8, batch_size: 8}\n"
)
FP32_ATOL = 1e-4
BF16_ATOL = 0.01  # as the CPU bf16-vs-fp32 test states (measured there: 1.5e-3)


def _values(path, overrides):
    validate(path, overrides)
    _, plan = compile_file(path, overrides)
    state = loaded_for(plan)
    results = [execute_job(plan, job) for job in plan.jobs]
    clean = torch.tensor([v for r in results for v in r.clean], dtype=torch.float64)
    variants = torch.tensor([v for r in results for row in r.variants for v in row])
    return state.model.device, clean, variants


@pytest.mark.parametrize(("dtype", "atol"), [("float32", FP32_ATOL), ("bfloat16", BF16_ATOL)])
def test_patching_on_gpu_equals_cpu(study_file, dtype, atol):
    path = study_file(PATCHING)
    cpu_dev, cpu_clean, cpu_var = _values(path, ["model.device=cpu", f"model.dtype={dtype}"])
    gpu_dev, gpu_clean, gpu_var = _values(path, ["model.device=cuda", f"model.dtype={dtype}"])
    assert cpu_dev.type == "cpu" and gpu_dev.type == "cuda"
    assert (gpu_clean - cpu_clean).abs().max() < atol
    assert (gpu_var - cpu_var).abs().max() < atol
    assert (cpu_var.reshape(-1, 8) - cpu_clean).abs().max() > 0


EQUALITY = """name: eq
model: {factory: "mi_spec.zoo.equality:equality_mlp", dtype: bfloat16, device: cuda}
data:
  generator: mi_spec.zoo.equality:hierarchical_equality
  params: {n: 1500, seed: 1}
metric: {kind: accuracy, at: last, target: label}
variables:
  WX: {value: "a == b"}
  YZ: {value: "c == d"}
  O:  {value: "WX == YZ"}
experiments:
  - {kind: das, variables: [WX, YZ], site: L0.resid_post@last, intervention: %s,
     pairs: {train: 256, val: 32, test: 64}, training: {epochs: 2, patience: null}}
"""


@pytest.mark.parametrize("kind", ["full", "low_rank", "boundless"])
def test_bf16_model_keeps_fp32_orthogonal_rotation_on_gpu(tmp_path, kind):
    path = tmp_path / "eq.yaml"
    path.write_text(EQUALITY % kind)
    study, plan = compile_file(path)
    state = loaded_for(plan, model=study.model)
    assert next(state.model.module.parameters()).dtype == torch.bfloat16
    assert state.model.device.type == "cuda"
    res = das_op.run_das(plan.jobs[0], plan, state.engine, state.data)
    assert res.extra["rotation_dtype"] == "float32"
    assert res.extra["orthogonality_error"] <= 1e-5


def test_sharded_checkpoint_with_device_map_auto(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from mi_spec.models.load import load_model
    from mi_spec.spec.sections import ModelSection

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=40)).eval()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    loaded = load_model(ModelSection(hf="m", device_map="auto"), tmp_path)
    assert loaded.device.type == "cuda"
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        got = loaded.module(ids.to(loaded.device)).logits.cpu()
    assert torch.allclose(got, want, atol=FP32_ATOL)
