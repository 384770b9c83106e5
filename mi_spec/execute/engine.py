"""The intervention engine: one forward pass through nnsight that reads and writes sites.

Sites are visited in the model's forward order (learned once by a probe pass), whatever order a job
lists them in. Reads are copies, so later writes never alias them. Writes replace the activation by
an edited copy. nnsight installs its hooks for the trace and removes them when it ends, also on error.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from nnsight import NNsight

from mi_spec.errors import ExecutionError, ResolveError
from mi_spec.sites.adapter import SiteBinding


@dataclass(frozen=True)
class Read:
    """Copy ``site`` at per-row positions ``pos`` ([B, P] long, or None for all) into ``key``."""

    key: Any
    site: SiteBinding
    pos: torch.Tensor | None


@dataclass(frozen=True)
class Write:
    """Set ``site`` for batch rows ``rows`` (a slice) at ``pos`` ([b, P] or None) to ``value``."""

    site: SiteBinding
    rows: slice
    pos: torch.Tensor | None
    value: torch.Tensor  # [b, P, w] or [b, T, w] (broadcastable)


def probe_order(
    model: torch.nn.Module, sample: torch.Tensor
) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """Run one forward with plain hooks: (module, io) -> first call index, and module -> calls."""
    order: dict[tuple[str, str], int] = {}
    counts: dict[str, int] = defaultdict(int)
    handles = []

    def pre(name: str):
        def hook(_m, _args):
            counts[name] += 1
            order.setdefault((name, "input"), len(order))

        return hook

    def post(name: str):
        def hook(_m, _args, _out):
            order.setdefault((name, "output"), len(order))

        return hook

    try:
        for name, mod in model.named_modules():
            handles.append(mod.register_forward_pre_hook(pre(name)))
            handles.append(mod.register_forward_hook(post(name)))
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return order, dict(counts)


class Engine:
    """A model wrapped with nnsight, plus its forward order."""

    def __init__(self, model: torch.nn.Module, sample: torch.Tensor):
        self.model = model
        self.nn = NNsight(model)
        self.order, self.calls = probe_order(model, sample)
        self.pass_mask = _accepts_mask(model)
        self.device = next(model.parameters()).device

    def check_binding(self, site: SiteBinding) -> None:
        """A site must name a module that runs exactly once per forward."""
        n = self.calls.get(site.module, 0)
        if n > 1:
            raise ResolveError(
                f"site {site.name!r}: module {site.module!r} runs {n} times per forward, "
                "so a site there is ambiguous"
            )
        if n == 0:
            raise ResolveError(
                f"site {site.name!r}: module {site.module!r} never runs in a forward pass "
                "(an intervention there would silently do nothing)"
            )

    def run(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        reads: Sequence[Read] = (),
        writes: Sequence[Write] = (),
    ) -> tuple[torch.Tensor, dict[Any, torch.Tensor]]:
        """One forward; returns the logits and the values read (``key`` -> tensor)."""
        by_site: dict[tuple[str, str], tuple[list[Read], list[Write]]] = defaultdict(
            lambda: ([], [])
        )
        for r in reads:
            by_site[(r.site.module, r.site.io)][0].append(r)
        for w in writes:
            by_site[(w.site.module, w.site.io)][1].append(w)
        for key in by_site:
            self.check_binding(_binding_of(by_site[key]))
        ordered = sorted(by_site.items(), key=lambda kv: self.order[kv[0]])
        out: dict[Any, Any] = {}
        kwargs = {"attention_mask": mask} if self.pass_mask else {}
        try:
            with torch.no_grad(), self.nn.trace(ids, **kwargs):
                for (module, io), (site_reads, site_writes) in ordered:
                    env = self.envoy(module)
                    act = env.input if io == "input" else env.output
                    for r in site_reads:
                        out[r.key] = _gather(act, r.site, r.pos).clone()
                    if site_writes:
                        new = act.clone()
                        for w in site_writes:
                            _scatter(new, w)
                        replace(env, io, act, new, site_writes[0].site.in_place)
                out["__logits__"] = self.nn.output
        except (ResolveError, ExecutionError):
            raise
        except Exception as e:
            names = ", ".join(sorted({_binding_of(v).name for v in by_site.values()}))
            raise _failed("forward pass with sites", names, e) from e
        return _logits_of(out.pop("__logits__")), out

    def run_with_grad(
        self, ids: torch.Tensor, mask: torch.Tensor, sites: Sequence[SiteBinding]
    ) -> tuple[dict[tuple[str, str], torch.Tensor], torch.Tensor]:
        """One forward with autograd on: each site's whole activation, live in the graph, by
        (module, io), and the logits. Gradients w.r.t. these are those of the values a patch
        replaces: a module *input* becomes a copy only this module reads (a patch of it reaches
        this module only), except ``in_place`` sites (also a residual skip), which stay the live
        tensor so every use is in the graph; an activation that does not require grad yet (frozen
        weights) becomes an equal leaf that does (for an in-place site: plus a zero, in place)."""
        keys = sorted({(s.module, s.io) for s in sites}, key=lambda k: self.order[k])
        shared = {(s.module, s.io) for s in sites if s.in_place}
        for s in sites:
            self.check_binding(s)
        acts: dict[Any, torch.Tensor] = {}
        kwargs = {"attention_mask": mask} if self.pass_mask else {}
        try:
            with torch.enable_grad(), self.nn.trace(ids, **kwargs):
                for module, io in keys:
                    env = self.envoy(module)
                    act = env.input if io == "input" else env.output
                    if (module, io) in shared:
                        if not act.requires_grad:
                            act.add_(torch.zeros_like(act, requires_grad=True))
                    elif not act.requires_grad or io == "input":
                        fresh = act.detach().requires_grad_(True) if not act.requires_grad else None
                        act = fresh if fresh is not None else act.clone()
                        replace(env, io, act, act, in_place=False)
                    acts[(module, io)] = act
                acts["__logits__"] = self.nn.output
        except (ResolveError, ExecutionError):
            raise
        except Exception as e:
            names = ", ".join(sorted(f"{m}.{io}" for m, io in keys))
            raise _failed("gradient pass over", names, e) from e
        return acts, _logits_of(acts.pop("__logits__"))

    def envoy(self, path: str) -> Any:
        """The nnsight envoy of the module at dotted ``path``."""
        env: Any = self.nn
        for part in path.split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env


def _failed(what: str, names: str, error: Exception) -> ExecutionError:
    return ExecutionError(f"{what} [{names}] failed: {type(error).__name__}: {error}")


def _logits_of(result: Any) -> torch.Tensor:
    """The logits of a model output (an HF output object or a plain tensor)."""
    return result.logits if hasattr(result, "logits") else result


def replace(env: Any, io: str, act: torch.Tensor, new: torch.Tensor, in_place: bool) -> None:
    """Make ``new`` the value of a module's input/output. ``in_place`` sites (a module input that
    is also a residual skip) are overwritten in place, so every use of the tensor sees ``new``."""
    if in_place:
        act.copy_(new)
    elif io == "input":
        env.input = new
    else:
        env.output = new


def _accepts_mask(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes ``attention_mask`` (HF models and the zoo do)."""
    params = inspect.signature(model.forward).parameters
    return "attention_mask" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def _binding_of(pair: tuple[list[Read], list[Write]]) -> SiteBinding:
    reads, writes = pair
    return (reads or writes)[0].site  # type: ignore[union-attr]


def _cols(site: SiteBinding) -> slice:
    return slice(site.start, site.stop)


def _gather(act: torch.Tensor, site: SiteBinding, pos: torch.Tensor | None) -> torch.Tensor:
    if pos is None:
        return act[:, :, _cols(site)]
    rows = torch.arange(act.shape[0], device=act.device)[:, None]
    return act[rows, pos.to(act.device), _cols(site)]


def _scatter(new: torch.Tensor, w: Write) -> None:
    block = new[w.rows]
    value = w.value.to(device=new.device, dtype=new.dtype)
    if w.pos is None:
        block[:, :, _cols(w.site)] = value
        return
    rows = torch.arange(block.shape[0], device=new.device)[:, None]
    block[rows, w.pos.to(new.device), _cols(w.site)] = value
