"""The wiring of circuit discovery's graph in a model: the graph read from a job, hooks that
read or replace module inputs/outputs during a forward, how each sender writes the residual stream
(a head through its output projection) and how each receiver reads it (found by probing the model,
e.g. ``c_attn(ln_1(x))`` for a GPT-2 head's q/k/v, and checked on a clean run).

Plain PyTorch hooks, installed per pass and removed in ``finally``; modules are called through
their class's ``forward`` (no hooks, no tracer) when a receiver's read is recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from mi_spec.errors import ExecutionError
from mi_spec.plan.ir import Job
from mi_spec.sites.adapter import SiteBinding

Key = tuple[str, str]  # (module, io)


# --- the graph ----------------------------------------------------------------------------------


@dataclass
class Graph:
    """Senders, receivers (label, sites, point) and edges [sender index, receiver index]."""

    senders: list[str]
    receivers: list[tuple[str, list[str], str]]
    edges: list[tuple[int, int]]

    @classmethod
    def of(cls, job: Job) -> Graph:
        p = job.params
        return cls(
            list(p["senders"]),
            [(r[0], list(r[1]), r[2]) for r in p["receivers"]],
            [(int(u), int(r)) for u, r in p["edges"]],
        )

    @property
    def labels(self) -> list[str]:
        return [f"{self.senders[u]}->{self.receivers[r][0]}" for u, r in self.edges]

    def ablation_matrix(self, keep: torch.Tensor) -> torch.Tensor:
        """[G, E] kept-edge masks -> [G, R, U] ablation coefficients (1 = edge ablated)."""
        g = keep.shape[0]
        out = torch.zeros(g, len(self.receivers), len(self.senders), dtype=torch.float64)
        u = torch.tensor([e[0] for e in self.edges], dtype=torch.long)
        r = torch.tensor([e[1] for e in self.edges], dtype=torch.long)
        out[:, r, u] = 1.0 - keep.to(torch.float64)
        return out


# --- hooks ----------------------------------------------------------------------------------------


def first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def hooked(
    model: torch.nn.Module, handlers: dict[Key, list[Callable[[torch.Tensor], Any]]]
) -> Iterator[None]:
    """Install one hook per (module, io) calling its handlers in order; a handler returning a
    tensor replaces the value. Hooks are removed on exit, also on error."""
    modules = dict(model.named_modules())
    handles = []

    def run(key: Key, value: torch.Tensor) -> torch.Tensor | None:
        new = None
        for h in handlers[key]:
            got = h(value if new is None else new)
            if got is not None:
                new = got
        return new

    def pre(key: Key):
        def hook(_m, args):
            new = run(key, args[0])
            return None if new is None else (new, *args[1:])

        return hook

    def post(key: Key):
        def hook(_m, _args, out):
            new = run(key, first_tensor(out))
            if new is None:
                return None
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return hook

    try:
        for key in handlers:
            module, io = key
            if module not in modules:
                raise ExecutionError(f"discovery: no module {module!r} in the model")
            m = modules[module]
            handles.append(
                m.register_forward_pre_hook(pre(key))
                if io == "input"
                else m.register_forward_hook(post(key))
            )
        yield
    finally:
        for h in handles:
            h.remove()


def _plain(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call a leaf module's own forward: no hooks, no tracer."""
    return first_tensor(type(module).forward(module, x))


# --- how senders write and receivers read ----------------------------------------------------


@dataclass
class Wiring:
    """Per sender: its activation and how it writes; per receiver site: how it reads its point."""

    model: torch.nn.Module
    sites: dict[str, SiteBinding]
    readers: dict[str, list[torch.nn.Module]] = field(default_factory=dict)  # site -> chain
    # receiver modules that are linear, read by several receivers: their Jacobian [out, in]
    linear: dict[str, torch.Tensor] = field(default_factory=dict)
    writers: dict[str, torch.Tensor | None] = field(default_factory=dict)  # same, for senders

    def __post_init__(self) -> None:
        self.modules = dict(self.model.named_modules())

    def key(self, site: str) -> Key:
        b = self.sites[site]
        return (b.module, b.io)

    def is_head(self, site: str) -> bool:
        return self.sites[site].start is not None

    def write(self, site: str, act: torch.Tensor) -> torch.Tensor:
        """A sender's write to the residual stream from its module's activation ``act``."""
        b = self.sites[site]
        if b.start is None:
            return act
        module = self.modules[b.module]
        if b.module not in self.writers:  # a linear output projection: its weight block per head
            self.writers[b.module] = _jacobian_if_linear(module, act.detach())
        jac = self.writers[b.module]
        if jac is not None:
            return act[..., b.start : b.stop] @ jac[:, b.start : b.stop].T.to(act)
        masked = torch.zeros_like(act)
        masked[..., b.start : b.stop] = act[..., b.start : b.stop]
        return _plain(module, masked) - _plain(module, torch.zeros_like(act))

    def read(self, site: str, x: torch.Tensor) -> torch.Tensor:
        """Receiver site's activation (its columns) computed from residual value ``x``."""
        b = self.sites[site]
        for m in self.readers[site]:
            x = _plain(m, x)
        return x if b.start is None else x[..., b.start : b.stop]


def probe_readers(wiring: Wiring, graph: Graph, ids: torch.Tensor) -> None:
    """Find, for each receiver site, the leaf modules mapping its residual point to its activation
    (none, the receiver's module, or a norm then the module), and check them on ``ids``."""
    leaves = {n: m for n, m in wiring.model.named_modules() if not list(m.children())}
    seen_in: dict[str, torch.Tensor] = {}
    seen_out: dict[str, torch.Tensor] = {}
    handles = []

    def remember(name: str):
        def hook(_m, args, out):
            if args and isinstance(args[0], torch.Tensor):
                seen_in.setdefault(name, args[0].detach())
            if isinstance(first_tensor(out), torch.Tensor):
                seen_out.setdefault(name, first_tensor(out).detach())

        return hook

    try:
        for n, m in wiring.model.named_modules():
            handles.append(m.register_forward_hook(remember(n)))
        with torch.no_grad():
            wiring.model(ids)
    finally:
        for h in handles:
            h.remove()

    def value(site: str) -> torch.Tensor:
        b = wiring.sites[site]
        return (seen_in if b.io == "input" else seen_out)[b.module]

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        scale = float(b.abs().max()) or 1.0
        return a.shape == b.shape and bool((a - b).abs().max() <= 1e-5 * scale)

    found: dict[tuple[str, str, str], list[str]] = {}  # (point, module, io) -> chain
    for _, sites, point in graph.receivers:
        x = value(point)
        for s in sites:
            if s in wiring.readers:
                continue
            b = wiring.sites[s]
            if (point, b.module, b.io) in found:
                wiring.readers[s] = [leaves[c] for c in found[(point, b.module, b.io)]]
                continue
            wanted = seen_in[b.module] if b.io == "input" else None
            chains: list[list[str]] = []
            if b.io == "output":
                chains.append([b.module])
                wanted = seen_in.get(b.module)
            if wanted is not None and close(x, wanted):
                chain = chains[0] if chains else []
            else:
                norms = [
                    n for n in leaves if n in seen_in and close(seen_in[n], x)
                    and wanted is not None and close(seen_out.get(n, x[:0]), wanted)
                ]  # fmt: skip
                if not norms:
                    raise ExecutionError(
                        f"discovery: cannot find how receiver {s!r} reads {point!r} (no module "
                        "maps the residual point to the receiver's input); this architecture "
                        "needs path_patching for these edges"
                    )
                chain = [norms[0], *([b.module] if b.io == "output" else [])]
            if any(c not in leaves for c in chain):
                raise ExecutionError(f"discovery: receiver {s!r} is read by a non-leaf module")
            wiring.readers[s] = [leaves[c] for c in chain]
            found[(point, b.module, b.io)] = chain
            many = sum(
                wiring.sites[t].module == b.module for _, ts, _ in graph.receivers for t in ts
            )
            if b.io == "output" and b.start is not None and many > 1:
                jac = _jacobian_if_linear(leaves[b.module], seen_in[b.module])
                if jac is not None:
                    wiring.linear[b.module] = jac
            got = wiring.read(s, x)
            act = value(s) if b.start is None else value(s)[..., b.start : b.stop]
            if not close(got, act):
                raise ExecutionError(
                    f"discovery: receiver {s!r} recomputed from {point!r} differs from its value "
                    "in the model: the model does not read the residual stream as assumed"
                )


def _jacobian_if_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``J`` [out, in] with ``module(x) = x @ J.T + module(0)``, when that holds on ``x``."""
    with torch.no_grad():
        width = x.shape[-1]
        zero = _plain(module, torch.zeros(1, width, dtype=x.dtype, device=x.device))
        jac = (_plain(module, torch.eye(width, dtype=x.dtype, device=x.device)) - zero).T
        got = _plain(module, x)
        want = x @ jac.T + zero
    scale = float(got.abs().max()) or 1.0
    return jac if bool((got - want).abs().max() <= 1e-4 * scale) else None
