"""Job ops: the executor routines a Job can name. ``patch`` (sweeps of interventions) is built in;
a kind needing a new op registers one here from its own ``execute/`` module (rare; review it).

Each op has a version (``register_op(name, version=N)``, default 1) that keys the result cache
(``execute/cache.py``): bump it in any change that alters what the op computes, so results cached by
the old code are not reused.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from mi_spec.data.dataset import Dataset
from mi_spec.execute.engine import Engine
from mi_spec.plan.ir import Job, JobResult, Plan

Op = Callable[[Job, Plan, Engine, Dataset], JobResult]

_OPS: dict[str, Op] = {}
_VERSIONS: dict[str, int] = {}
_BUILTIN = {
    "patch": "mi_spec.execute.run_job",
    "scrub": "mi_spec.execute.scrub_op",
    "das": "mi_spec.execute.das_op",
    "path_patch": "mi_spec.execute.path_op",
    "attribution": "mi_spec.execute.attribution_op",
    "discovery": "mi_spec.execute.discovery_op",
    "logit_lens": "mi_spec.execute.logit_lens_op",
    "causal_tracing": "mi_spec.execute.tracing_op",
}


def register_op(name: str, version: int = 1) -> Callable[[Op], Op]:
    def deco(fn: Op) -> Op:
        if name in _OPS and _OPS[name] is not fn:
            raise ValueError(f"job op {name!r} registered twice")
        _OPS[name], _VERSIONS[name] = fn, version
        return fn

    return deco


def op_for(name: str) -> Op:
    if name not in _OPS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _OPS:
        raise KeyError(f"unknown job op {name!r}; known: {', '.join(sorted(_OPS | _BUILTIN))}")
    return _OPS[name]


def op_version(name: str) -> int:
    """The registered version of op ``name`` (importing its module if needed)."""
    op_for(name)
    return _VERSIONS[name]
