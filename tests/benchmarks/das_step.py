"""Benchmark: one DAS training step in mi_spec against plain PyTorch and pyvene 0.1.8.

Same model (GPT-2 architecture from a config, random init, eval, CPU), same site (``L1.resid_post``
= ``transformer.h.1`` output, at the last position), same batch (64 rows x 32 tokens), a full-rank
256 x 256 rotation with half the dims swapped. Cases, each the median (or min) over rounds:

* ``forward`` / ``forward+backward``: the model alone; backward from the loss to the site value.
* ``hooks (ideal)``: plain PyTorch DAS, what the cost model says a step should cost: rotation once,
  cached source value, the whole model forward with a hook, backward, optimizer step.
* ``mi_spec skip`` / ``mi_spec run``: ``Trainer.fit`` seconds per step, with the layers below the site
  skipped (cached) or run.
* ``pyvene full-rank``: ``IntervenableModel`` + ``RotatedSpaceIntervention`` (source run every step,
  rotation parametrized per use). Skipped when pyvene is not installed: it is no project
  dependency (``pip install pyvene==0.1.8`` into the venv to compare).

    python tests/benchmarks/das_step.py [--rounds N] [--steps N] [--threads N] [--stat median|min]

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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mi_spec.api import compile_file
from mi_spec.execute import das_op
from mi_spec.execute.worker import loaded_for

__test__ = False

ROWS, TOKENS, VOCAB, N_DATA, LAYER, WIDTH = 64, 32, 1000, 256, 1, 256
STUDY = f"""
name: bench-das
model:
  hf_config: {{model_type: gpt2, n_layer: 4, n_embd: {WIDTH}, n_head: 4, vocab_size: {VOCAB},
    n_positions: 64, bos_token_id: 0, eos_token_id: 0}}
  device: cpu
  check_sites: false
data: {{path: rows.jsonl}}
metric: {{kind: accuracy, at: last, target: label}}
variables:
  x: {{column: label}}
experiments:
  - {{kind: das, variables: x, site: L{LAYER}.resid_post@last, intervention: full,
      dim: {WIDTH // 2}, batch_size: {ROWS}, pairs: {{train: {ROWS}, val: 0, test: 8}},
      training: {{epochs: 1, patience: null}}}}
"""


def timed(fn: Callable[[], object], rounds: int, stat: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) if stat == "median" else min(times)


def build(folder: Path):
    rng = random.Random(0)
    with open(folder / "rows.jsonl", "w") as f:
        for _ in range(N_DATA):
            row = {"tokens": [rng.randrange(VOCAB) for _ in range(TOKENS)]}
            f.write(json.dumps(row | {"label": rng.randrange(VOCAB)}) + "\n")
    (folder / "h.yaml").write_text(STUDY)
    study, plan = compile_file(folder / "h.yaml")
    return study, plan, loaded_for(plan, model=study.model)


def mi_spec_step(plan, state, skip: bool, steps: int) -> float:
    """Seconds per step of ``Trainer.fit`` (no validation), skip mode on or off."""
    job = plan.jobs[0]
    p = job.params
    site = plan.sites[p["site"]]
    keep = set(p["train"]["base"]) if skip else set()
    cap = das_op._capture(job, plan, state.engine, state.data, site, p["position"], keep)
    inter = das_op.Interchange(WIDTH, 1, WIDTH // 2, "full")
    index = {r: i for i, r in enumerate(job.rows)}
    train = das_op.Split.of(p["train"], index)
    val = das_op.Split.of({k: [] for k in ("base", "labels")} | {"sources": [[]]}, index)
    trainer = das_op.Trainer(inter, das_op.Runner(state.engine, site, state.data), cap, ROWS)
    hist = trainer.fit(train, val, p["training"] | {"epochs": steps}, 0, "bench")
    assert hist["mode"] == ("skip" if skip else "run"), hist["mode"]
    return hist["seconds_per_step"]


def plain_cases(model, ids, src, labels, rounds: int, stat: str) -> dict[str, float]:
    block = model.transformer.h[LAYER]
    with torch.no_grad():
        cache = {}
        handle = block.register_forward_hook(lambda m, a, o: cache.__setitem__("h", o[:, -1]))
        model(src)
        handle.remove()
    delta = torch.zeros(WIDTH, requires_grad=True)
    rot = das_op.Interchange(WIDTH, 1, WIDTH // 2, "full")
    opt = torch.optim.Adam(rot.parameters(), lr=1e-3)

    def forward():
        with torch.no_grad():
            model(ids)

    def forward_backward():
        h = block.register_forward_hook(lambda m, a, o: o + delta)
        try:
            loss = F.cross_entropy(model(ids).logits[:, -1], labels)
        finally:
            h.remove()
        torch.autograd.grad(loss, [delta])

    def hooks_step():
        r = rot.matrix()[:, : WIDTH // 2]

        def patch(m, a, o):
            o = o.clone()
            hb = o[:, -1]
            o[:, -1] = hb + ((cache["h"] - hb) @ r) @ r.T
            return o

        h = block.register_forward_hook(patch)
        try:
            loss = F.cross_entropy(model(ids).logits[:, -1], labels)
        finally:
            h.remove()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return {
        "forward": timed(forward, rounds, stat),
        "forward+backward": timed(forward_backward, rounds, stat),
        "hooks (ideal)": timed(hooks_step, rounds, stat),
    }


def pyvene_case(model, ids, src, labels, rounds: int, stat: str) -> float | None:
    try:
        import pyvene as pv
    except Exception as e:  # not installed, or broken against this transformers
        print(f"pyvene: skipped ({type(e).__name__}: {e})", file=sys.stderr)
        return None
    try:
        rep = pv.RepresentationConfig(LAYER, "block_output", "pos", 1)
        cfg = pv.IntervenableConfig([rep], intervention_types=pv.RotatedSpaceIntervention)
        im = pv.IntervenableModel(cfg, model)
        im.disable_model_gradients()
        (intervention,) = im.interventions.values()
        intervention = intervention[0] if isinstance(intervention, tuple) else intervention
        intervention.set_interchange_dim(WIDTH // 2)
        opt = torch.optim.Adam(intervention.parameters(), lr=1e-3)
        where = {"sources->base": ([[[TOKENS - 1]] * ROWS], [[[TOKENS - 1]] * ROWS])}

        def step():
            _, out = im({"input_ids": ids}, [{"input_ids": src}], where)
            loss = F.cross_entropy(out.logits[:, -1], labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return timed(step, rounds, stat)
    except Exception as e:
        print(f"pyvene: skipped ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="training steps timed per mi_spec round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stat", choices=["median", "min"], default="median")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        study, plan, state = build(Path(tmp))
        model = study.model.module
        gen = torch.Generator().manual_seed(0)
        ids, src = (torch.randint(0, VOCAB, (ROWS, TOKENS), generator=gen) for _ in range(2))
        labels = torch.randint(0, VOCAB, (ROWS,), generator=gen)
        results = plain_cases(model, ids, src, labels, args.rounds, args.stat)
        pick = statistics.median if args.stat == "median" else min
        for name, skip in (("mi_spec skip", True), ("mi_spec run", False)):
            runs = [mi_spec_step(plan, state, skip, args.steps) for _ in range(args.rounds)]
            results[name] = pick(runs)
        pv_time = pyvene_case(model, ids, src, labels, args.rounds, args.stat)
        if pv_time is not None:
            results["pyvene full-rank"] = pv_time
    unit = results["forward+backward"]
    print(f"DAS step, GPT-2 4x{WIDTH}, site L{LAYER}.resid_post@last, batch {ROWS}x{TOKENS}, "
          f"full rotation {WIDTH}x{WIDTH}, {args.threads} threads, {args.stat} of {args.rounds}")  # fmt: skip
    print(f"{'case':<20} {'ms/step':>9} {'x fwd+bwd':>10} {'x pyvene':>9}")
    for name, t in results.items():
        vs_pv = f"{t / pv_time:9.2f}" if pv_time else f"{'-':>9}"
        print(f"{name:<20} {1e3 * t:9.2f} {t / unit:10.2f} {vs_pv}")
    if pv_time:
        ratio = results["mi_spec skip"] / pv_time
        print(f"goal: mi_spec step <= 0.6x pyvene's full-rank step: {ratio:.2f}x "
              f"{'(met)' if ratio <= 0.6 else '(NOT met)'}")  # fmt: skip


if __name__ == "__main__":
    main()
