"""Benchmark: the commands researchers run most, as subprocesses (imports included), median of
``--repeats`` rounds, against the goals of the researcher's-view issue.

    python tests/benchmarks/everyday.py [--repeats 5] [--files hypotheses/induction_patching.yaml ...]

Prints, per command: median and min wall time, the goal, and whether it is met (on ``min``). Then,
per file, which heavy libraries ``validate --static`` loads (none of torch, matplotlib, mlflow,
nnsight should appear for a file whose model comes from user code; a bundled model is built on the
meta device, which needs torch, but not torch._dynamo), and where the time of ``validate`` and
``plan`` goes: one ``python -X importtime`` run each, split into the import of torch, of nnsight
(with transformers), of everything else, and the work after the imports (importtime's own
overhead inflates the imports by ~10%). Load on a shared machine only adds time: read ``min``.

Every command runs in a process group of its own, with a timeout, and the whole group is ended
when it returns or fails (``tests/procs.py``).

This is a script, not a test: pytest must not collect it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import procs  # noqa: E402  (tests/procs.py: own session, timeout, group ended in a finally)

__test__ = False

TIMEOUT_S = 300.0  # one command, on a loaded 2-core machine
MI_SPEC = [sys.executable, "-m", "mi_spec.cli.main"]
BUNDLED = [
    "hypotheses/induction_patching.yaml",
    "hypotheses/induction_scrub.yaml",
    "hypotheses/equality_das.yaml",
    "hypotheses/induction_paths.yaml",
]
HEAVY = ("torch", "torch._dynamo", "matplotlib", "mlflow", "nnsight", "transformers", "distributed")
SPLIT = ("torch", "nnsight", "transformers")  # the imports the breakdown names


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    """``cmd`` to completion in its own process group; exits the script if it fails."""
    done = procs.run(cmd, cwd=ROOT, timeout=TIMEOUT_S)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done


def timed(cmd: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(cmd)
        out.append(time.perf_counter() - t)
    return out


def loaded_by_static(path: str) -> str:
    """The heavy modules in ``sys.modules`` after ``validate --static path``."""
    code = (
        "import sys; from mi_spec.cli.main import main; main(['validate', '--static', "
        f"{path!r}]); print(' '.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    )
    lines = run([sys.executable, "-c", code]).stderr.strip().splitlines()
    return lines[-1] if lines else ""


def import_split(stderr: str) -> dict[str, float]:
    """Seconds of import from ``-X importtime`` output: ``total``, each of `SPLIT` (outermost
    entry, not counted again inside another of them), and ``rest``."""
    entries = []  # (name, level, cumulative s), children before their parent
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if not cumulative.strip().isdigit():
            continue  # the header line
        name = name[1:]
        level = (len(name) - len(name.lstrip(" "))) // 2
        entries.append((name.strip(), level, int(cumulative) / 1e6))
    split = {"total": sum(s for _, level, s in entries if level == 0)}
    for i, (name, level, seconds) in enumerate(entries):
        if name not in SPLIT or name in split:
            continue
        parents, want = [], level
        for parent, parent_level, _ in entries[i + 1 :]:
            if parent_level < want:
                parents.append(parent)
                want = parent_level
        if not set(parents) & set(SPLIT):
            split[name] = seconds
    split["rest"] = split["total"] - sum(split.get(n, 0.0) for n in SPLIT)
    return split


def breakdown(cmd: list[str]) -> str:
    """One importtime run of ``cmd``: wall time, its imports split, and the work after them."""
    t = time.perf_counter()
    done = run([sys.executable, "-X", "importtime", *cmd[1:]])
    wall = time.perf_counter() - t
    split = import_split(done.stderr)
    parts = ", ".join(f"{n} {split[n]:.2f}" for n in (*SPLIT, "rest") if n in split)
    return (
        f"{wall:.2f}s = imports {split['total']:.2f}s ({parts}) + work {wall - split['total']:.2f}s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--files", nargs="+", default=BUNDLED)
    args = p.parse_args()
    cases: list[tuple[str, list[str], float | None]] = [
        ("mi-spec --help", [*MI_SPEC, "--help"], 0.5),
        ("import mi_spec.api", [sys.executable, "-c", "import mi_spec.api"], None),
        ("import torch (for reference)", [sys.executable, "-c", "import torch"], None),
    ]
    for f in args.files:
        name = Path(f).stem
        cases += [
            (f"validate --static {name}", [*MI_SPEC, "validate", "--static", f], 1.0),
            (f"validate {name}", [*MI_SPEC, "validate", f], 2.0),
            (f"plan {name}", [*MI_SPEC, "plan", f], 2.0),
        ]
    print(f"{'command':<44} {'median':>8} {'min':>8} {'goal':>8}  met", flush=True)
    for name, cmd, goal in cases:
        times = timed(cmd, args.repeats)
        med, low = statistics.median(times), min(times)
        g = f"{goal:7.1f}s" if goal else "       -"
        met = "" if goal is None else ("yes" if low <= goal else "NO")
        print(f"{name:<44} {med:7.2f}s {low:7.2f}s {g}  {met}", flush=True)
    print()
    for f in args.files:
        loaded = loaded_by_static(f) or "none of " + ", ".join(HEAVY)
        print(f"validate --static {f}: loads {loaded}", flush=True)
    print()
    for f in args.files:
        for verb in ("validate", "plan"):
            print(f"{verb} {Path(f).stem}: {breakdown([*MI_SPEC, verb, f])}", flush=True)


if __name__ == "__main__":
    main()
