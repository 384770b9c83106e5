"""Benchmark: the batched causal-scrubbing engine against the recursive reference (one plain forward
per tree node), on the same compiled trees, in one run.

Cases: the hand-built induction model (``hypotheses/handbuilt_scrub.yaml``, per-position variables,
a split head) and a GPT-2-architecture model built from a config (4 layers, n_embd 128, random init)
with per-position and per-example variables, a split head and an MLP. For each: tree nodes, forward
passes and wall time of each implementation (the reference's clean forwards included), the speed-up,
and the largest difference between their per-example metrics (must be below 1e-5).

    python tests/benchmarks/scrub.py [--samples N] [--threads T]

This is a script, not a test: pytest must not collect it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from reference.hooks import metric_by_hand  # noqa: E402
from reference.scrub import Reference, hyp_of  # noqa: E402

from mi_spec.api import compile_file  # noqa: E402
from mi_spec.execute.metrics import make_targets  # noqa: E402
from mi_spec.execute.ops import op_for  # noqa: E402
from mi_spec.execute.worker import loaded_for  # noqa: E402

__test__ = False

GPT2_STUDY = """
name: bench-scrub-gpt2
model:
  hf_config: {model_type: gpt2, n_layer: 4, n_embd: 128, n_head: 4, vocab_size: 64,
    n_positions: 32, bos_token_id: 0, eos_token_id: 0}
  check_sites: false
data:
  path: rows.jsonl
  positions: {tail: {start: 8, stop: 11}}
metric: {kind: loss, at: tail}
variables:
  tp: {value: "tokens[pos] % 2", per_position: true}
  pa: {value: "tp[pos - 1] if pos > 0 else 0", per_position: true}
  mm: {value: "sum(tp) % 3"}
  q: {value: "pa[pos]", per_position: true}
  k: {value: "tp[pos]", per_position: true}
  v: {value: "mm"}
  o: {value: "q[pos] + k[pos] + v", per_position: true}
correspondence:
  tp: [embed]
  pa: [L1.H1]
  mm: [L2.mlp_out]
  q: ["L3.H2:q"]
  k: ["L3.H2:k"]
  v: ["L3.H2:v"]
  o: [L3.H2]
max_batch_rows: 1024
experiments:
  - {kind: causal_scrubbing, samples: SAMPLES, controls: {n_random: 0, drop_one: false}}
"""


def bench(name: str, path: Path, overrides: list[str]) -> dict:
    study, plan = compile_file(path, overrides)
    state = loaded_for(plan, model=study.model)
    out = {"case": name, "nodes": 0, "engine_passes": 0, "engine_s": 0.0}
    out |= {"ref_forwards": 0, "ref_s": 0.0, "max_diff": 0.0}
    for job in plan.jobs:
        t0 = time.perf_counter()
        result = op_for(job.op)(job, plan, state.engine, state.data)
        out["engine_s"] += time.perf_counter() - t0
        out["engine_passes"] += result.extra["passes"]
        out["nodes"] += len(job.params["nodes"])
        targets = make_targets(study.spec.metric, state.data, list(job.rows), study.positions)
        for variant, got in zip(job.params["variants"], result.variants, strict=True):
            hyp = hyp_of(study, variant)
            ref = Reference(study.model.module, plan.sites, state.data, job.params, hyp)
            t0 = time.perf_counter()
            logits = torch.stack([ref.root_logits(k) for k in variant["roots"]])
            out["ref_s"] += time.perf_counter() - t0
            out["ref_forwards"] += ref.forwards
            want = metric_by_hand("loss", logits, targets.pos.tolist(), targets.target.tolist())
            diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
            out["max_diff"] = max(out["max_diff"], diff)
    out["speedup"] = out["ref_s"] / out["engine_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    handbuilt = ROOT / "hypotheses" / "handbuilt_scrub.yaml"
    over = [f"experiments.0.samples={args.samples}", "experiments.0.seeds=[0]"]
    over += ["experiments.0.controls.n_random=0", "experiments.0.controls.drop_one=false"]
    rows.append(bench("handbuilt induction (toy)", handbuilt, over))
    with tempfile.TemporaryDirectory() as tmp:
        rng = random.Random(0)
        with open(Path(tmp) / "rows.jsonl", "w") as f:
            for _ in range(200):
                f.write(json.dumps({"tokens": [rng.randrange(64) for _ in range(12)]}) + "\n")
        study = Path(tmp) / "h.yaml"
        study.write_text(GPT2_STUDY.replace("SAMPLES", str(args.samples)))
        rows.append(bench("gpt2 4x128, mlp + split head", study, []))
    cols = ["case", "nodes", "engine_passes", "engine_s", "ref_forwards", "ref_s", "speedup"]
    print(" | ".join(cols + ["max_diff"]))
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print(" | ".join(cells + [f"{r['max_diff']:.1e}"]))
        assert r["max_diff"] < 1e-5, r


if __name__ == "__main__":
    main()
