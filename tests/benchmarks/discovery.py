"""Benchmark: circuit discovery's edge scoring against one plain forward + backward on the same batch.

A GPT-2-architecture model from a config (12 layers, 768 wide, 12 heads, ``--vocab`` tokens,
random init, eval, CPU) and ``--rows`` rows of ``--tokens`` tokens; the metric is the next-token
loss at every position. The graph at head granularity with q/k/v split: 157 senders (embed, 144
heads, 12 MLPs), 445 receivers (432 head inputs, 12 MLP inputs, the logits), ~32k edges.

Prints, median of ``--repeats`` interleaved rounds: one forward + backward (plain PyTorch, the
loss summed over rows, gradients of activations: the weights are frozen); EAP over every edge (the op's ``scores(1)``: one forward with autograd,
one backward to the receivers, one batched vector-Jacobian product per (module, residual point),
one contraction per receiver); EAP-IG with ``--steps`` N; the ratios (targets: EAP <= 3x, EAP-IG
<= (N + 2)x); ACDC's pass count (one real run per edge + the empty circuit) against the edges;
peak resident memory of the process after each stage.

    python tests/benchmarks/discovery.py [--rows 8] [--tokens 32] [--steps 4] [--repeats 3] [--pack]

``--pack`` lets one pass hold every interpolation step (``max_batch_rows`` = rows x steps), as
on a GPU; without it each step is its own pass of ``--rows`` rows.

This is a script, not a test: pytest must not collect it.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mi_spec.api import compile_file
from mi_spec.execute.discovery_op import Discovery
from mi_spec.execute.worker import loaded_for

__test__ = False

STUDY = """
name: bench-discovery
model:
  hf_config: {{model_type: gpt2, n_layer: {layers}, n_embd: {width}, n_head: {heads},
    vocab_size: {vocab}, n_positions: 64, bos_token_id: 0, eos_token_id: 0}}
  device: cpu
  check_sites: false
data:
  path: rows.jsonl
  positions: {{scored: {{start: 0, stop: -1}}}}
metric: {{kind: loss, at: scored}}
max_batch_rows: {max_rows}
experiments:
  - {{kind: circuit_discovery, name: eap, method: eap, samples: {rows}}}
  - {{kind: circuit_discovery, name: acdc, method: acdc, samples: {rows}}}
"""


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--pack",
        action="store_true",
        help="max_batch_rows = rows x steps: EAP-IG's steps as blocks",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp())
    rng = random.Random(0)
    with open(folder / "rows.jsonl", "w") as f:
        for _ in range(2 * args.rows):
            ids = [rng.randrange(args.vocab) for _ in range(args.tokens)]
            f.write(json.dumps({"tokens": ids}) + "\n")
    (folder / "h.yaml").write_text(
        STUDY.format(
            layers=args.layers,
            width=args.width,
            heads=args.heads,
            vocab=args.vocab,
            rows=args.rows,
            max_rows=args.rows * (args.steps if args.pack else 1),
        )  # fmt: skip
    )
    t0 = time.perf_counter()
    study, plan = compile_file(folder / "h.yaml")
    print(f"compile: {time.perf_counter() - t0:.1f}s")
    state = loaded_for(plan, model=study.model)
    eap_job, acdc_job = plan.jobs_for("eap")[0], plan.jobs_for("acdc")[0]
    n_edges = len(eap_job.params["edges"])
    print(
        f"graph: {len(eap_job.params['senders'])} senders, {len(eap_job.params['receivers'])} "
        f"receivers, {n_edges} edges; batch {args.rows} x {args.tokens} tokens"
    )
    run = Discovery.start(eap_job, plan, state.engine, state.data)
    model, ids = state.model.module, run.base.ids
    targets = ids[:, 1:]

    def fwd_bwd() -> None:  # the weights are frozen: gradients of activations, as EAP takes
        lead = model.transformer.wte.register_forward_hook(
            lambda _m, _a, out: out.detach().requires_grad_(True)
        )
        try:
            logits = model(ids).logits[:, :-1]
        finally:
            lead.remove()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        )
        loss.view(len(ids), -1).mean(-1).sum().backward()

    cases = {
        "forward+backward": fwd_bwd,
        "eap": lambda: run.scores(1),
        f"eap_ig (steps {args.steps})": lambda: run.scores(args.steps),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    peaks: dict[str, float] = {}
    for name, fn in cases.items():  # warm-up
        fn()
        peaks[name] = peak_mib()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["forward+backward"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>22}: {med:7.3f}s  {med / base:5.2f}x forward+backward   "
              f"(peak RSS after it {peaks[name]:.0f} MiB)")  # fmt: skip
    print(f"targets: eap <= 3x, eap_ig <= {args.steps + 2}x")
    acdc_passes = len(acdc_job.params["level_rows"]) - 5  # one stage per real run
    print(f"acdc: {acdc_passes} real runs of {args.rows} rows for {n_edges} edges "
          f"({acdc_passes / n_edges:.3f} per edge), est. {acdc_passes * base / 3:.0f}s at a third "
          "of a forward+backward each")  # fmt: skip


if __name__ == "__main__":
    main()
