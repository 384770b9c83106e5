"""Per-process state of an executor: the model, its engine and the dataset, loaded once per plan's
model reference and reused by every job (jobs carry a reference, never a model)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mi_spec.data.dataset import Dataset, load_dataset
from mi_spec.errors import ExecutionError
from mi_spec.execute.allocator import recycle_large_blocks, release_free_blocks
from mi_spec.execute.engine import Engine
from mi_spec.execute.ops import op_for
from mi_spec.models.load import LoadedModel, load_model
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.sites.adapter import SiteBinding
from mi_spec.spec.sections import DataSection, ModelSection


@dataclass
class Loaded:
    model: LoadedModel
    engine: Engine
    data: Dataset
    checked: set[frozenset[str]] = field(default_factory=set)  # site sets already checked


_LOADED: dict[tuple[str, str], Loaded] = {}  # (model key, data hash) -> state
PROBE_TOKENS = 8  # tokens of the probe pass (forward order and call counts)


def loaded_for(plan: Plan, model: LoadedModel | None = None) -> Loaded:
    """The model/engine/dataset for ``plan``, from this process's cache or loaded now.

    ``model`` lets the caller hand over a model it already loaded (in-process runs). A plan on
    the same model with other data (the next file of ``mi-spec run a.yaml b.yaml``) reuses the
    model this process holds and loads only the data.
    """
    key = (plan.model.key, plan.data.data_hash)
    if key in _LOADED:
        return _LOADED[key]
    if model is None:
        model = next((s.model for k, s in _LOADED.items() if k[0] == plan.model.key), None)
    if model is None:
        section = ModelSection.model_validate(plan.model.section)
        model = load_model(section, Path(plan.model.base_dir))
    if model.weights_hash != plan.model.weights_hash:
        raise ExecutionError(
            f"model weights changed since the plan was compiled "
            f"({model.weights_hash} != {plan.model.weights_hash}); compile the plan again"
        )
    data_section = DataSection.model_validate(plan.data.section)
    data = load_dataset(data_section, Path(plan.data.base_dir), plan.data.model_dir)
    if data.content_hash() != plan.data.data_hash:
        raise ExecutionError("dataset changed since the plan was compiled; compile it again")
    recycle_large_blocks()  # a process that runs passes: no page faults for every large tensor
    # the probe pass learns forward order and call counts: a few tokens tell it as well as many
    sample = torch.tensor([data.tokens[0][:PROBE_TOKENS]], device=model.device)
    unembed = model.adapter.table.get("logits")
    engine = Engine(
        model.module, sample, data.padding_side, unembed=unembed.module if unembed else None
    )
    _LOADED.clear()  # one model per process at a time keeps memory bounded
    _LOADED[key] = Loaded(model, engine, data)
    return _LOADED[key]


def check_sites_once(
    plan: Plan, state: Loaded, bind: Callable[[str], SiteBinding] | None = None
) -> None:
    """The site contract checks (``site_check.check_sites``) of every site of ``plan`` on this
    process's model, once per process and set of sites; ``bind`` names the residual points of
    the identity checks (default: the model's adapter). Raises ResolveError naming the site."""
    if not plan.model.section.get("check_sites", True):
        return
    names = frozenset(plan.sites)
    if names in state.checked:
        return
    from mi_spec.execute.site_check import check_sites
    from mi_spec.sites.adapter import bind_site

    model = state.model
    rows = list(range(min(4, len(state.data))))
    ids, mask = (torch.tensor(x, device=model.device) for x in state.data.padded(rows))
    check_sites(
        state.engine,
        plan.sites.values(),
        ids,
        mask,
        bind=bind or (lambda name: bind_site(model.adapter, model.module, name)),
        n_layers=int(plan.dims.get("n_layers", 0)),
    )
    state.checked.add(names)


def execute_job(plan: Plan, job: Job) -> JobResult:
    """Run one job in this process (the function Dask workers call); the plan's sites are
    checked before this process's first job on them."""
    state = loaded_for(plan)
    check_sites_once(plan, state)
    try:
        return op_for(job.op)(job, plan, state.engine, state.data)
    finally:
        release_free_blocks()
