"""Benchmark: a path-patching sweep, mi_spec's ``path_patch`` op against hand-written hooks.

A GPT-2-architecture model built from a config (random init, eval, CPU, 2 threads) runs a
senders x receivers sweep on 32 rows x 32 tokens, every sender patched at one position. Three
implementations compute the same numbers (checked before timing):

- mi_spec: ``run_path_patch`` on the compiled job (source + clean pass, one pass 2 per sender,
  one pass 3 per pair, blocks of 32 rows packed ``--max-rows`` rows a pass);
- hook floor: plain ``register_forward_(pre_)hook`` code with the same pass plan and packing;
- textbook hooks: the three-pass procedure as usually written, pass 2 repeated for every pair.

Every figure is the median (or ``--stat min``) of ``--repeats`` interleaved rounds after
``--warmup`` untimed ones. See README.md beside this file.

    python tests/benchmarks/path_patching.py [--quick] [--senders diag|all] [--receivers one|all]

This is a script, not a test: pytest must not collect it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from patching import forward

from mi_spec.api import compile_file
from mi_spec.execute.path_op import run_path_patch
from mi_spec.execute.worker import loaded_for
from mi_spec.plan.ir import Job, Plan
from mi_spec.sites.adapter import SiteBinding

__test__ = False

ROWS, TOKENS, VOCAB, N_DATA, MID = 32, 32, 5000, 64, 16
SENDERS = {
    "diag": [f"L{i}.H{i}" for i in range(5)],
    "all": ["L0.H*", "L1.H*", "L2.H*", "L3.H*", "L4.H*"],
}
RECEIVERS = {"one": ["L5.H0:q", "L5.H0:k", "L5.H0:v"], "all": ["L5.H*:q", "L5.H*:k", "L5.H*:v"]}

STUDY = """
name: bench-path-patching
model:
  hf_config: {{model_type: gpt2, n_layer: 6, n_embd: 512, n_head: 8, vocab_size: {vocab},
    n_positions: 64, bos_token_id: 0, eos_token_id: 0}}
  device: cpu
  check_sites: false
data:
  path: rows.jsonl
  positions: {{mid: {mid}, end: -2}}
metric: {{kind: loss, at: end}}
max_batch_rows: {max_rows}
experiments:
  - {{kind: path_patching, name: sweep, senders: {senders}, receivers: {receivers},
      positions: [mid], samples: {rows}, batch_size: {rows}}}
"""

Key = tuple[str, str]  # (module, "input" | "output")
Edit = Callable[[torch.Tensor], torch.Tensor]


def write_study(folder: Path, senders: list[str], receivers: list[str], max_rows: int) -> Path:
    rng = random.Random(0)
    with open(folder / "rows.jsonl", "w") as f:
        for _ in range(N_DATA):
            f.write(json.dumps({"tokens": [rng.randrange(VOCAB) for _ in range(TOKENS)]}) + "\n")
    text = STUDY.format(
        vocab=VOCAB,
        mid=MID,
        max_rows=max_rows,
        senders=json.dumps(senders),
        receivers=json.dumps(receivers),
        rows=ROWS,
    )
    (folder / "h.yaml").write_text(text)
    return folder / "h.yaml"


# --- plain-PyTorch hooks --------------------------------------------------------------------


class Hooks:
    """Forwards with per-module edit functions and whole-activation copies, counted."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.forwards = 0

    def run(
        self,
        ids: torch.Tensor,
        edits: dict[Key, Edit] | None = None,
        record: Sequence[Key] = (),
    ) -> tuple[torch.Tensor, dict[Key, torch.Tensor]]:
        got: dict[Key, torch.Tensor] = {}
        handles = []
        for key in {*(edits or {}), *record}:
            module, io = key
            edit = (edits or {}).get(key)
            keep = key in record

            def apply(x, key=key, edit=edit, keep=keep):
                if keep:
                    got[key] = x.clone()
                return x if edit is None else edit(x)

            if io == "input":
                handles.append(
                    self.modules[module].register_forward_pre_hook(
                        lambda m, args, apply=apply: (apply(args[0]), *args[1:])
                    )
                )
            else:
                handles.append(
                    self.modules[module].register_forward_hook(
                        lambda m, args, out, apply=apply: apply(out)
                    )
                )
        try:
            self.forwards += 1
            return forward(self.model, ids, None), got
        finally:
            for h in handles:
                h.remove()


class HookPaths:
    """Path patching written by hand: ``shared`` uses mi_spec's pass plan (one pass 2 per sender,
    ``k`` blocks a pass); otherwise the textbook plan (pass 2 again for every pair, one block)."""

    def __init__(self, model, plan: Plan, job: Job, ids, src_ids, shared: bool, k: int):
        self.hooks = Hooks(model)
        self.sites = plan.sites
        self.ids, self.src_ids, self.shared, self.k = ids, src_ids, shared, k
        self.senders = [v.interventions[0].site for v in job.variants]
        self.receivers = [r[0] for r in job.params["receivers"]]
        self.freeze = [plan.sites[s] for s in job.params["freeze"]]
        self.end = TOKENS - 2

    def key(self, s: SiteBinding) -> Key:
        return (s.module, s.io)

    def run(self) -> list[float]:
        senders = list(dict.fromkeys(self.senders))
        _, src = self.hooks.run(self.src_ids, record=[self.key(self.sites[s]) for s in senders])
        _, clean = self.hooks.run(self.ids, record=list({self.key(f) for f in self.freeze}))
        pairs = list(zip(self.senders, self.receivers, strict=True))
        recorded: dict[tuple[str, str], torch.Tensor] = {}
        if self.shared:
            for i in range(0, len(senders), self.k):
                recorded |= self.pass2(senders[i : i + self.k], None, src, clean)
        out: list[float] = []
        k = self.k if self.shared else 1
        for i in range(0, len(pairs), k):
            chunk = pairs[i : i + k]
            if not self.shared:
                recorded = self.pass2([chunk[0][0]], chunk[0][1], src, clean)
            out += self.pass3(chunk, recorded)
        return out

    def pass2(self, senders, receiver, src, clean) -> dict[tuple[str, str], torch.Tensor]:
        """Blocks of the base rows, one per sender: everything frozen but the sender."""
        g = len(senders)
        edits: dict[Key, Edit] = {}
        for key in {self.key(f) for f in self.freeze}:
            value = clean[key] if g == 1 else clean[key].repeat(g, 1, 1)
            edits[key] = lambda x, value=value: value  # read, never written in place
        for j, s in enumerate(senders):
            site, key = self.sites[s], self.key(self.sites[s])
            previous = edits.get(key, lambda x: x)

            def patch(x, j=j, site=site, key=key, previous=previous):
                x = previous(x).clone()
                rows = slice(j * ROWS, (j + 1) * ROWS)
                x[rows, MID, site.start : site.stop] = src[key][:, MID, site.start : site.stop]
                return x

            edits[key] = patch
        wanted = sorted(set(self.receivers) if receiver is None else {receiver})
        keys = list({self.key(self.sites[r]) for r in wanted})
        _, got = self.hooks.run(self.ids.repeat(g, 1), edits, record=keys)
        out = {}
        for j, s in enumerate(senders):
            for r in wanted:
                site = self.sites[r]
                value = got[self.key(site)][j * ROWS : (j + 1) * ROWS, :, site.start : site.stop]
                out[(s, r)] = value
        return out

    def pass3(self, chunk, recorded) -> list[float]:
        """Blocks of the base rows, one per pair: only the pair's receiver set."""
        by_key: dict[Key, list[tuple[int, SiteBinding, torch.Tensor]]] = {}
        for j, (s, r) in enumerate(chunk):
            site = self.sites[r]
            by_key.setdefault(self.key(site), []).append((j, site, recorded[(s, r)]))
        edits: dict[Key, Edit] = {}
        for key, items in by_key.items():

            def write(x, items=items):
                x = x.clone()
                for j, site, value in items:
                    x[j * ROWS : (j + 1) * ROWS, :, site.start : site.stop] = value
                return x

            edits[key] = write
        logits, _ = self.hooks.run(self.ids.repeat(len(chunk), 1), edits)
        target = self.ids[:, self.end + 1].repeat(len(chunk))
        loss = torch.nn.functional.cross_entropy(
            logits[:, self.end].float(), target, reduction="none"
        )
        return loss.tolist()  # block j (pair j), row by row


# --- timing -----------------------------------------------------------------------------------


def measure(
    cases: dict[str, Callable[[], Any]], repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and CPU seconds (this process, all threads) per call of each case: ``warmup``
    untimed rounds, then ``repeats`` rounds running every case once, in alternating order.

    A sweep takes tens of seconds, so on a shared machine load changes between cases; CPU time
    counts the work this process did, which load barely moves (it waits, unbilled)."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            cases[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"  round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return wall, cpu


# --- the benchmark ----------------------------------------------------------------------------


def build(folder: Path, args: argparse.Namespace) -> None:
    if args.max_rows % ROWS:
        raise SystemExit(f"--max-rows must be a multiple of {ROWS}")
    t0 = time.perf_counter()
    study, plan = compile_file(
        write_study(folder, SENDERS[args.senders], RECEIVERS[args.receivers], args.max_rows)
    )
    compile_s = time.perf_counter() - t0
    state = loaded_for(plan, model=study.model)
    model, engine, data = study.model.module, state.engine, state.data
    (job,) = plan.jobs
    ids = torch.tensor(data.padded(list(job.rows))[0])
    src_ids = torch.tensor(data.padded(list(job.source_rows))[0])
    k = args.max_rows // ROWS
    floor = HookPaths(model, plan, job, ids, src_ids, shared=True, k=k)
    textbook = HookPaths(model, plan, job, ids, src_ids, shared=False, k=1)

    calls = [0]
    engine_run = engine.run

    def counting(*a, **kw):
        calls[0] += 1
        return engine_run(*a, **kw)

    engine.run = counting  # type: ignore[method-assign]
    got = run_path_patch(job, plan, engine, data)
    op_passes = calls[0]
    del engine.run  # the class's method again, uncounted, for the timing
    want_floor, want_textbook = floor.run(), textbook.run()
    ours = torch.tensor(got.variants).flatten()
    n_pairs = len(job.variants)
    torch.testing.assert_close(ours, torch.tensor(want_floor), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, torch.tensor(want_textbook), rtol=1e-5, atol=1e-5)
    passes = {
        "mi_spec run_path_patch": op_passes,
        "hook floor (same pass plan)": floor.hooks.forwards,
        "textbook hooks (pass 2 per pair)": textbook.hooks.forwards,
    }
    assert op_passes == job.forward_passes(plan.max_batch_rows) == floor.hooks.forwards

    cases: dict[str, Callable[[], Any]] = {
        "plain forward (32 rows)": lambda: forward(model, ids, None),
        "mi_spec run_path_patch": lambda: run_path_patch(job, plan, engine, data),
        "hook floor (same pass plan)": floor.run,
        "textbook hooks (pass 2 per pair)": textbook.run,
    }
    t0 = time.perf_counter()
    wall, cpu = measure(cases, args.repeats, args.warmup)
    bench_s = time.perf_counter() - t0
    pick = statistics.median if args.stat == "median" else min
    med = {name: pick(v) for name, v in wall.items()}
    med_cpu = {name: pick(v) for name, v in cpu.items()}
    unit, unit_cpu = med["plain forward (32 rows)"], med_cpu["plain forward (32 rows)"]

    senders = len({v.interventions[0].site for v in job.variants})
    print(
        f"\nmi_spec path patching benchmark: GPT-2 config n_layer=6 n_embd=512 n_head=8 "
        f"vocab={VOCAB}, batch {ROWS}x{TOKENS}, CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"sweep: {senders} senders ({', '.join(SENDERS[args.senders])}) @ position {MID} x "
        f"{n_pairs // senders} receivers ({', '.join(RECEIVERS[args.receivers])}) = {n_pairs} "
        f"pairs; {len(job.params['freeze'])} freeze sites; max_batch_rows {plan.max_batch_rows}"
    )
    print(
        f"{args.stat} of {args.repeats} interleaved rounds after {args.warmup} warm-up; "
        f"compile_file {compile_s * 1e3:.0f} ms; timing {bench_s:.0f} s"
    )
    print(
        f"\n{'case':34s} {'wall s':>8s} {'spread':>7s} {'x fwd':>6s} {'cpu s':>8s} {'spread':>7s} "
        f"{'x fwd':>6s} {'passes':>6s}"
    )
    for name in cases:
        print(
            f"{name:34s} {med[name]:8.2f} {_spread(wall[name]):7.0%} {med[name] / unit:6.1f} "
            f"{med_cpu[name]:8.2f} {_spread(cpu[name]):7.0%} {med_cpu[name] / unit_cpu:6.1f} "
            f"{passes.get(name, 1):6d}"
        )
    print()
    ratios = {}
    for base_name, short in (
        ("hook floor (same pass plan)", "hook floor"),
        ("textbook hooks (pass 2 per pair)", "textbook hooks"),
    ):
        for clock, table in (("wall", med), ("cpu", med_cpu)):
            ratios[(short, clock)] = table["mi_spec run_path_patch"] / table[base_name]
            print(f"{'mi_spec / ' + short + ' (' + clock + ')':44s} {ratios[(short, clock)]:6.3f}x")
    for clock, table, u in (("wall", med, unit), ("cpu", med_cpu, unit_cpu)):
        per_pass = table["mi_spec run_path_patch"] / op_passes / u
        print(f"{'mi_spec per pass / plain forward (' + clock + ')':44s} {per_pass:6.3f}x")
    print()
    for clock in ("wall", "cpu"):
        r = ratios[("hook floor", clock)]
        print(
            f"goal mi_spec <= 1.1x hook floor ({clock}): {r:.2f}x  {'OK' if r <= 1.1 else 'MISS'}"
        )


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / min(values)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="2 rounds, no warm-up round")
    parser.add_argument("--stat", choices=["median", "min"], default="median")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--senders", choices=list(SENDERS), default="diag", help="diag: L{i}.H{i}, i < 5"
    )
    parser.add_argument(
        "--receivers", choices=list(RECEIVERS), default="one", help="q/k/v of L5.H0 or all"
    )
    parser.add_argument("--max-rows", type=int, default=ROWS, help="max_batch_rows (k x 32)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 2, 0
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mi_spec_bench_") as folder:
        build(Path(folder), args)


if __name__ == "__main__":
    sys.exit(main())
