"""Benchmark: attribution patching over every head × position vs exhaustive activation patching
of the same sites, and vs a plain-hook estimate (the floor for the attribution itself).

A GPT-2-architecture model built from a config (``n_layer=6, n_embd=512, n_head=8,
vocab_size=5000``, random init, eval, CPU, 2 threads) and 32 rows × 32 tokens; the metric is the
next-token loss at positions 0..30. Items: 48 heads × 32 positions = 1536 site × position sites.
Cheap cases run ``--repeats`` interleaved rounds (median); exhaustive patching of the 1536
variants through mi_spec's ``patch`` op runs once (one round: minutes). See README.md here.

    python tests/benchmarks/attribution.py [--repeats N] [--quick] [--threads N]

This is a script, not a test: pytest must not collect it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from patching import forward, measure  # this folder: run as a script

from mi_spec.analysis.stats import bootstrap_correlation_ci
from mi_spec.api import compile_file
from mi_spec.execute.attribution_op import estimate_all, run_attribution
from mi_spec.execute.run_job import run_job
from mi_spec.execute.worker import loaded_for
from mi_spec.sites.adapter import SiteBinding

__test__ = False

ROWS, TOKENS, VOCAB, N_DATA, LAYERS, HEADS = 32, 32, 5000, 64, 6, 8
MAX_ROWS = 64  # rows per forward pass for every mi_spec case (patch packs 2 copies of 32 rows)
TOP_K = 20  # the verification a default attribution_patching experiment runs

STUDY = """
name: bench-attribution
model:
  hf_config: {{model_type: gpt2, n_layer: {layers}, n_embd: 512, n_head: {heads},
    vocab_size: {vocab}, n_positions: 64, bos_token_id: 0, eos_token_id: 0}}
  device: cpu
  check_sites: false
data:
  path: rows.jsonl
  positions: {{scored: {{start: 0, stop: -1}}}}
metric: {{kind: loss, at: scored}}
max_batch_rows: {max_rows}
experiments:
  - {{kind: attribution_patching, name: attrib, sites: ["L*.H*"], positions: [all],
      samples: {rows}, verify: {{top_k: {top_k}}}}}
  - {{kind: activation_patching, name: exhaustive, sites: ["L*.H*"], positions: {positions},
      samples: {rows}, batch_size: {rows}}}
"""


def write_study(folder: Path) -> Path:
    rng = random.Random(0)
    with open(folder / "rows.jsonl", "w") as f:
        for _ in range(N_DATA):
            f.write(json.dumps({"tokens": [rng.randrange(VOCAB) for _ in range(TOKENS)]}) + "\n")
    text = STUDY.format(
        layers=LAYERS, heads=HEADS, vocab=VOCAB, rows=ROWS, top_k=TOP_K, max_rows=MAX_ROWS,
        positions=json.dumps(list(range(TOKENS))),
    )  # fmt: skip
    (folder / "h.yaml").write_text(text)
    return folder / "h.yaml"


def hook_estimates(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    src_ids: torch.Tensor,
    src_mask: torch.Tensor,
    heads: Sequence[SiteBinding],
    score: Any,
) -> torch.Tensor:
    """The floor: hooks on each layer's ``c_proj`` input. One no-grad source forward, one base
    forward with a zero tensor added to every z (requires grad), one backward; then
    (z_src - z_base) . dM/dz summed per head: [layers, heads, T, B]."""
    modules = dict(model.named_modules())
    paths = sorted({h.module for h in heads}, key=lambda p: int(p.split(".")[2]))
    per_layer = len(heads) // len(paths)
    src: dict[str, torch.Tensor] = {}
    base: dict[str, torch.Tensor] = {}
    zero: dict[str, torch.Tensor] = {}

    def reader(path: str):
        def hook(_m, args):
            src[path] = args[0].detach()

        return hook

    def adder(path: str):
        def hook(_m, args):
            base[path] = args[0].detach()
            zero[path] = torch.zeros_like(args[0], requires_grad=True)
            return (args[0] + zero[path], *args[1:])

        return hook

    handles = [modules[p].register_forward_pre_hook(reader(p)) for p in paths]
    try:
        forward(model, src_ids, src_mask)
    finally:
        for h in handles:
            h.remove()
    handles = [modules[p].register_forward_pre_hook(adder(p)) for p in paths]
    try:
        logits = model(ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(score(logits).sum(), [zero[p] for p in paths])
    out = []
    for p, g in zip(paths, grads, strict=True):
        prod = ((src[p] - base[p]) * g).view(*g.shape[:2], per_layer, -1).sum(-1)  # [B, T, H]
        out.append(prod.permute(2, 1, 0))  # [H, T, B]
    return torch.stack(out)


def build(folder: Path, repeats: int, warmup: int, sample: int | None) -> None:
    t0 = time.perf_counter()
    study, plan = compile_file(write_study(folder))
    compile_s = time.perf_counter() - t0
    state = loaded_for(plan, model=study.model)
    model, engine, data = study.model.module, state.engine, state.data
    attrib = plan.jobs_for("attrib")[0]
    exhaustive = plan.jobs_for("exhaustive")[0]
    items = attrib.params["items"]
    assert len(items) == LAYERS * HEADS * TOKENS == len(exhaustive.variants)
    assert attrib.rows == exhaustive.rows and attrib.source_rows == exhaustive.source_rows
    labels = [f"{s}@{p}" for s, p in items]
    assert labels == [v.label for v in exhaustive.variants]

    ids, mask = (torch.tensor(x) for x in data.padded(list(attrib.rows)))
    src_ids, src_mask = (torch.tensor(x) for x in data.padded(list(attrib.source_rows)))
    heads = [plan.sites[s] for s, _ in items[::TOKENS]]
    nxt = ids[:, 1:]

    def score(logits: torch.Tensor) -> torch.Tensor:  # loss at 0..T-2, per row
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        return -logp.gather(-1, nxt[..., None])[..., 0].mean(-1)

    def hook_case() -> torch.Tensor:
        with torch.enable_grad():
            return hook_estimates(model, ids, mask, src_ids, src_mask, heads, score)

    # same numbers, or the comparison is moot
    ours = estimate_all(attrib, plan, engine, data)[0]
    floor = hook_case().reshape(len(items), ROWS)
    torch.testing.assert_close(ours, floor, rtol=1e-4, atol=1e-6)

    cases = {
        "plain forward (masked, 32 rows)": lambda: forward(model, ids, mask),
        "hook floor: src fwd + fwd/bwd + dots": hook_case,
        "attribution estimates (estimate_all)": lambda: estimate_all(attrib, plan, engine, data),
        f"attribution op (+ verify top_k {TOP_K})": lambda: run_attribution(
            attrib, plan, engine, data
        ),
    }
    t0 = time.perf_counter()
    times, _ = measure(cases, repeats, warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    picked = list(range(len(items)))
    if sample is not None and sample < len(items):  # cost is linear in variants: extrapolate
        picked = sorted(random.Random(0).sample(picked, sample))
        variants = tuple(exhaustive.variants[i] for i in picked)
        exhaustive = exhaustive.model_copy(update={"variants": variants})
    scale = len(items) / len(picked)
    print(f"  exhaustive patching of {len(picked)} variants (one round) ...", flush=True)
    t1 = time.perf_counter()
    truth = run_job(exhaustive, plan, engine, data)
    med["exhaustive activation patching (patch op)"] = (time.perf_counter() - t1) * scale
    bench_s = time.perf_counter() - t0

    est = ours.double().numpy()[picked]  # [items, rows]
    true = np.asarray(truth.variants) - np.asarray(truth.clean)[None]
    rho = bootstrap_correlation_ci(est, true, magnitude=True, zero_tol=1e-6, n_boot=200)
    signed = bootstrap_correlation_ci(est, true, zero_tol=1e-6, n_boot=200)
    pearson = float(np.corrcoef(est.mean(1), true.mean(1))[0, 1])

    n_pass = {
        "plain forward (masked, 32 rows)": "1 fwd",
        "hook floor: src fwd + fwd/bwd + dots": "2 fwd + 1 bwd",
        "attribution estimates (estimate_all)": "2 fwd + 1 bwd",
        f"attribution op (+ verify top_k {TOP_K})": (
            f"{attrib.forward_passes(MAX_ROWS)} fwd + {attrib.backward_passes(MAX_ROWS)} bwd"
        ),
        "exhaustive activation patching (patch op)": (
            f"{plan.jobs_for('exhaustive')[0].forward_passes(MAX_ROWS)} fwd"
            + (f" (timed on {len(picked)} variants, x{scale:.1f})" if scale > 1 else "")
        ),
    }
    print(
        f"\nmi_spec attribution benchmark: GPT-2 config n_layer={LAYERS} n_embd=512 "
        f"n_head={HEADS} vocab={VOCAB} (random init), batch {ROWS}x{TOKENS}, CPU, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, max_batch_rows {MAX_ROWS}"
    )
    print(
        f"{len(items)} sites (48 heads x {TOKENS} positions); median of {repeats} rounds after "
        f"{warmup} warm-up (exhaustive: 1 round); compile_file {compile_s * 1e3:.0f} ms; "
        f"timing {bench_s:.0f} s\n"
    )
    unit = med["plain forward (masked, 32 rows)"]
    print(f"{'case':44s} {'seconds':>9s} {'x fwd':>8s}  passes (declared by the job)")
    for name, sec in med.items():
        print(f"{name:44s} {sec:9.3f} {sec / unit:8.1f}  {n_pass[name]}")
    full = med["exhaustive activation patching (patch op)"]
    estimates = med["attribution estimates (estimate_all)"]
    op = med[f"attribution op (+ verify top_k {TOP_K})"]
    print()
    print(f"{'speed-up: exhaustive / attribution estimates':52s} {full / estimates:8.1f}x")
    print(f"{'speed-up: exhaustive / attribution op incl. verify':52s} {full / op:8.1f}x")
    print(f"{'attribution estimates / hook floor':52s} {estimates / med[list(cases)[1]]:8.2f}x")
    over = f" over {len(picked)} sampled sites" if scale > 1 else ""
    print(f"{'Spearman |effect| (estimate vs exhaustive truth)':52s} {rho[0]:8.3f} "
          f"[{rho[1]:.3f}, {rho[2]:.3f}]{over}")  # fmt: skip
    print(f"{'Spearman signed':52s} {signed[0]:8.3f} [{signed[1]:.3f}, {signed[2]:.3f}]")
    print(f"{'Pearson (means)':52s} {pearson:8.3f}")
    goal = full / op
    print(f"\ngoal >= 20x faster at >= 200 sites (op incl. verification): {goal:.1f}x "
          f"{'OK' if goal >= 20 and len(items) >= 200 else 'MISS'}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of cheap cases")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="3 rounds, no warm-up round")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--sample",
        type=int,
        default=None,
        help="time exhaustive patching on N random variants and extrapolate (cost is linear in "
        "variants; default: all 1536, which takes ~1537 forwards of 32 rows)",
    )
    args = parser.parse_args(argv)
    repeats, warmup = (3, 0) if args.quick else (args.repeats, args.warmup)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mi_spec_bench_") as folder:
        build(Path(folder), repeats, warmup, args.sample)


if __name__ == "__main__":
    main()
