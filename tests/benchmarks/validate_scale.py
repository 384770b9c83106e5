"""Benchmark: ``mi-spec validate`` on a GPT-2-small-size model (12 layers, 768 wide, 12 heads,
vocabulary 50,257, random init from ``hf_config``), 64 rows x 64 tokens, a sweep over all 144
heads and every ``resid_pre`` at two positions. Goal: under 15 s on a 2-core CPU.

Prints the stages of ``validate`` (resolve: model build + identity; compile; site checks) with
the site checks' pass count, and, as "before", the cost the old site checks would have had
(one pass of the same 4 rows x 64 tokens per site, plus one per layer for the residual
identities and one per residual site): it times ``--before-passes`` such passes and
extrapolates, since running them all takes minutes. Also times the model identity of a
``--checkpoint-mb`` safetensors checkpoint saved here (first digest, then from the sidecar).

    python tests/benchmarks/validate_scale.py [--threads 2] [--before-passes 3] [--checkpoint-mb 1024]

This is a script, not a test: pytest must not collect it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

__test__ = False

LAYERS, WIDTH, HEADS, VOCAB = 12, 768, 12, 50257
N_DATA, TOKENS = 64, 64
GOAL_S = 15.0

STUDY = """
name: bench-validate-scale
model:
  hf_config: {{model_type: gpt2, n_layer: {layers}, n_embd: {width}, n_head: {heads},
    vocab_size: {vocab}, n_positions: 1024, bos_token_id: 0, eos_token_id: 0}}
  device: cpu
data:
  path: rows.jsonl
  positions: {{mid: 32, end: -2}}
metric: {{kind: loss, at: end}}
experiments:
  - {{kind: activation_patching, name: heads, sites: ['L*.H*', 'L*.resid_pre'],
      positions: [mid, end], samples: 32, batch_size: 32}}
"""


def write_study(folder: Path) -> Path:
    rng = random.Random(0)
    with open(folder / "rows.jsonl", "w") as f:
        for _ in range(N_DATA):
            f.write(json.dumps({"tokens": [rng.randrange(VOCAB) for _ in range(TOKENS)]}) + "\n")
    text = STUDY.format(layers=LAYERS, width=WIDTH, heads=HEADS, vocab=VOCAB)
    (folder / "h.yaml").write_text(text)
    return folder / "h.yaml"


def stages(path: Path) -> tuple[dict[str, float], object, object]:
    """``api.validate`` split into its stages, timed."""
    from mi_spec.api import check_plan_sites
    from mi_spec.compile.data_check import check_data
    from mi_spec.compile.planner import compile_plan
    from mi_spec.compile.resolve import load_spec, resolve

    times: dict[str, float] = {}
    t = time.perf_counter()
    spec, doc = load_spec(path)
    study = resolve(spec, doc)
    times["resolve (build model, identity)"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = compile_plan(study)
    assert not check_data(study, plan)
    times["compile"] = time.perf_counter() - t
    t = time.perf_counter()
    check_plan_sites(study, plan)
    times["site checks (incl. engine probe pass)"] = time.perf_counter() - t
    return times, study, plan


def old_site_check_estimate(study, plan, passes: int) -> tuple[float, int]:
    """Seconds of the old checks: time ``passes`` passes of 4 rows x all tokens, times their
    count (1 clean + 1 per site + 1 per layer + 1 per residual site)."""
    from mi_spec.execute.worker import loaded_for

    state = loaded_for(plan, model=study.model)
    ids, mask = (torch.tensor(x) for x in state.data.padded(list(range(4))))
    n_sites = len(plan.sites)
    n_resid = sum(1 for s in plan.sites.values() if ".resid_" in s.name and s.start is None)
    count = 1 + n_sites + study.dims.n_layers + n_resid
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        with torch.no_grad():
            state.engine.run(ids, mask)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * count, count


def identity_timing(folder: Path, megabytes: int) -> tuple[float, float, float]:
    """Save a ~``megabytes`` safetensors checkpoint; (size GB, first identity s, cached s)."""
    from safetensors.torch import save_file

    from mi_spec.models import identity

    n = megabytes * (1 << 20) // 4 // 4096
    path = folder / "big" / "model.safetensors"
    path.parent.mkdir()
    save_file({"w": torch.randn(n, 4096)}, str(path))
    os.environ["MI_SPEC_DIGEST_CACHE"] = str(folder / "digests")
    t = time.perf_counter()
    identity.files_identity(identity.hf_weight_files(path.parent))
    first = time.perf_counter() - t
    identity._MEMO.clear()  # as a fresh process would: read the sidecar
    t = time.perf_counter()
    identity.files_identity(identity.hf_weight_files(path.parent))
    cached = time.perf_counter() - t
    return path.stat().st_size / 1e9, first, cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before-passes", type=int, default=3)
    parser.add_argument("--checkpoint-mb", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from mi_spec.execute.site_check import site_check_cost

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write_study(folder)
        t0 = time.perf_counter()
        times, study, plan = stages(path)
        total = time.perf_counter() - t0
        cost = site_check_cost(plan.sites.values())
        print(f"validate, {LAYERS} layers x {WIDTH} wide, vocab {VOCAB}, {len(plan.sites)} sites")
        for name, seconds in times.items():
            print(f"  {name:<40} {seconds:7.2f} s")
        print(f"  {'total':<40} {total:7.2f} s   goal < {GOAL_S:.0f} s: "
              f"{'met' if total < GOAL_S else 'MISSED'}")  # fmt: skip
        print(f"  {cost.describe()}")
        if args.before_passes:
            before, count = old_site_check_estimate(study, plan, args.before_passes)
            print(f"  before: old site checks ~{before:.0f} s ({count} passes of 4 x {TOKENS}, "
                  f"extrapolated); after: {times['site checks (incl. engine probe pass)']:.1f} s")  # fmt: skip
        if args.checkpoint_mb:
            size, first, cached = identity_timing(folder, args.checkpoint_mb)
            print(f"identity of a {size:.2f} GB safetensors checkpoint: {first:.2f} s first "
                  f"(sha256 of the file), {cached * 1e3:.1f} ms from the sidecar")  # fmt: skip


if __name__ == "__main__":
    main()
