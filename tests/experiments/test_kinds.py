"""The kind registry holds every kind, whichever experiment module happened to be imported first."""

from __future__ import annotations

import sys

import procs

FIRST_ONE_KIND = """
import mi_spec.experiments.causal_scrubbing  # registers itself before anyone asks for kinds()
from mi_spec.experiments.base import kinds
print(" ".join(sorted(kinds())))
"""


def test_kinds_are_complete_after_one_kind_was_imported_directly():
    done = procs.run([sys.executable, "-c", FIRST_ONE_KIND], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = set(done.stdout.split())
    assert {"activation_patching", "causal_scrubbing", "das", "path_patching",
            "attribution_patching", "ablation", "circuit_discovery"} <= names  # fmt: skip
