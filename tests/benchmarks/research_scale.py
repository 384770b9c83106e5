"""Benchmark: mi_spec at GPT-2-small size against hand-written hook floors measured in one run.

A GPT-2 built from a config (12 layers, 768 wide, 12 heads, vocab 50,257, random init, eval),
batches of 32 rows x 64 tokens, the metric the next-token loss at 2 scored positions. Cases: one
head patch, activation patching of all 144 heads x 2 positions, node attribution with verification
over the same 288 sites and over every head at every position (9,216 sites, against exhaustive
patching costed from the sweep), path patching of 12 senders x 12 receivers, and one DAS step (full
rank and rank 16). Each mi_spec case runs beside a floor of plain ``register_forward_(pre_)hook`` code
(one forward per pass of the pass plan, all of 32 rows, sources captured once).

On the 2 shared CPU cores one forward of 32 x 64 tokens takes 8 s of CPU time (8-19 s wall, with
other jobs' load), so the sweeps are timed on a seeded subset, stratified by layer (``--sample``,
``--verify-sample``, ``--path-sample``) and scaled up linearly in their patched passes; the table
says where. Wall and CPU seconds are both printed: on a loaded CPU read the CPU column. See
README.md beside this file.

    python tests/benchmarks/research_scale.py [--quick] [--sample N] [--device cuda] [--profile]

This is a script, not a test: pytest must not collect it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import inspect
import json
import math
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import attribution as attribution_bench  # this folder: run as a script
import torch
import torch.nn.functional as F
from patching import forward, hook_capture, hook_patch, minor_faults, profile
from path_patching import Hooks

from mi_spec.api import compile_file
from mi_spec.execute import das_op
from mi_spec.execute.attribution_op import (
    Item,
    choose,
    estimate_all,
    run_attribution,
    verification_job,
)
from mi_spec.execute.engine import Engine, Write
from mi_spec.execute.path_op import run_path_patch
from mi_spec.execute.run_job import run_job
from mi_spec.execute.worker import loaded_for
from mi_spec.plan.ir import Job, Plan
from mi_spec.plan.path_pairs import Pairs
from mi_spec.sites.adapter import SiteBinding

__test__ = False

SIZES = {  # the benchmark; "smoke" only checks that the script runs (seconds, no figures)
    "gpt2-small": {"layers": 12, "width": 768, "heads": 12, "vocab": 50257},
    "smoke": {"layers": 4, "width": 64, "heads": 4, "vocab": 500},
}
TOKENS, N_DATA, MID, END = 64, 96, 31, 62
SCORED = [MID, END]  # the metric's positions: loss at 31 and 62 (predicting 32 and 63)
POS = {"mid": MID, "end": END}

STUDY = """
name: bench-research-scale
model:
  hf_config: {{model_type: gpt2, n_layer: {layers}, n_embd: {width}, n_head: {heads},
    vocab_size: {vocab}, n_positions: {tokens}, bos_token_id: 0, eos_token_id: 0}}
  device: {device}
  check_sites: false
data:
  path: rows.jsonl
  positions: {{mid: {mid}, end: {end}, scored: {{column: scored}}}}
metric: {{kind: loss, at: scored}}
max_batch_rows: {max_rows}
experiments:
  - {{kind: activation_patching, name: sweep, sites: ["L*.H*"], positions: [mid, end],
      samples: {rows}, batch_size: {rows}}}
  - {{kind: attribution_patching, name: attrib, sites: ["L*.H*"], positions: [mid, end],
      samples: {rows}, verify: {{top_k: {top_k}}}}}
  - {{kind: attribution_patching, name: attrib_all, sites: ["L*.H*"], positions: [all],
      samples: {rows}, verify: {{top_k: {top_k}}}}}
  - {{kind: path_patching, name: paths, senders: ["L{sender}.H*"], receivers: ["L{receiver}.H*:q"],
      positions: [end], receiver_positions: [end], samples: {rows}, batch_size: {rows}}}
"""
DAS_STUDY = """
name: bench-research-scale-das
model:
  hf_config: {{model_type: gpt2, n_layer: {layers}, n_embd: {width}, n_head: {heads},
    vocab_size: {vocab}, n_positions: {tokens}, bos_token_id: 0, eos_token_id: 0}}
  device: {device}
  check_sites: false
data: {{path: rows.jsonl}}
metric: {{kind: accuracy, at: last, target: label}}
max_batch_rows: {max_rows}
variables:
  x: {{column: label}}
experiments:
  - {{kind: das, name: das_full, variables: x, site: L{site}.resid_post@last, intervention: full,
      dim: {half}, batch_size: {rows}, pairs: {{train: {rows}, val: 0, test: 1}},
      training: {{epochs: 1, patience: null}}}}
  - {{kind: das, name: das_rank16, variables: x, site: L{site}.resid_post@last,
      intervention: low_rank, dim: 16, batch_size: {rows}, pairs: {{train: {rows}, val: 0,
      test: 1}}, training: {{epochs: 1, patience: null}}}}
"""


@dataclass
class Config:
    size: dict[str, int]
    rows: int
    max_rows: int  # mi_spec's max_batch_rows (the floors run 1 pass per variant of ``rows``)
    device: str
    rounds: int
    sample: int  # sweep variants timed (0: all)
    verify_sample: int  # verification variants timed (0: all)
    path_sample: int  # path pairs timed (0: all)
    das_steps: int
    top_k: int
    profile: bool
    scrub: bool

    @property
    def fill(self) -> dict[str, Any]:
        s = self.size
        return s | {
            "tokens": TOKENS, "device": self.device, "mid": MID, "end": END, "rows": self.rows,
            "max_rows": self.max_rows, "top_k": self.top_k, "sender": s["layers"] // 2,
            "receiver": 3 * s["layers"] // 4, "site": s["layers"] // 2, "half": s["width"] // 2,
        }  # fmt: skip


# --- measuring -------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"{key}:\s+(\d+)", text)
    return int(found.group(1)) if found else 0


def _malloc_trim() -> None:
    """Hand freed heap pages back (glibc), so RSS counts live memory, not the allocator's cache."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Memory:
    """Peak memory of each call: the RSS high-water mark (reset through /proc/self/clear_refs,
    Linux), or CUDA's peak allocation; and its rise over the memory held when the call began."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak: dict[str, float] = {}  # name -> MiB, largest call
        self.rise: dict[str, float] = {}

    def start(self) -> float:
        """Reset the peak, freed heap trimmed first (called outside the timed span)."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        _malloc_trim()
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") / 1024

    def stop(self, name: str, start: float) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = _status_kib("VmHWM") / 1024
        if peak >= self.peak.get(name, 0.0):
            self.peak[name], self.rise[name] = peak, peak - start


@dataclass
class Passes:
    """Times every ``Engine.run`` / ``Engine.outputs`` call of an op, by kind: ``patched``
    (writes, no reads: a patched pass or path pass 3), ``pass2`` (writes and reads: path pass 2),
    ``fixed`` (the rest: source and clean passes)."""

    engine: Engine
    device: str
    log: list[tuple[str, float, float]] = field(default_factory=list)  # kind, wall, cpu

    @contextlib.contextmanager
    def counting(self) -> Iterator[Passes]:
        run, outputs = self.engine.run, self.engine.outputs

        def timed(fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(*a, **kw)
            sync(self.device)
            reads, writes = kw.get("reads", a[2:3]), kw.get("writes", a[3:4])
            kind = "fixed" if not writes else "pass2" if reads else "patched"
            self.log.append((kind, time.perf_counter() - t0, time.process_time() - c0))
            return out

        self.engine.run = lambda *a, **kw: timed(run, *a, **kw)  # type: ignore[method-assign]
        self.engine.outputs = lambda *a, **kw: timed(outputs, *a, **kw)  # type: ignore[method-assign]
        try:
            yield self
        finally:
            del self.engine.run, self.engine.outputs  # the class's methods again

    def seconds(self, kind: str, clock: int) -> list[float]:
        """Seconds of each pass of ``kind``: wall (``clock`` 0) or CPU (1)."""
        return [entry[1 + clock] for entry in self.log if entry[0] == kind]


def stratified(keys: Sequence[Any], n: int, seed: int = 0) -> list[int]:
    """``n`` indices: items sorted by key (a layer), cut into ``n`` equal strata, one seeded random
    pick in each; all of them when ``n`` is 0 or not smaller."""
    if n <= 0 or n >= len(keys):
        return list(range(len(keys)))
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    rng = random.Random(seed)
    picks = [order[rng.randrange(s * len(order) // n, (s + 1) * len(order) // n)] for s in range(n)]
    return sorted(picks)


def first_write(job: Job, plan: Plan, engine: Engine) -> list[int]:
    """Per variant, the forward-order index of its first write (where its pass resumes)."""
    return [
        min(
            engine.order[(plan.sites[i.site].module, plan.sites[i.site].io)]
            for i in v.interventions
        )
        for v in job.variants
    ]


def subset(job: Job, picked: list[int]) -> Job:
    """``job`` with only the variants ``picked`` (a path job keeps its per-pair params aligned)."""
    update: dict[str, Any] = {"variants": tuple(job.variants[i] for i in picked)}
    if job.op == "path_patch":
        params = dict(job.params)
        for key in ("receivers", "receiver_pos"):
            params[key] = [job.params[key][i] for i in picked]
        update["params"] = params
        params["level_rows"] = Pairs.of(job.model_copy(update=update)).level_rows(job)
    return job.model_copy(update=update)


def scaled_patch(job: Job, part: Job, plan: Plan, log: Passes, took: Clock) -> Clock:
    """The whole ``job``'s (wall, CPU) seconds from a run of ``part`` (a subset of its variants):
    the patched passes scale by the ratio of their counts (the source and clean passes do not)."""
    per_pass = max(1, plan.max_batch_rows // len(job.rows))
    full, done = (math.ceil(len(j.variants) / per_pass) for j in (job, part))
    w, c = (
        t + sum(log.seconds("patched", k)) * (full / max(1, done) - 1) for k, t in enumerate(took)
    )
    return w, c


def scaled_path(job: Job, plan: Plan, log: Passes, took: Clock) -> Clock:
    """The whole path job's (wall, CPU) seconds from a run of a subset of its pairs: each pass 2
    and pass 3 costs what the sampled ones did (neither depends on the sender or receiver)."""
    *_, rows2, rows3 = Pairs.of(job).level_rows(job)
    n2, n3 = (-(-rows // plan.max_batch_rows) for rows in (rows2, rows3))
    out = []
    for k, t in enumerate(took):
        p2, p3 = log.seconds("pass2", k), log.seconds("patched", k)
        out.append(t - sum(p2) - sum(p3) + statistics.mean(p2) * n2 + statistics.mean(p3) * n3)
    return out[0], out[1]


def estimate_mib(plan: Plan, job: Job, model: torch.nn.Module, device: str) -> tuple[float, str]:
    """mi_spec's own peak-memory estimate of ``job`` in MiB, weights excluded, and where it came
    from: ``mi_spec.plan.memory.estimate_job`` (the whole job), else ``summary.peak_bytes`` (one
    pass's activations), else none (NaN)."""
    try:
        from mi_spec.plan import memory
    except ImportError:
        from mi_spec.plan import summary

        if not hasattr(summary, "peak_bytes"):
            return math.nan, "no estimate in this version"
        return summary.peak_bytes(plan, job, plan.data.max_len) / 2**20, "summary.peak_bytes"
    size = memory.model_size(model, plan)
    got = memory.estimate_job(plan, job, size=size, device=device.split(":")[0])
    return got.job / 2**20, f"plan.memory.estimate_job ({got.phase}, {got.rows} rows a pass)"


# --- plain-PyTorch floors --------------------------------------------------------------------


@contextlib.contextmanager
def scored_only(model: torch.nn.Module) -> Iterator[None]:
    """The unembedding fed only the 2 scored positions (a forward pre-hook on ``lm_head``)."""
    handle = model.lm_head.register_forward_pre_hook(lambda _m, args: (args[0][:, SCORED],))
    try:
        yield
    finally:
        handle.remove()


def at_scored(fn: Callable[[], Any], model: torch.nn.Module) -> Callable[[], Any]:
    def call() -> Any:
        with scored_only(model):
            return fn()

    return call


def loss_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-row mean next-token loss at the scored positions (logits of all or of those)."""
    picked = logits if logits.shape[1] == len(SCORED) else logits[:, SCORED]
    logp = torch.log_softmax(picked.float(), -1)
    nxt = ids[:, [p + 1 for p in SCORED]].to(logp.device)
    return -logp.gather(-1, nxt[..., None])[..., 0].mean(-1)


class PathFloor:
    """Path patching written by hand with mi_spec's pass plan: per sender one pass 2 (every
    freeze module set to its clean value, the sender's columns to the source's, the receivers
    read), per pair one pass 3 (the receiver's columns set at the receiver position)."""

    def __init__(self, model, plan: Plan, job: Job, ids, src: dict[str, torch.Tensor]):
        self.hooks, self.plan, self.ids, self.src = Hooks(model), plan, ids, src
        self.freeze = sorted({(s.module, s.io) for s in map(plan.sites.get, job.params["freeze"])})
        self.clean: dict[tuple[str, str], torch.Tensor] = {}
        self.got: dict[tuple[str, str], torch.Tensor] = {}

    def clean_pass(self) -> None:
        self.clean = self.hooks.run(self.ids, record=self.freeze)[1]

    def pass2(self, sender: str, receiver: str) -> None:
        s, r = self.plan.sites[sender], self.plan.sites[receiver]
        edits = {k: (lambda x, v=v: v) for k, v in self.clean.items()}
        before = edits.get((s.module, s.io), lambda x: x)

        def patch(x: torch.Tensor) -> torch.Tensor:
            x = before(x).clone()
            x[:, END, s.start : s.stop] = self.src[sender][:, END]
            return x

        edits[(s.module, s.io)] = patch
        self.got = self.hooks.run(self.ids, edits, record=[(r.module, r.io)])[1]

    def pass3(self, receiver: str) -> torch.Tensor:
        r = self.plan.sites[receiver]
        value = self.got[(r.module, r.io)][:, END, r.start : r.stop]

        def write(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[:, END, r.start : r.stop] = value
            return x

        return loss_at(self.hooks.run(self.ids, {(r.module, r.io): write})[0], self.ids)


# --- the benchmark ---------------------------------------------------------------------------

Clock = tuple[float, float]  # (wall, CPU) seconds
Goal = tuple[str, Clock, str, float]  # label, ratios, goal text, limit (< 0: at least -limit)
NONE = (math.nan, math.nan)


@dataclass
class Table:
    """Every timed case (seconds, faults, passes, notes) and the results of the last calls."""

    cfg: Config
    mem: Memory
    seconds: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    faults: dict[str, float] = field(default_factory=dict)
    passes: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    keep: dict[str, Any] = field(default_factory=dict)

    def time(self, cases: dict[str, Callable[[], Any]], rounds: int = 1) -> None:
        """``rounds`` rounds, every case once a round in alternating order (load drift falls on
        all alike, as in ``patching.measure``); per call wall and CPU seconds, minor page faults
        and peak memory. The minimum over rounds (load only ever adds time); each case's last
        result is kept in ``keep``."""
        names = list(cases)
        got: dict[str, list[tuple[float, float, int]]] = {k: [] for k in names}
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                start = self.mem.start()
                f0, c0, t0 = minor_faults(), time.process_time(), time.perf_counter()
                self.keep[name] = cases[name]()
                sync(self.cfg.device)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                got[name].append((wall, cpu, minor_faults() - f0))
                self.mem.stop(name, start)
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        for name, calls in got.items():
            wall, cpu, faults = zip(*calls, strict=True)
            self.set(name, (min(wall), min(cpu)))
            self.faults[name] = statistics.median(faults)

    def set(self, name: str, took: Clock) -> None:
        self.seconds[name], self.cpu[name] = took

    def took(self, name: str) -> Clock:
        return self.seconds[name], self.cpu[name]

    def derive(self, name: str, parts: dict[str, float], passes: int, note: str) -> None:
        """A floor summed from timed parts: ``{case: how many times the plan runs it}``."""
        self.set(
            name, tuple(sum(n * t[p] for p, n in parts.items()) for t in (self.seconds, self.cpu))
        )
        self.passes[name], self.notes[name] = str(passes), note

    def ratio(self, a: str, b: str) -> Clock:
        return self.seconds[a] / self.seconds[b], self.cpu[a] / self.cpu[b]

    def sampled(self, name: str, op: Callable[..., Any], part: Job, ctx: Ctx) -> Passes:
        """Time one run of ``op`` on ``part`` with every pass of it timed by kind."""
        log = Passes(ctx.engine, self.cfg.device)

        def call() -> Any:
            log.log.clear()
            with log.counting():
                return op(part, ctx.plan, ctx.engine, ctx.data)

        self.time({name: call})
        return log


@dataclass
class Ctx:
    """Study 1 loaded: the plan, model, engine, data, the base and source batches, head sites."""

    plan: Plan
    model: torch.nn.Module
    engine: Engine
    data: Any
    ids: torch.Tensor
    mask: torch.Tensor
    src_ids: torch.Tensor
    src_mask: torch.Tensor
    heads: list[SiteBinding]
    src: dict[str, torch.Tensor] = field(default_factory=dict)  # each head's source value

    @classmethod
    def load(cls, cfg: Config, folder: Path) -> Ctx:
        write_rows(folder, cfg.size["vocab"])
        (folder / "h.yaml").write_text(STUDY.format(**cfg.fill))
        study, plan = compile_file(folder / "h.yaml")
        state = loaded_for(plan, model=study.model)
        sweep = plan.jobs_for("sweep")[0]
        dev = state.engine.device
        batches = [
            (torch.tensor(x, device=dev) for x in state.data.padded(list(rows)))
            for rows in (sweep.rows, sweep.source_rows)
        ]
        (ids, mask), (src_ids, src_mask) = batches
        sites = {plan.sites[v.interventions[0].site] for v in sweep.variants}
        heads = sorted(sites, key=lambda s: (s.module, s.start or 0))
        return cls(plan, study.model.module, state.engine, state.data, ids, mask, src_ids,
                   src_mask, heads)  # fmt: skip

    def job(self, name: str) -> Job:
        return self.plan.jobs_for(name)[0]


def run_patching(cfg: Config, folder: Path, table: Table) -> list[Goal]:
    """Single patch, the 288-variant sweep, attribution and path patching (study 1)."""
    ctx = Ctx.load(cfg, folder)
    sweep, attrib = ctx.job("sweep"), ctx.job("attrib")
    assert attrib.rows == sweep.rows and attrib.source_rows == sweep.source_rows
    check_small(ctx, sweep)
    warm_resume(ctx, sweep)
    goals = single_patch(cfg, ctx, table)
    exhaustive, more = sweep_288(cfg, ctx, table)
    goals += more
    goals += attribution(cfg, ctx, table, exhaustive)
    goals += attribution_all(cfg, ctx, table, exhaustive)
    goals += path_patching(cfg, ctx, table)
    for name in ("sweep", "attrib", "paths"):
        est, where = estimate_mib(ctx.plan, ctx.job(name), ctx.model, cfg.device)
        table.notes[name + " est"] = f"{est}|{where}"
    return goals


CAPTURE, CAPTURE2 = "floor: capture all heads (src)", "floor: capture all heads, 2 pos"
PLAIN, PLAIN2 = "plain forward (masked)", "plain forward, logits at 2 pos"
HOOKED, HOOKED2 = "floor: hook patched pass", "floor: hook patched pass, 2 pos"
ENGINE, ENGINE2 = "single: engine.run + Write", "single: engine.run + Write, 2 pos"
OP, VERIFY = "attribution: op (estimates + verify)", "attribution: verify (run_job)"


def single_patch(cfg: Config, ctx: Ctx, table: Table) -> list[Goal]:
    """One head (all positions, source value given) through the engine and through a pre-hook;
    and the per-pass parts every floor is summed from."""
    m, ids, mask = ctx.model, ctx.ids, ctx.mask
    print(f"  single patch and floor parts ({cfg.rounds} rounds) ...", file=sys.stderr)
    table.time({CAPTURE: lambda: hook_capture(m, ctx.src_ids, ctx.src_mask, ctx.heads)})
    ctx.src = table.keep.pop(CAPTURE)
    head = ctx.plan.sites[f"L{cfg.size['layers'] // 2 - 1}.H{cfg.size['heads'] // 4}"]
    one = [Write(head, slice(0, len(ids)), None, ctx.src[head.name])]
    hook_one = [(head, None, ctx.src[head.name])]
    table.time({
        PLAIN: lambda: forward(m, ids, mask),
        ENGINE: lambda: ctx.engine.run(ids, mask, writes=one),
        HOOKED: lambda: hook_patch(m, ids, mask, hook_one),
    }, cfg.rounds)  # fmt: skip
    torch.testing.assert_close(table.keep[ENGINE][0], table.keep[HOOKED])
    lean = {
        PLAIN2: at_scored(lambda: forward(m, ids, mask), m),
        HOOKED2: at_scored(lambda: hook_patch(m, ids, mask, hook_one), m),
        CAPTURE2: at_scored(lambda: hook_capture(m, ctx.src_ids, ctx.src_mask, ctx.heads), m),
    }
    if "logits" in inspect.signature(Engine.run).parameters:  # only the scored logits
        scored = torch.tensor(SCORED, device=ids.device).expand(len(ids), -1)
        lean[ENGINE2] = lambda: ctx.engine.run(ids, mask, writes=one, logits=scored)
    table.time(lean)
    table.keep.clear()
    table.passes |= {ENGINE: "1", ENGINE2: "1", PLAIN: "1"}
    out = [("single patch: engine.run / hook pass", table.ratio(ENGINE, HOOKED), "<= 1.02", 1.02)]
    if ENGINE2 in table.seconds:
        label = "single patch, logits at 2 pos: engine / hooks"
        out.append((label, table.ratio(ENGINE2, HOOKED2), "(info)", math.inf))
    return out


def sweep_288(cfg: Config, ctx: Ctx, table: Table) -> tuple[str, list[Goal]]:
    """Activation patching of every head at 2 positions (one job), on a stratified sample."""
    sweep, plan = ctx.job("sweep"), ctx.plan
    part = subset(sweep, stratified(first_write(sweep, plan, ctx.engine), cfg.sample))
    name, n = "sweep: run_job", len(sweep.variants)
    print(f"  sweep: {len(part.variants)} of {n} variants ...", file=sys.stderr)
    log = table.sampled(name, run_job, part, ctx)
    table.set(name, scaled_patch(sweep, part, plan, log, table.took(name)))
    table.passes[name] = str(sweep.forward_passes(plan.max_batch_rows))
    if len(part.variants) < n:
        table.notes[name] = f"{len(part.variants)} variants timed (stratified by layer), scaled"
    floor, floor2 = "floor: sweep (full logits)", "floor: sweep (logits at 2 pos)"
    note = "sum: capture + clean + n x patched"
    table.derive(floor, {CAPTURE: 1, PLAIN: 1, HOOKED: n}, n + 2, note)
    table.derive(floor2, {CAPTURE2: 1, PLAIN2: 1, HOOKED2: n}, n + 2, note)
    if cfg.profile:
        print(f"\n--- cProfile: sweep run_job on {len(part.variants)} variants (1 call) ---")
        print(profile(lambda: run_job(part, plan, ctx.engine, ctx.data), 1))
    return name, [
        (f"sweep {n} / hook floor (full logits)", table.ratio(name, floor), "<= 0.7", 0.7),
        (f"sweep {n} / hook floor (logits at 2 pos)", table.ratio(name, floor2), "(info)",
         math.inf),
    ]  # fmt: skip


def attribution(cfg: Config, ctx: Ctx, table: Table, exhaustive: str) -> list[Goal]:
    """Node attribution over the sweep's 288 sites, verification included, against the sweep
    (exhaustive patching of the same sites) and against a hand-written estimate."""
    attrib, plan = ctx.job("attrib"), ctx.plan
    items = [tuple(it) for it in attrib.params["items"]]
    est_name, hook_name = "attribution: estimate_all", "floor: attribution (2 fwd + bwd)"
    print("  attribution ...", file=sys.stderr)
    table.time({
        est_name: lambda: estimate_all(attrib, plan, ctx.engine, ctx.data),
        hook_name: lambda: _grad(attribution_bench.hook_estimates)(
            ctx.model, ctx.ids, ctx.mask, ctx.src_ids, ctx.src_mask, ctx.heads,
            lambda logits: loss_at(logits, ctx.ids),
        ),
    })  # fmt: skip
    est, by_hand = table.keep.pop(est_name)[0], table.keep.pop(hook_name)
    where = {
        h.name: (int(h.module.split(".")[2]), h.start // (h.stop - h.start)) for h in ctx.heads
    }
    want = torch.stack([by_hand[(*where[site], POS[pos])] for site, pos in items])
    torch.testing.assert_close(est, want.to(est), rtol=1e-3, atol=1e-5)
    chosen = choose(est.mean(1), attrib.params["top_k"], attrib.params.get("bottom", 0))
    time_verified(
        cfg, ctx, table, attrib, [Item(*items[i]) for i in chosen], (est_name, OP, VERIFY),
        whole=lambda: run_attribution(attrib, plan, ctx.engine, ctx.data),
    )  # fmt: skip
    table.passes[est_name] = table.passes[hook_name] = "2+1b"
    return [
        ("exhaustive (sweep) / attribution incl. verify", table.ratio(exhaustive, OP),
         f"(info: {len(items)} sites, top_k {attrib.params['top_k']})", math.inf),
        ("exhaustive (sweep) / attribution estimates", table.ratio(exhaustive, est_name),
         "(info)", math.inf),
        ("attribution estimates / hook floor", table.ratio(est_name, hook_name), "(info)",
         math.inf),
    ]  # fmt: skip


ALL_EST, ALL_OP = "attribution, all pos: estimate_all", "attribution, all pos: op"
ALL_VERIFY, ALL_EXHAUSTIVE = "attribution, all pos: verify", "exhaustive, all heads x positions"


def time_verified(
    cfg: Config,
    ctx: Ctx,
    table: Table,
    job: Job,
    chosen: list[Item],
    names: tuple[str, str, str],
    whole: Callable[[], Any] | None = None,
) -> None:
    """The attribution op's time as ``op`` (``names``: estimates, op, verification): its
    estimates, already timed, plus the verification ``run_job`` of ``chosen``, timed on a
    stratified sample and scaled; ``whole`` (the op itself) is timed instead where the sample
    would be every verification variant."""
    est, op, verify = names
    vjob = verification_job(job, chosen)
    vpart = subset(vjob, stratified(first_write(vjob, ctx.plan, ctx.engine), cfg.verify_sample))
    if whole is not None and len(vpart.variants) == len(vjob.variants):
        table.time({op: whole})
    else:
        log = table.sampled(verify, run_job, vpart, ctx)
        took = scaled_patch(vjob, vpart, ctx.plan, log, table.took(verify))
        table.set(op, (table.seconds[est] + took[0], table.cpu[est] + took[1]))
        n, k = len(vpart.variants), len(vjob.variants)
        table.notes[op] = f"estimate_all + verify run_job ({n} of {k} variants, scaled)"
        table.notes[verify] = "(unscaled)"
    mr = ctx.plan.max_batch_rows
    table.passes[op] = f"{job.forward_passes(mr)}+{job.backward_passes(mr)}b"


def attribution_all(cfg: Config, ctx: Ctx, table: Table, exhaustive: str) -> list[Goal]:
    """Node attribution over every head at every position (the usual attribution map, sites >>
    top_k), verification included, against exhaustive patching of the same sites: that sweep's
    cost is the measured 288-variant sweep's per patched pass (a resumed pass costs the same at
    any position: its layer decides) times the items, plus its source and clean passes."""
    job, plan = ctx.job("attrib_all"), ctx.plan
    items = [tuple(it) for it in job.params["items"]]
    print(f"  attribution over {len(items)} head x position sites ...", file=sys.stderr)
    table.time({ALL_EST: lambda: estimate_all(job, plan, ctx.engine, ctx.data)})
    est = table.keep.pop(ALL_EST)[0]
    chosen = choose(est.mean(1), job.params["top_k"], job.params.get("bottom", 0))
    names = (ALL_EST, ALL_OP, ALL_VERIFY)
    time_verified(cfg, ctx, table, job, [Item(*items[i]) for i in chosen], names)
    table.passes[ALL_EST] = "2+1b"
    sweep = ctx.job("sweep")
    fixed = 2  # the sweep's source and clean passes, each about one plain forward
    per = [
        (t - fixed * table.took(PLAIN)[i]) / len(sweep.variants)
        for i, t in enumerate(table.took(exhaustive))
    ]
    table.set(ALL_EXHAUSTIVE, tuple(fixed * table.took(PLAIN)[i] + per[i] * len(items)
                                    for i in range(2)))  # fmt: skip
    table.passes[ALL_EXHAUSTIVE] = str(len(items) + fixed)
    table.notes[ALL_EXHAUSTIVE] = f"the sweep's cost per patched pass x {len(items)} sites"
    return [
        (f"exhaustive ({len(items)}) / attribution incl. verify, all pos",
         table.ratio(ALL_EXHAUSTIVE, ALL_OP), ">= 20", -20.0),
        (f"exhaustive ({len(items)}) / attribution estimates, all pos",
         table.ratio(ALL_EXHAUSTIVE, ALL_EST), "(info)", math.inf),
    ]  # fmt: skip


def path_patching(cfg: Config, ctx: Ctx, table: Table) -> list[Goal]:
    """12 senders x 12 receivers (one job), on a sample of pairs, against the same pass plan by
    hand (``PathFloor``), each floor pass timed once and counted as often as the plan runs it."""
    paths, plan = ctx.job("paths"), ctx.plan
    pairs = Pairs.of(paths)
    part = subset(paths, stratified(pairs.group_of, cfg.path_sample))
    name, n = "path: run_path_patch", len(paths.variants)
    sender, receiver = part.variants[0].interventions[0].site, part.params["receivers"][0][0]
    pf = PathFloor(ctx.model, plan, paths, ctx.ids, ctx.src)
    print(f"  path patching: {len(part.variants)} of {n} pairs ...", file=sys.stderr)
    log = table.sampled(name, run_path_patch, part, ctx)
    clean, p2, p3 = "floor: path clean pass", "floor: path pass 2", "floor: path pass 3"
    table.time({
        clean: pf.clean_pass,
        p2: lambda: pf.pass2(sender, receiver),
        p3: lambda: pf.pass3(receiver),
        p2 + ", 2 pos": at_scored(lambda: pf.pass2(sender, receiver), ctx.model),
        p3 + ", 2 pos": at_scored(lambda: pf.pass3(receiver), ctx.model),
    })  # fmt: skip
    ours = torch.tensor(table.keep.pop(name).variants[0])
    torch.testing.assert_close(ours, table.keep[p3].cpu(), rtol=1e-4, atol=1e-4)
    table.keep.clear()
    table.set(name, scaled_path(paths, plan, log, table.took(name)))
    table.passes[name] = str(paths.forward_passes(plan.max_batch_rows))
    if len(part.variants) < n:
        twos = len(log.seconds("pass2", 0))
        table.notes[name] = f"{len(part.variants)} pairs timed ({twos} pass 2), scaled"
    *_, rows2, rows3 = pairs.level_rows(paths)
    n2, n3 = rows2 // len(paths.rows), rows3 // len(paths.rows)
    goals: list[Goal] = []
    for tag, cap, extra in (("full logits", CAPTURE, ""), ("logits at 2 pos", CAPTURE2, ", 2 pos")):
        key = f"floor: path ({tag})"
        parts = {cap: 1, clean: 1, p2 + extra: n2, p3 + extra: n3}
        table.derive(key, parts, 2 + n2 + n3, "sum: same pass plan as the op")
        goals.append((f"path {n} pairs / hook floor ({tag})", table.ratio(name, key), "(info)",
                      math.inf))  # fmt: skip
    return goals


def _grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*a: Any) -> Any:
        with torch.enable_grad():
            return fn(*a)

    return call


def write_rows(folder: Path, vocab: int) -> None:
    rng = random.Random(0)
    with open(folder / "rows.jsonl", "w") as f:
        for _ in range(N_DATA):
            row = {"tokens": [rng.randrange(vocab) for _ in range(TOKENS)], "scored": SCORED}
            f.write(json.dumps(row | {"label": rng.randrange(vocab)}) + "\n")


def _two_rows(job: Job) -> Job:
    return job.model_copy(update={"rows": job.rows[:2], "source_rows": job.source_rows[:2]})


def check_small(ctx: Ctx, sweep: Job) -> None:
    """The sweep's numbers equal the hooks' on 2 rows and 2 variants (cheap: 2-row passes)."""
    small = _two_rows(subset(sweep, [0, len(sweep.variants) - 1]))
    got = run_job(small, ctx.plan, ctx.engine, ctx.data)
    ids, src_ids = ctx.ids[:2], ctx.src_ids[:2]
    sites = [ctx.plan.sites[v.interventions[0].site] for v in small.variants]
    src = hook_capture(ctx.model, src_ids, ctx.src_mask[:2], sites)
    for v, site, mine in zip(small.variants, sites, got.variants, strict=True):
        edit = [(site, POS[v.interventions[0].pos], src[site.name])]
        want = loss_at(hook_patch(ctx.model, ids, ctx.mask[:2], edit), ids)
        torch.testing.assert_close(torch.tensor(mine), want.cpu(), rtol=1e-4, atol=1e-4)


def warm_resume(ctx: Ctx, sweep: Job) -> None:
    """Check every resume point once (on 2 rows), as a process does on its first job: the
    one-time check is no part of a job's cost (``Job.forward_passes`` leaves it out)."""
    keys = first_write(sweep, ctx.plan, ctx.engine)
    firsts = sorted({k: i for i, k in reversed(list(enumerate(keys)))}.values())
    run_job(_two_rows(subset(sweep, firsts)), ctx.plan, ctx.engine, ctx.data)


def run_das(cfg: Config, folder: Path, table: Table) -> list[Goal]:
    """One DAS training step, full rank and rank 16 (study 2), against hooks + backward."""
    (folder / "das.yaml").write_text(DAS_STUDY.format(**cfg.fill))
    study, plan = compile_file(folder / "das.yaml")
    state = loaded_for(plan, model=study.model)
    full, low = plan.jobs_for("das_full")[0], plan.jobs_for("das_rank16")[0]
    assert full.rows == low.rows and full.params["site"] == low.params["site"]
    p = full.params
    site = plan.sites[p["site"]]
    print("  das: capture ...", file=sys.stderr)  # once for both: same rows, same site
    keep = set(p["train"]["base"])
    cap = das_op._capture(full, plan, state.engine, state.data, site, p["position"], keep)
    out = [das_case(cfg, table, job, state, site, cap) for job in (full, low)]
    try:
        import pyvene  # noqa: F401
    except ImportError:
        out.append(("DAS step / pyvene 0.1.8", NONE, "<= 0.6: pyvene not installed", 0.6))
    else:
        out.append(("DAS step / pyvene 0.1.8", NONE, "<= 0.6: see das_step.py", 0.6))
    return out


def das_case(cfg: Config, table: Table, job: Job, state: Any, site: SiteBinding, cap) -> Goal:
    """Seconds per ``Trainer.fit`` step (skip mode: only the layers above the site run) and per
    hand-written step, from the same initial rotation (their first losses must agree)."""
    p, engine, label = job.params, state.engine, job.experiment
    width = cap.values.shape[-1]
    index = {r: i for i, r in enumerate(job.rows)}
    train = das_op.Split.of(p["train"], index)
    none = das_op.Split.of({"base": [], "labels": [], "sources": [[]]}, index)
    inter = das_op.Interchange(width, 1, p["dim"], p["intervention"], seed=p["seed"])
    twin = das_op.Interchange(width, 1, p["dim"], p["intervention"], seed=p["seed"])
    trainer = das_op.Trainer(inter, das_op.Runner(engine, site, state.data), cap, cfg.rows)
    steps = p["training"] | {"epochs": cfg.das_steps}
    ids = torch.tensor(state.data.padded(train.rows)[0], device=engine.device)
    hs = cap.values[train.src[0]].to(engine.device)  # [N, 1, w]: cached once, not timed
    layer = int(site.module.split(".")[-1])
    model = state.model.module
    name, floor = f"{label}: mi_spec step", f"floor: {label} step"
    check_cpu = []  # fit's skip-mode check (2 forwards) is no part of a step: its CPU time
    skip_mode = trainer._skip_mode

    def checked(*a: Any) -> Any:
        c0 = time.process_time()
        out = skip_mode(*a)
        check_cpu.append(time.process_time() - c0)
        return out

    trainer._skip_mode = checked  # type: ignore[method-assign]
    print(f"  {label}: {cfg.das_steps} step(s) ...", file=sys.stderr)
    table.time({
        name: lambda: trainer.fit(train, none, steps, 0, "bench"),
        floor: das_floor(model, layer, twin, ids, hs, train.labels),
    })  # fmt: skip
    hist, first = table.keep.pop(name), table.keep.pop(floor)
    assert hist["mode"] == "skip", hist["mode"]
    assert abs(hist["loss"][0] - first) <= 1e-3 * max(1.0, abs(first)), (hist["loss"], first)
    cpu = (table.cpu[name] - check_cpu[-1]) / max(1, hist["steps"])
    table.set(name, (hist["seconds_per_step"], cpu))  # fit's own clock: the steps alone
    table.passes[name], table.passes[floor] = "1+1b above", "1+1b"
    table.notes[name] = f"{cfg.das_steps} step(s), layers below the site skipped"
    kind = f"{width}x{width}, {p['dim']} dims" if p["intervention"] == "full" else "rank 16"
    return (f"DAS step ({kind}) / hook floor", table.ratio(name, floor), "(info)", math.inf)


def das_floor(model, layer: int, inter, ids, hs, labels) -> Callable[[], float]:
    """A DAS step by hand: rotation parametrized once, a forward hook on block ``layer`` that
    interchanges the rotated dims at the last position, the loss, ``autograd.grad`` into the
    rotation only (the model is frozen), an optimizer step. Returns the step's loss."""
    block = model.transformer.h[layer]
    params = [q for q in inter.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    labels = labels.to(ids.device)

    def step() -> float:
        r = inter.matrix()[:, : inter.k].to(ids.device)

        def patch(_m, _a, o):
            o = o.clone()
            hb = o[:, -1:]
            o[:, -1:] = hb + ((hs.to(hb.dtype) - hb) @ r) @ r.T
            return o

        handle = block.register_forward_hook(patch)
        try:
            with torch.enable_grad():
                loss = F.cross_entropy(model(ids).logits[:, -1].float(), labels)
                grads = torch.autograd.grad(loss, params)
        finally:
            handle.remove()
        for q, g in zip(params, grads, strict=True):
            q.grad = g
        opt.step()
        return loss.item()

    return step


def scrub_line(cfg: Config) -> str:
    if cfg.scrub:
        return "scrubbing at this size: scrub_scale.py follows (--scrub)"
    return "scrubbing at this size: tests/benchmarks/scrub_scale.py, or this script with --scrub"


MEMORY = {  # job -> the timed cases whose memory rise it covers
    "sweep": ["sweep: run_job"],
    "attrib": ["attribution: estimate_all", VERIFY, OP],
    "paths": ["path: run_path_patch"],
}


def report(cfg: Config, table: Table, goals: list[Goal], wall: float) -> None:
    s, mem = cfg.size, table.mem
    print(
        f"\nmi_spec research-scale benchmark: GPT-2 config n_layer={s['layers']} n_embd="
        f"{s['width']} n_head={s['heads']} vocab={s['vocab']} (random init), batch {cfg.rows}x"
        f"{TOKENS}, loss at positions {SCORED}, {cfg.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, max_batch_rows {cfg.max_rows}; single-patch cases:"
        f" min of {cfg.rounds} round(s), the others 1 round; wall {wall:.0f} s"
    )
    unit = table.cpu[PLAIN]
    print(f"\n{'case':40s} {'wall s':>8s} {'cpu s':>8s} {'x fwd':>7s} {'passes':>8s} "
          f"{'faults':>8s} {'peak MiB':>8s} {'+MiB':>6s}  note")  # fmt: skip
    for name, sec in table.seconds.items():
        faults, peak, rise = (_num(d.get(name), w) for d, w in
                              ((table.faults, 8), (mem.peak, 8), (mem.rise, 6)))  # fmt: skip
        print(
            f"{name:40s} {sec:8.2f} {table.cpu[name]:8.2f} {table.cpu[name] / unit:7.2f} "
            f"{table.passes.get(name, ''):>8s} {faults} {peak} {rise}  {table.notes.get(name, '')}"
        )
    print(
        "\ncpu s: this process's CPU time (all threads): the work done, which load from other"
        " jobs barely moves, unlike wall time (on CUDA read wall time); x fwd: cpu s over one"
        " plain masked forward's; passes: forward(+backward) passes, Job.forward_passes(max_batch_rows) for"
        " mi_spec jobs; faults: minor page faults of the timed call; peak MiB: the process's peak"
        " RSS during the call (CUDA: peak allocated), +MiB: its rise over the memory held when"
        " the call began (freed heap trimmed first)"
    )
    print(f"\n{'memory: mi_spec estimate vs seen':40s} {'est MiB':>8s} {'+MiB':>8s}  estimate from")
    for job, cases in MEMORY.items():
        est, where = table.notes.get(job + " est", "nan|-").split("|")
        seen = max((mem.rise[c] for c in cases if c in mem.rise), default=math.nan)
        print(f"{job:40s} {_num(float(est), 8)} {_num(seen, 8)}  {where}")
    print(f"\n{'comparison (ratio of times)':50s} {'wall':>7s} {'cpu':>7s}  goal: wall, cpu")
    for label, ratios, goal, limit in goals:
        ok = "" if math.isinf(limit) or math.isnan(ratios[0]) else ": "
        ok += ", ".join(("yes" if _met(r, limit) else "NO") for r in ratios) if ok else ""
        print(f"{label:50s} {_num(ratios[0], 7, 3)} {_num(ratios[1], 7, 3)}  {goal}{ok}")
    print(f"\n{scrub_line(cfg)}")


def _num(value: float | None, width: int, digits: int = 0) -> str:
    """``value`` right-aligned in ``width``; ``-`` where there is none."""
    if value is None or math.isnan(value):
        return f"{'-':>{width}s}"
    return f"{value:{width}.{digits}f}"


def _met(value: float, limit: float) -> bool:
    return value >= -limit if limit < 0 else value <= limit


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="8 rows a batch, 1 round, smallest samples (~5 min on 2 CPU cores)",
    )
    ap.add_argument("--rows", type=int, default=None, help="rows a batch (default 32; quick 8)")
    ap.add_argument("--max-rows", type=int, default=None, help="max_batch_rows (default: --rows)")
    ap.add_argument(
        "--rounds", type=int, default=None, help="rounds of the single-patch cases (min; default 3)"
    )
    ap.add_argument(
        "--sample",
        type=int,
        default=None,
        help="sweep variants timed, stratified by layer (CPU default 12, one per layer;"
        " 0 = all 288)",
    )
    ap.add_argument(
        "--verify-sample",
        type=int,
        default=None,
        help="verification variants timed (CPU default 4; 0 = the whole op)",
    )
    ap.add_argument(
        "--path-sample",
        type=int,
        default=None,
        help="path pairs timed (CPU default 2; 0 = all 144)",
    )
    ap.add_argument("--das-steps", type=int, default=None, help="DAS steps timed (CPU default 1)")
    ap.add_argument("--top-k", type=int, default=20, help="attribution verify.top_k")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--profile", action="store_true", help="cProfile the sampled sweep run")
    ap.add_argument("--smoke", action="store_true", help="a tiny model: checks the script runs")
    ap.add_argument("--scrub", action="store_true", help="also run scrub_scale.py's case")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")

    def pick(value: int | None, quick: int, default: int, on_gpu: int) -> int:
        if value is not None:
            return value
        return on_gpu if gpu else (quick if args.quick or args.smoke else default)

    rows = pick(args.rows, 8 if args.quick else 4, 32, 32)
    cfg = Config(
        size=SIZES["smoke" if args.smoke else "gpt2-small"],
        rows=rows,
        max_rows=args.max_rows or rows,
        device=args.device,
        rounds=pick(args.rounds, 1, 3, 5),
        sample=pick(args.sample, 6, 12, 0),
        verify_sample=pick(args.verify_sample, 2, 4, 0),
        path_sample=pick(args.path_sample, 2, 2, 0),
        das_steps=pick(args.das_steps, 1, 1, 5),
        top_k=args.top_k,
        profile=args.profile,
        scrub=args.scrub,
    )
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    table = Table(cfg, Memory(cfg.device))
    with tempfile.TemporaryDirectory(prefix="mi_spec_bench_") as folder:
        goals = run_patching(cfg, Path(folder), table)
        goals += run_das(cfg, Path(folder), table)
    report(cfg, table, goals, time.perf_counter() - t0)
    if cfg.scrub:
        run_scrub(args.threads)


def run_scrub(threads: int) -> None:
    """The scrubbing case at this size: ``scrub_scale.py`` with its defaults, in its own process
    (its peak RSS is then its own)."""
    script = Path(__file__).resolve().parent / "scrub_scale.py"
    if not script.exists():
        print("--scrub: tests/benchmarks/scrub_scale.py is not present")
        return
    print(f"\n--- scrubbing: {script.name} --threads {threads} ---", flush=True)
    subprocess.run([sys.executable, str(script), "--threads", str(threads)], check=False)


if __name__ == "__main__":
    main()
