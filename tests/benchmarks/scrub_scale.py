"""Benchmark: causal scrubbing at research scale (issue #13, part 5).

A GPT-2 built from a config (12 layers, n_embd 768, 12 heads, vocabulary 50257, n_positions 64,
random init, CPU), N rows of T tokens: BOS, then T // 2 tokens drawn from a small alphabet of
random token ids, then that half repeated (cut to T tokens). Hypothesis (3 nodes, per-position
variables): `tok` at `embed`; `prev` (the previous token) at `L0.H3`; `copied` (the token after
the earlier occurrence of the current token) at `L1.H5`, the output. Scored: next-token loss on the
repeated half. `samples` = N (every row a base row), one seed, no controls (`n_random` 0,
`drop_one` false): the hypothesis and the random baseline; `max_batch_rows` R (default 256: on a
CPU smaller passes are faster, and the peak memory is the forward's activations of one pass).

Prints the tree nodes (as built), distinct nodes (hash-consed), stages and forward passes, batch
rows, wall time (compile and run), peak RSS, and the goal: under 300 s on this CPU at 64 x 32.

    python tests/benchmarks/scrub_scale.py [--examples N] [--tokens T] [--rows R] [--threads K]
        [--sample-positions K] [--compare]

``--compare`` also runs, each in a fresh process, a smaller size (``--compare-examples``,
``--compare-tokens``) twice: as now, and with ``full_passes`` (every row over the whole sequence
and model, logits everywhere, no sharing of values between nodes: about the pass cost before this
change; values are still stored compactly), and the largest difference between their per-example
metrics (must be below 1e-4).

This is a script, not a test: pytest must not collect it.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mi_spec.api import compile_file
from mi_spec.execute.ops import op_for
from mi_spec.execute.worker import loaded_for

__test__ = False

GOAL_S = 300.0
STUDY = """
name: bench-scrub-scale
model:
  hf_config: {{model_type: gpt2, n_layer: 12, n_embd: 768, n_head: 12, vocab_size: 50257,
    n_positions: 64}}
  check_sites: false
data:
  path: rows.jsonl
  positions: {{repeat: {{start: {first}, stop: {stop}}}}}
metric: {{kind: loss, at: repeat}}
variables:
  tok: {{value: "tokens[pos]", per_position: true}}
  prev: {{value: "tok[pos - 1] if pos > 0 else -1", per_position: true}}
  copied:
    value: "(tok[pos - {back}] if prev[pos - {back}] == tok[pos] else -1) if pos > {half} else -1"
    per_position: true
correspondence:
  tok: [embed]
  prev: [L0.H3]
  copied: [L1.H5]
max_batch_rows: {rows}
experiments:
  - kind: causal_scrubbing
    samples: {examples}
    seeds: [0]
    controls: {{n_random: 0, drop_one: false, min_agreeing: 2}}
{sampled}"""


def write_study(
    folder: Path, examples: int, tokens: int, alphabet: int, rows: int, sample: int | None = None
) -> Path:
    """The data (seeded) and the hypothesis file; returns the file."""
    rng = random.Random(0)
    ids = rng.sample(range(1, 50257), alphabet)
    half = tokens // 2
    with open(folder / "rows.jsonl", "w") as f:
        for _ in range(examples):
            first = [rng.choice(ids) for _ in range(half)]
            f.write(json.dumps({"tokens": ([0, *first, *first])[:tokens]}) + "\n")
    text = STUDY.format(
        first=half + 1,
        stop=tokens - 1,
        back=half - 1,
        half=half,
        examples=examples,
        rows=rows,
        sampled="" if sample is None else f"    sample_positions: {sample}\n",
    )
    (folder / "h.yaml").write_text(text)
    return folder / "h.yaml"


def measure(
    examples: int, tokens: int, alphabet: int, rows: int, full: bool, sample: int | None = None
) -> dict:
    """Compile and run the study once; its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = write_study(Path(tmp), examples, tokens, alphabet, rows, sample)
        study, plan = compile_file(path)
        compiled = time.perf_counter() - t0
        state = loaded_for(plan, model=study.model)
        out = {"examples": examples, "tokens": tokens, "full_passes": full, "sample": sample}
        out |= {"tree_nodes": 0, "distinct_nodes": 0, "stages": 0, "plan_passes": 0}
        out |= {"passes": 0, "batch_rows": 0, "compile_s": compiled, "values": []}
        t0 = time.perf_counter()
        for job in plan.jobs:
            if full:
                job = job.model_copy(update={"params": {**job.params, "full_passes": True}})
            result = op_for(job.op)(job, plan, state.engine, state.data)
            out["tree_nodes"] += job.params["tree_nodes"]
            out["distinct_nodes"] += job.params["distinct_nodes"]
            out["stages"] += len(job.params["level_rows"])
            out["plan_passes"] += job.forward_passes(plan.max_batch_rows)
            out["passes"] += result.extra["passes"]
            out["batch_rows"] += result.extra["batch_rows"]
            out["values"] += [result.clean, *result.variants]
        out["run_s"] = time.perf_counter() - t0
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def peak_rss_mib() -> float:
    """This process's peak resident memory: ``VmHWM`` (Linux: its own, where ``ru_maxrss`` of a
    child started by fork + exec also counts the parent's size at the fork), else ``getrusage``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def show(r: dict) -> str:
    mode = "full passes (before)" if r["full_passes"] else "now"
    if r.get("sample"):
        mode += f", {r['sample']} sampled positions per example"
    return (
        f"{r['examples']} x {r['tokens']} tokens, {mode}: tree nodes {r['tree_nodes']}, distinct "
        f"{r['distinct_nodes']}; {r['stages']} stages, {r['passes']} forward passes (plan says "
        f"{r['plan_passes']}), {r['batch_rows']} batch rows; compile {r['compile_s']:.1f} s, run "
        f"{r['run_s']:.1f} s; peak RSS {r['peak_rss_mib']:.0f} MiB"
    )


def child(args: argparse.Namespace, examples: int, tokens: int, full: bool) -> dict:
    """``measure`` in a fresh process (its own peak RSS)."""
    cmd = [sys.executable, __file__, "--json", "--examples", str(examples), "--tokens", str(tokens)]
    cmd += ["--alphabet", str(args.alphabet), "--rows", str(args.rows)]
    cmd += ["--threads", str(args.threads)] + (["--full"] if full else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64, help="rows (all of them base rows)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--alphabet", type=int, default=4, help="distinct token ids drawn from")
    parser.add_argument("--rows", type=int, default=256, help="max_batch_rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample-positions", type=int, default=None, help="k scored per row")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--compare-examples", type=int, default=32)
    parser.add_argument("--compare-tokens", type=int, default=12)
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.json:  # one measurement for a parent process
        print(json.dumps(measure(args.examples, args.tokens, args.alphabet, args.rows, args.full)))
        return
    main_run = measure(
        args.examples, args.tokens, args.alphabet, args.rows, False, args.sample_positions
    )
    print(show(main_run))
    total = main_run["compile_s"] + main_run["run_s"]
    ok = "yes" if total < GOAL_S else "NO"
    print(f"goal: compile + run under {GOAL_S:.0f} s on this CPU: {total:.1f} s -> {ok}")
    if args.compare:
        now = child(args, args.compare_examples, args.compare_tokens, False)
        before = child(args, args.compare_examples, args.compare_tokens, True)
        print(show(now))
        print(show(before))
        diff = max(
            abs(a - b)
            for xs, ys in zip(now["values"], before["values"], strict=True)
            for a, b in zip(xs, ys, strict=True)
        )
        speed = (before["run_s"]) / max(now["run_s"], 1e-9)
        print(f"run time: {speed:.1f}x faster; largest per-example difference {diff:.1e}")
        assert diff < 1e-4, diff


if __name__ == "__main__":
    main()
