"""The everyday commands import only what they use (their times: `tests/benchmarks/everyday.py`).

Each check runs in a fresh interpreter: what a test process has imported already says nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import procs
import pytest

ROOT = Path(__file__).resolve().parents[2]
WATCHED = (
    "torch",
    "torch._dynamo",  # ~1.5 s, pulled in by some meta-device kernels of torch 2.13
    "nnsight",
    "transformers",
    "mlflow",
    "matplotlib",
    "distributed",
    "dask",
    "pandas",
)
CODE = """
import sys
from mi_spec.cli.main import main
try:
    rc = main({argv!r})
except SystemExit as e:  # --help
    rc = e.code
print("rc", rc)
print("loaded", *[m for m in {watched!r} if m in sys.modules])
"""


def loaded_by(argv: list[str], cwd: Path = ROOT) -> tuple[int, set[str]]:
    """Exit code of ``mi-spec *argv`` and the watched modules it imported."""
    code = CODE.format(argv=argv, watched=WATCHED)
    proc = procs.run([sys.executable, "-c", code], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rc, loaded = proc.stdout.strip().splitlines()[-2:]
    return int(rc.split()[1]), set(loaded.split()[1:])


def test_help_imports_nothing_heavy():
    rc, loaded = loaded_by(["--help"])
    assert rc == 0
    assert loaded == set(), f"mi-spec --help imported {sorted(loaded)}"


@pytest.mark.parametrize("name", ["induction_patching", "equality_das", "handbuilt_scrub"])
def test_static_on_a_bundled_model_imports_no_torch(name):
    """A bundled model's structure is known without torch (``zoo/skeletons.py``): nothing heavy
    is imported, torch included."""
    rc, loaded = loaded_by(["validate", "--static", f"hypotheses/{name}.yaml"])
    assert rc == 0
    assert loaded == set(), f"validate --static imported {sorted(loaded)}"


def test_static_on_an_hf_config_model_builds_it_on_meta(study_file):
    """An hf_config model is built on the meta device (torch and transformers; nothing runs)."""
    rc, loaded = loaded_by(["validate", "--static", str(study_file())])
    assert rc == 0
    assert "torch" in loaded and not loaded & {"mlflow", "distributed", "matplotlib"}


def test_static_with_user_model_code_imports_no_torch(tmp_path):
    """The model comes from user code (not run), the data from a mi_spec generator (imported,
    and it needs no torch): nothing heavy is imported."""
    (tmp_path / "my_model.py").write_text("import torch\n\ndef build():\n    raise SystemExit(3)\n")
    path = tmp_path / "study.yaml"
    path.write_text(
        "name: s\nmodel:\n  factory: my_model:build\ndata:\n"
        "  generator: mi_spec.zoo.tasks:repeated_tokens\n  params: {n: 8, seq_len: 9}\n"
        "  positions: {repeat: {start: 5, stop: 8}}\nmetric: {kind: loss, at: repeat}\n"
        "experiments:\n  - {kind: activation_patching, sites: [L0.H0], positions: [repeat]}\n"
    )
    rc, loaded = loaded_by(["validate", "--static", str(path)], cwd=tmp_path)
    assert rc == 0
    assert loaded == set(), f"validate --static imported {sorted(loaded)}"


def test_importing_the_api_imports_no_torch():
    """`mi_spec.api` imports torch, nnsight and the runners only in the functions that use them."""
    code = f"import sys, mi_spec.api; print(*[m for m in {WATCHED!r} if m in sys.modules])"
    proc = procs.run([sys.executable, "-c", code], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [], f"import mi_spec.api imported {proc.stdout.split()}"


def test_short_commands_run_as_the_program_without_the_cyclic_collector():
    """``mi-spec validate`` (the program) turns the cyclic collector off; a caller of ``main`` in
    its own process keeps it."""
    code = (
        "import gc, sys; from mi_spec.cli.main import main\n"
        "main(['validate', '--static', 'hypotheses/equality_das.yaml']); print(gc.isenabled())\n"
        "sys.argv = ['mi-spec', 'validate', '--static', 'hypotheses/equality_das.yaml']\n"
        "main(); print(gc.isenabled())\n"
    )
    proc = procs.run([sys.executable, "-c", code], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [line for line in proc.stdout.splitlines() if line in ("True", "False")]
    assert states == ["True", "False"], proc.stdout
