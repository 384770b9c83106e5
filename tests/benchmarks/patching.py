"""Benchmark: what mi_spec's patching costs next to hand-written PyTorch hooks, measured in one run.

A GPT-2-architecture model built from a config (random init, eval, CPU, 2 threads) runs batches of
32 rows x 32 tokens. Every figure is the median (or, with ``--stat min``, the minimum) of
``--repeats`` rounds after a warm-up round; the rounds interleave all cases (alternating order), so
load drift on a shared machine hits mi_spec and its baselines alike. Ratios are taken between
figures of the same run. See README.md beside this file.

    python tests/benchmarks/patching.py [--repeats N] [--quick] [--stat min] [--profile]

This is a script, not a test: pytest must not collect it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mi_spec.api import compile_file
from mi_spec.execute.engine import Read, Write
from mi_spec.execute.run_job import run_job
from mi_spec.execute.worker import loaded_for
from mi_spec.plan.ir import Job, Plan
from mi_spec.sites.adapter import SiteBinding

__test__ = False

ROWS, TOKENS, VOCAB, N_DATA = 32, 32, 5000, 64
MID = 16  # the one position the sweep patches
SINGLE = "L3.H2"
SITES8 = ["L0.H1", "L1.H3", "L2.H5", "L3.H2", "L3.H7", "L4.H0", "L5.H4", "L5.H6"]

STUDY = """
name: bench-patching
model:
  hf_config: {{model_type: gpt2, n_layer: 6, n_embd: 512, n_head: 8, vocab_size: {vocab},
    n_positions: 64, bos_token_id: 0, eos_token_id: 0}}
  device: cpu
  check_sites: false
data:
  path: rows.jsonl
  positions: {{mid: {mid}, end: -2}}
metric: {{kind: loss, at: end}}
max_batch_rows: {both}
experiments:
  - {{kind: activation_patching, name: single, sites: [{single}], positions: [all],
      samples: {rows}, batch_size: {rows}}}
  - {{kind: ablation, name: joint, sites: {sites}, method: resample, jointly: true,
      positions: [all], samples: {rows}, batch_size: {rows}}}
  - {{kind: activation_patching, name: sweep, sites: {sites}, positions: [mid],
      samples: {rows}, batch_size: {rows}}}
"""


def write_study(folder: Path) -> Path:
    """A dataset of equal-length random rows and the hypothesis file that uses it."""
    rng = random.Random(0)
    with open(folder / "rows.jsonl", "w") as f:
        for _ in range(N_DATA):
            f.write(json.dumps({"tokens": [rng.randrange(VOCAB) for _ in range(TOKENS)]}) + "\n")
    text = STUDY.format(
        vocab=VOCAB, mid=MID, single=SINGLE, sites=json.dumps(SITES8), rows=ROWS, both=2 * ROWS
    )
    (folder / "h.yaml").write_text(text)
    return folder / "h.yaml"


# --- plain-PyTorch baselines ------------------------------------------------------------------


def forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids) if mask is None else model(ids, attention_mask=mask)
    return out.logits


def hook_capture(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, sites: Sequence[SiteBinding]
) -> dict[str, torch.Tensor]:
    """One forward that copies each head site's columns [B, T, 64] (forward pre-hooks)."""
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = []

    def reader(group: list[SiteBinding]):
        def hook(_m, args):
            for s in group:
                got[s.name] = args[0][:, :, s.start : s.stop].clone()

        return hook

    for name, group in _by_module(sites).items():
        handles.append(modules[name].register_forward_pre_hook(reader(group)))
    try:
        forward(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    return got


def hook_patch(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    edits: Sequence[tuple[SiteBinding, int | None, torch.Tensor]],
) -> torch.Tensor:
    """One forward with each (head site, position or None = all, source [B, T, 64]) written in."""
    modules = dict(model.named_modules())
    handles = []

    def writer(group: list[tuple[SiteBinding, int | None, torch.Tensor]]):
        def hook(_m, args):
            x = args[0].clone()
            for s, p, value in group:
                if p is None:
                    x[:, :, s.start : s.stop] = value
                else:
                    x[:, p, s.start : s.stop] = value[:, p]
            return (x, *args[1:])

        return hook

    groups: dict[str, list[tuple[SiteBinding, int | None, torch.Tensor]]] = {}
    for e in edits:
        groups.setdefault(e[0].module, []).append(e)
    for name, group in groups.items():
        handles.append(modules[name].register_forward_pre_hook(writer(group)))
    try:
        return forward(model, ids, mask)
    finally:
        for h in handles:
            h.remove()


def _by_module(sites: Sequence[SiteBinding]) -> dict[str, list[SiteBinding]]:
    out: dict[str, list[SiteBinding]] = {}
    for s in sites:
        if s.io != "input" or s.start is None:
            raise ValueError(f"the hook baselines handle head sites only, not {s.name}")
        out.setdefault(s.module, []).append(s)
    return out


# --- timing -----------------------------------------------------------------------------------


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(
    cases: dict[str, Callable[[], Any]], repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of each case (``warmup`` untimed rounds, then ``repeats`` timed ones, all
    cases once per round, in alternating order) and minor page faults per call (median): a
    figure that load on the machine barely moves, and that counts fresh memory being mapped."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            f0, t0 = minor_faults(), time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - t0)
            faults[name].append(minor_faults() - f0)
        print(f"  round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return times, {k: statistics.median(v) for k, v in faults.items()}


def profile(fn: Callable[[], Any], calls: int, top: int = 12) -> str:
    """cProfile ``calls`` calls of ``fn``: own time per call spent in mi_spec's and nnsight's
    Python code (the overhead over the model itself), then the heaviest entries by own time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof)
    own = {"mi_spec": 0.0, "nnsight": 0.0, "all": 0.0}
    for (filename, _line, _func), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():
        own["all"] += tottime
        for part in ("mi_spec", "nnsight"):
            if f"/{part}/" in filename:
                own[part] += tottime
    per_call = {k: v / calls * 1e3 for k, v in own.items()}
    buf = io.StringIO()
    buf.write(
        f"own time per call: mi_spec {per_call['mi_spec']:.2f} ms, nnsight "
        f"{per_call['nnsight']:.2f} ms, of {per_call['all']:.1f} ms in all (profiled)\n"
    )
    stats.stream = buf
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("tottime").print_stats(r"mi_spec|nnsight", 8)
    return buf.getvalue()


# --- the benchmark ----------------------------------------------------------------------------


def with_rows(plan: Plan, max_rows: int) -> Plan:
    return plan.model_copy(update={"max_batch_rows": max_rows})


def tensors(data: Any, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = data.padded(list(rows))
    return torch.tensor(ids), torch.tensor(mask)


def build(folder: Path, repeats: int, warmup: int, stat: str, do_profile: bool) -> None:
    t0 = time.perf_counter()
    study, plan = compile_file(write_study(folder))
    compile_s = time.perf_counter() - t0
    state = loaded_for(plan, model=study.model)
    model, engine, data = study.model.module, state.engine, state.data
    single: Job = plan.jobs_for("single")[0]
    joint: Job = plan.jobs_for("joint")[0]
    sweep: Job = plan.jobs_for("sweep")[0]
    assert len(single.variants) == 1 and len(single.variants[0].interventions) == 1
    assert len(joint.variants) == 1 and len(joint.variants[0].interventions) == 8
    assert len(sweep.variants) == 8 and all(len(v.interventions) == 1 for v in sweep.variants)
    assert single.rows == joint.rows == sweep.rows and len(single.rows) == ROWS

    ids, mask = tensors(data, single.rows)
    src_ids, src_mask = tensors(data, single.source_rows)
    assert src_ids.shape == ids.shape == (ROWS, TOKENS)
    head = plan.sites[SINGLE]
    sites8 = [plan.sites[s] for s in SITES8]
    plan32, plan288 = with_rows(plan, ROWS), with_rows(plan, 9 * ROWS)

    # precomputed source values: the "single patch" cases time the patched pass alone
    src_head = hook_capture(model, src_ids, src_mask, [head])[SINGLE]
    one_write = [Write(head, slice(0, ROWS), None, src_head)]

    def engine_joint() -> torch.Tensor:  # source pass + patched pass, as run_job, minus clean
        _, got = engine.run(src_ids, src_mask, reads=[Read(s.name, s, None) for s in sites8])
        writes = [Write(s, slice(0, ROWS), None, got[s.name]) for s in sites8]
        return engine.run(ids, mask, writes=writes)[0]

    def hook_joint() -> torch.Tensor:
        got = hook_capture(model, src_ids, src_mask, sites8)
        return hook_patch(model, ids, mask, [(s, None, got[s.name]) for s in sites8])

    def hook_sweep_patched() -> None:  # the floor's 8 patched passes (source values given)
        for s in sites8:
            hook_patch(model, ids, mask, [(s, MID, src8[s.name])])

    src8 = hook_capture(model, src_ids, src_mask, sites8)
    # same numbers, or the comparison is moot
    for a, b in [
        (
            engine.run(ids, mask, writes=one_write)[0],
            hook_patch(model, ids, mask, [(head, None, src_head)]),
        ),
        (engine_joint(), hook_joint()),
    ]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    cases: dict[str, Callable[[], Any]] = {
        "plain forward model(ids)": lambda: forward(model, ids, None),
        "plain forward + attention_mask": lambda: forward(model, ids, mask),
        "engine.run, no sites": lambda: engine.run(ids, mask),
        "single: engine.run + Write": lambda: engine.run(ids, mask, writes=one_write),
        "single: hook patched pass": lambda: hook_patch(model, ids, mask, [(head, None, src_head)]),
        "hook capture 1 site": lambda: hook_capture(model, src_ids, src_mask, [head]),
        "single: run_job": lambda: run_job(single, plan, engine, data),
        "joint8: engine source+patched": engine_joint,
        "joint8: hook source+patched": hook_joint,
        "joint8: run_job (max_rows 64)": lambda: run_job(joint, plan, engine, data),
        "joint8: run_job (max_rows 32)": lambda: run_job(joint, plan32, engine, data),
        "hook capture 8 sites": lambda: hook_capture(model, src_ids, src_mask, sites8),
        "sweep8: 8 hook patched passes": hook_sweep_patched,
        "sweep8: run_job (max_rows 32)": lambda: run_job(sweep, plan32, engine, data),
        "sweep8: run_job (max_rows 288)": lambda: run_job(sweep, plan288, engine, data),
    }
    t0 = time.perf_counter()
    times, faults = measure(cases, repeats, warmup)
    bench_s = time.perf_counter() - t0
    pick = statistics.median if stat == "median" else min
    med = {k: pick(v) for k, v in times.items()}  # the statistic every ratio below uses

    unit = med["plain forward model(ids)"]
    clean = med["plain forward + attention_mask"]
    floors = {
        "single: hook floor (src+clean+patched)": med["hook capture 1 site"]
        + clean
        + med["single: hook patched pass"],
        "joint8: hook floor + clean": med["joint8: hook source+patched"] + clean,
        "sweep8: hook floor (1 src+1 clean+8)": med["hook capture 8 sites"]
        + clean
        + med["sweep8: 8 hook patched passes"],
    }

    print(
        f"\nmi_spec patching benchmark: GPT-2 config n_layer=6 n_embd=512 n_head=8 vocab={VOCAB},"
        f" batch {ROWS}x{TOKENS}, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{stat} of {repeats} interleaved rounds after {warmup} warm-up; compile_file "
        f"{compile_s * 1e3:.0f} ms; timing {bench_s:.0f} s"
    )
    other, other_name = (min, "min") if stat == "median" else (statistics.median, "median")
    head_line = f"{stat + ' ms':>10s} {other_name + ' ms':>9s} {'spread':>7s} {'x fwd':>6s}"
    print(f"\n{'case':42s} {head_line} {'passes':>6s} {'faults':>8s}")
    passes = {
        "single: run_job": single.forward_passes(plan.max_batch_rows),
        "joint8: run_job (max_rows 64)": joint.forward_passes(plan.max_batch_rows),
        "joint8: run_job (max_rows 32)": joint.forward_passes(plan32.max_batch_rows),
        "sweep8: run_job (max_rows 32)": sweep.forward_passes(plan32.max_batch_rows),
        "sweep8: run_job (max_rows 288)": sweep.forward_passes(plan288.max_batch_rows),
    }
    for name, vals in times.items():
        spread = (max(vals) - min(vals)) / min(vals)
        print(
            f"{name:42s} {med[name] * 1e3:10.1f} {other(vals) * 1e3:9.1f} {spread:7.0%} "
            f"{med[name] / unit:6.2f} {passes.get(name, ''):>6} {faults[name]:8.0f}"
        )
    for name, v in floors.items():
        print(f"{name:42s} {v * 1e3:10.1f} {'':9s} {'(sum)':>7s} {v / unit:6.2f}")

    ratios = [
        ("nnsight trace, no sites / masked forward", med["engine.run, no sites"] / clean),
        (
            "single patch: engine / hooks",
            med["single: engine.run + Write"] / med["single: hook patched pass"],
        ),
        (
            "single job: run_job / hook floor",
            med["single: run_job"] / floors["single: hook floor (src+clean+patched)"],
        ),
        ("joint8: engine src+patched / plain fwd", med["joint8: engine source+patched"] / unit),
        (
            "joint8: engine src+patched / hooks",
            med["joint8: engine source+patched"] / med["joint8: hook source+patched"],
        ),
        (
            "joint8: run_job 64 (with clean) / plain fwd",
            med["joint8: run_job (max_rows 64)"] / unit,
        ),
        (
            "joint8: run_job 64 / hook floor + clean",
            med["joint8: run_job (max_rows 64)"] / floors["joint8: hook floor + clean"],
        ),
        (
            "joint8: run_job 32 / hook floor + clean",
            med["joint8: run_job (max_rows 32)"] / floors["joint8: hook floor + clean"],
        ),
        (
            "sweep8: run_job 32 / hook floor",
            med["sweep8: run_job (max_rows 32)"] / floors["sweep8: hook floor (1 src+1 clean+8)"],
        ),
        (
            "sweep8: run_job 288 / hook floor",
            med["sweep8: run_job (max_rows 288)"] / floors["sweep8: hook floor (1 src+1 clean+8)"],
        ),
    ]
    print()
    for name, r in ratios:
        print(f"{name:48s} {r:6.3f}x")

    r = dict(ratios)
    print()
    goals = [
        ("single patch <= 1.05x hooks", r["single patch: engine / hooks"], 1.05),
        ("single job <= 1.05x hook floor", r["single job: run_job / hook floor"], 1.05),
        (
            "joint K=8 (src+patched) <= 2.1x plain forward",
            r["joint8: engine src+patched / plain fwd"],
            2.1,
        ),
        ("sweep8 max_rows 32 <= 1.05x hook floor", r["sweep8: run_job 32 / hook floor"], 1.05),
        ("sweep8 max_rows 288 <= 1.05x hook floor", r["sweep8: run_job 288 / hook floor"], 1.05),
    ]
    for label, value, limit in goals:
        print(f"goal {label}: {value:.2f}x  {'OK' if value <= limit else 'MISS'}")
    with_clean = r["joint8: run_job 64 (with clean) / plain fwd"]
    n_passes = passes["joint8: run_job (max_rows 64)"]
    vs_floor = r["joint8: run_job 64 / hook floor + clean"]
    print(
        f"info joint K=8 run_job incl. clean: {with_clean:.2f}x plain forward in {n_passes} "
        f"passes ({vs_floor:.2f}x its 3-forward hook floor)"
    )

    if do_profile:
        calls = max(3, repeats)
        print(f"\n--- cProfile: single patch, engine.run + Write ({calls} calls, by own time) ---")
        print(profile(lambda: engine.run(ids, mask, writes=one_write), calls))
        print(f"--- cProfile: sweep8 run_job, max_rows 32 ({calls} calls) ---")
        print(profile(lambda: run_job(sweep, plan32, engine, data), calls))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median; >= 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="3 rounds, no warm-up round")
    parser.add_argument(
        "--stat", choices=["median", "min"], default="median", help="statistic for the ratios"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--profile", action="store_true", help="cProfile two mi_spec paths")
    args = parser.parse_args(argv)
    repeats, warmup = (3, 0) if args.quick else (args.repeats, args.warmup)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mi_spec_bench_") as folder:
        build(Path(folder), repeats, warmup, args.stat, args.profile)


if __name__ == "__main__":
    main()
