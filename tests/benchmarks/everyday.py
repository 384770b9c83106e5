"""Benchmark: the commands researchers run most, as subprocesses (imports included), median of
``--repeats`` rounds, against the goals of the researcher's-view issue.

    python tests/benchmarks/everyday.py [--repeats 5] [--files hypotheses/induction_patching.yaml ...]

Prints, per command: median and min wall time, the goal, and whether it is met. Also the import
time of ``mi_spec.api`` and which heavy libraries ``validate --static`` loads (none of torch,
matplotlib, mlflow, nnsight should appear for a file whose model comes from user code; a bundled
model is built on the meta device, which needs torch). Load on a shared machine only adds time:
read ``min`` there.

This is a script, not a test: pytest must not collect it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

__test__ = False

ROOT = Path(__file__).resolve().parents[2]
MI_SPEC = [sys.executable, "-m", "mi_spec.cli.main"]
BUNDLED = [
    "hypotheses/induction_patching.yaml",
    "hypotheses/induction_scrub.yaml",
    "hypotheses/equality_das.yaml",
    "hypotheses/induction_paths.yaml",
]
HEAVY = ("torch", "matplotlib", "mlflow", "nnsight", "transformers", "distributed")


def timed(cmd: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        out.append(time.perf_counter() - t)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return out


def loaded_by_static(path: str) -> list[str]:
    code = (
        "import sys; from mi_spec.cli.main import main; main(['validate', '--static', "
        f"{path!r}]); print(' '.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    return done.stderr.strip().splitlines()[-1:] or [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--files", nargs="+", default=BUNDLED)
    args = p.parse_args()
    cases: list[tuple[str, list[str], float | None]] = [
        ("mi-spec --help", [*MI_SPEC, "--help"], 0.5),
        ("import mi_spec.api", [sys.executable, "-c", "import mi_spec.api"], None),
    ]
    for f in args.files:
        name = Path(f).stem
        cases += [
            (f"validate --static {name}", [*MI_SPEC, "validate", "--static", f], 1.0),
            (f"validate {name}", [*MI_SPEC, "validate", f], 2.0),
            (f"plan {name}", [*MI_SPEC, "plan", f], 2.0),
        ]
    print(f"{'command':<44} {'median':>8} {'min':>8} {'goal':>8}  met")
    for name, cmd, goal in cases:
        times = timed(cmd, args.repeats)
        med, low = statistics.median(times), min(times)
        g = f"{goal:7.1f}s" if goal else "       -"
        met = "" if goal is None else ("yes" if low <= goal else "NO")
        print(f"{name:<44} {med:7.2f}s {low:7.2f}s {g}  {met}")
    for f in args.files:
        print(
            f"validate --static {f}: loads {loaded_by_static(f)[0] or 'none of ' + ', '.join(HEAVY)}"
        )


if __name__ == "__main__":
    main()
