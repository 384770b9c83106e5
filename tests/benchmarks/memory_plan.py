"""Benchmark: ``mi-spec plan``'s peak-memory estimate against the measured peak, for every kind.

A GPT-2-small-sized model built from a config (12 layers, 768 wide, 12 heads, vocab 50257,
``n_positions`` 64, random init) and random rows of 64 tokens. Each kind runs its largest job in
a fresh subprocess, so its peak is its own: the model and the data are loaded, the job's op is
warmed up on one row (imports, nnsight's first trace, a gradient pass), freed memory is handed
back, then the resident set is read (``VmRSS``), its high-water mark reset
(``echo 5 > /proc/self/clear_refs``) and the job run. Measured: ``VmHWM`` minus that resident set,
the job's own memory, weights excluded (printed apart); on CUDA ``max_memory_allocated`` minus
``memory_allocated`` before the job. Compared with `mi_spec.plan.memory.estimate_job`'s ``job``
figure (kept + activations + logits + gradients [+ allocator]).

    python tests/benchmarks/memory_plan.py [--kinds das,logit_lens] [--rows N] [--threads N]
        [--malloc exact|recycle] [--device cpu|cuda]

``--malloc exact`` (default) fixes glibc's mmap threshold at 128 KiB, so every tensor is mapped
when allocated and unmapped when freed: the resident set follows the live tensors, as
``max_memory_allocated`` does on a GPU, and the estimate's CPU ``allocator`` share is left out.
``--malloc recycle`` runs the allocator as workers do (``execute/allocator.py``) and compares the
whole CPU estimate. See README.md beside this file.

This is a script, not a test: pytest must not collect it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__test__ = False

TOKENS, VOCAB, N_DATA = 64, 50257, 96
TOLERANCE = 0.25
MODEL = f"""model:
  hf_config: {{model_type: gpt2, n_layer: 12, n_embd: 768, n_head: 12, vocab_size: {VOCAB},
    n_positions: {TOKENS}, bos_token_id: 0, eos_token_id: 0}}
  device: cpu
  check_sites: false
data:
  path: rows.jsonl
  positions: {{subj: {{start: 10, stop: 13}}, mid: 32, end: -2}}
max_batch_rows: {{max_rows}}
"""
LOSS = "metric: {kind: loss, at: end}\n"
LABEL = "metric: {kind: accuracy, at: end, target: label}\nvariables:\n  x: {column: label}\n"
SCRUB = """metric: {kind: loss, at: end}
variables:
  tp: {value: "tokens[pos] % 2", per_position: true}
  pa: {value: "tp[pos - 1] if pos > 0 else 0", per_position: true}
correspondence:
  tp: [embed]
  pa: [L1.H1]
"""
# kind -> (metric block, experiment); {rows}: base rows of the job
KINDS: dict[str, tuple[str, str]] = {
    "activation_patching": (
        LOSS,
        "{kind: activation_patching, sites: [L3.H0, L6.H1, L9.H2, L11.H3, L11.H4, L11.H5],"
        " positions: [end], samples: {rows}, batch_size: {rows}}",
    ),
    "ablation": (
        LOSS,
        "{kind: ablation, sites: [L2.H0, L5.H3, L8.mlp_out], method: mean, mean_samples: {rows},"
        " positions: [all], samples: {rows}, batch_size: {rows}}",
    ),
    "path_patching": (
        LOSS,
        "{kind: path_patching, senders: [L3.H0, L4.H1], receivers: ['L9.H6:q', 'L10.H0:v'],"
        " positions: [end], receiver_positions: [end], samples: {rows}, batch_size: {rows}}",
    ),
    "attribution_patching": (
        LOSS,
        "{kind: attribution_patching, sites: ['L*.H*'], positions: [end], samples: {rows},"
        " batch_size: {rows}, verify: {top_k: 4}}",
    ),
    "das": (
        LABEL,
        "{kind: das, variables: x, site: L6.resid_post@end, intervention: low_rank, dim: 8,"
        " batch_size: {rows}, pairs: {train: {rows}, val: 8, test: 8},"
        " training: {epochs: 1, patience: null}}",
    ),
    "logit_lens": (LOSS, "{kind: logit_lens, samples: {rows}, batch_size: {rows}}"),
    "causal_tracing": (
        LOSS,
        "{kind: causal_tracing, source: {noise: 3.0, at: subj}, positions: [subj, end],"
        " restore: [resid], samples: {rows}, batch_size: {rows}}",
    ),
    "causal_scrubbing": (
        SCRUB,
        "{kind: causal_scrubbing, samples: {small}, batch_size: {small},"
        " controls: {n_random: 0, drop_one: false}}",
    ),
    "circuit_discovery": (
        LOSS,
        "{kind: circuit_discovery, method: eap, split_qkv: false, samples: {small},"
        " batch_size: {small}, sizes: [0, 50], minimality: 0}",
    ),
}


def write_study(folder: Path, kind: str, rows: int, max_rows: int) -> Path:
    """The rows (once) and the one-experiment hypothesis file of ``kind``."""
    data = folder / "rows.jsonl"
    if not data.exists():
        rng = random.Random(0)
        with open(data, "w") as f:
            for _ in range(N_DATA):
                tokens = [rng.randrange(1, VOCAB) for _ in range(TOKENS)]
                f.write(json.dumps({"tokens": tokens, "label": rng.randrange(VOCAB)}) + "\n")
    metric, experiment = KINDS[kind]
    small = max(2, rows // 8)
    exp = experiment.replace("{rows}", str(rows)).replace("{small}", str(small))
    head = MODEL.replace("{max_rows}", str(max_rows))
    path = folder / f"{kind}.yaml"
    path.write_text(f"name: memory-{kind}\n{head}{metric}experiments:\n  - {exp}\n")
    return path


# --- the child: one job, measured -------------------------------------------------------------


def _status(field: str) -> int:
    """A ``/proc/self/status`` figure in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _trim() -> None:
    """Hand freed heap memory back to the system, so the resident set is what is live."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _warm(state: Any, plan: Any, job: Any) -> None:
    """Import the job's op and trace once (one row, a read and a write, a gradient pass), so the
    measured peak holds no first-use costs."""
    import torch

    from mi_spec.execute.engine import Read, Write
    from mi_spec.execute.ops import op_for

    op_for(job.op)
    site = plan.sites[job.sites[0]] if job.sites else next(iter(plan.sites.values()))
    ids, mask = (torch.tensor(x, device=state.engine.device) for x in state.data.padded([0]))
    state.engine.run(ids, mask, reads=[Read("r", site, None)])
    state.engine.run(ids, mask, writes=[Write(site, slice(0, 1), None, torch.zeros(()))])
    if job.op in ("attribution", "das", "discovery"):
        acts, logits = state.engine.run_with_grad(ids, mask, [site])
        torch.autograd.grad(logits[:, -1].sum(), list(acts.values()), allow_unused=True)


def child(path: Path, threads: int, device: str = "cpu") -> dict[str, Any]:
    """Run the largest job of the study at ``path`` on ``device``; its estimate and measured
    peak (CPU: the resident set's growth; CUDA: ``max_memory_allocated``'s)."""
    import torch

    torch.set_num_threads(threads)
    from mi_spec.api import compile_file
    from mi_spec.execute.ops import op_for
    from mi_spec.execute.worker import loaded_for
    from mi_spec.plan.memory import estimate_job, model_size

    cuda = device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else _status("VmRSS")
    study, plan = compile_file(path, [f"model.device={device}"])
    state = loaded_for(plan, model=study.model)
    size = model_size(study.model.module, plan)
    loaded = (torch.cuda.memory_allocated() if cuda else _status("VmRSS")) - before
    job = max(plan.jobs, key=lambda j: estimate_job(plan, j, size, device=device).job)
    est = estimate_job(plan, job, size, device=device)
    _warm(state, plan, job)
    _trim()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    op_for(job.op)(job, plan, state.engine, state.data)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")) - base
    return {
        "rows": len(job.rows),
        "op": job.op,
        "estimate": est.job,
        "parts": est.parts(),
        "measured": peak,
        "weights_estimate": est.weights,
        "weights_loaded": loaded,
        "seconds": seconds,
    }


# --- the parent: a fresh process per kind -----------------------------------------------------


def run_kind(folder: Path, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    path = write_study(folder, kind, args.rows, args.max_rows)
    env = dict(os.environ)
    if args.malloc == "exact":
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    cmd = [sys.executable, __file__, "--child", str(path), "--threads", str(args.threads)]
    cmd += ["--device", args.device]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{kind}: child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds")
    ap.add_argument("--rows", type=int, default=16, help="base rows per job (scrub, discovery: /8)")
    ap.add_argument("--max-rows", type=int, default=64, help="the study's max_batch_rows")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    ap.add_argument("--malloc", choices=["exact", "recycle"], default="exact")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: max_memory_allocated")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.threads, args.device)))
        return 0
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        ap.error(f"unknown kinds {unknown}; known: {', '.join(KINDS)}")
    print(
        f"GPT-2 small config (12 x 768, vocab {VOCAB}), {TOKENS} tokens, {args.rows} rows per job,"
        f" max_batch_rows {args.max_rows}, {args.threads} thread(s), malloc {args.malloc}"
    )
    print(f"{'kind':<22} {'op':<14} {'estimate MiB':>12} {'measured MiB':>12} {'ratio':>6}  ok")
    failed, weights = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            r = run_kind(Path(tmp), kind, args)
            if args.malloc == "exact":  # no allocator share: the resident set is the live tensors
                r["estimate"] -= r["parts"].pop("allocator", 0)
            ratio = r["estimate"] / max(1, r["measured"])
            ok = abs(ratio - 1) <= TOLERANCE
            failed += [] if ok else [kind]
            print(
                f"{kind:<22} {r['op']:<14} {mib(r['estimate']):>12} {mib(r['measured']):>12}"
                f" {ratio:6.2f}  {'yes' if ok else 'NO'}   ({r['seconds']:.1f} s;"
                f" {', '.join(f'{k} {v / 2**20:.0f}' for k, v in r['parts'].items())})",
                flush=True,
            )
            weights = weights or (r["weights_estimate"], r["weights_loaded"])
    if weights:
        print(
            f"weights: estimate {mib(weights[0]).strip()} MiB; the load added"
            f" {mib(weights[1]).strip()} MiB of resident set (weights, imports, init temporaries)"
        )
    print(f"within +-{TOLERANCE:.0%}: {len(kinds) - len(failed)}/{len(kinds)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
