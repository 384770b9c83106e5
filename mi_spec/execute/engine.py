"""The intervention engine: one forward pass through nnsight that reads and writes sites.

Sites are visited in the model's forward order (learned once by a probe pass), whatever order a job
lists them in. Reads are copies, so later writes never alias them. Writes replace the activation by
an edited copy. nnsight installs its hooks for the trace and removes them when it ends, also on error.

Padding: callers always pass right-padded batches and positions index each row's own tokens. With
``padding_side="left"`` the engine moves each row's padding to the left for the forward pass, with
``position_ids`` counted from the attention mask (so absolute-position models such as GPT-2 see each
token at its own position), shifts every read and write by the row's padding, and hands logits and
whole-sequence reads back right-padded: results do not depend on the padding side.
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
from mi_spec.features.load import subspace_for
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

    def __init__(
        self,
        model: torch.nn.Module,
        sample: torch.Tensor,
        padding_side: str = "right",
        unembed: str | None = None,
    ):
        self.model = model
        self.nn = NNsight(model)
        self.order, self.calls = probe_order(model, sample)
        self.pass_mask = _accepts_mask(model)
        self.pass_positions = _accepts(model, "position_ids")
        self.device = next(model.parameters()).device
        self.padding_side = padding_side
        self.resumable: dict[str, bool] = {}  # module -> a pass may resume there (run_job)
        # the unembedding (the adapter's ``logits`` module): ``run(logits=pos)`` feeds it only the
        # scored positions; None (or a module that does not run once) computes all, then picks
        self.unembed = unembed if unembed and self.calls.get(unembed) == 1 else None

    def _inputs(
        self, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], _Layout | None]:
        """The forward's ids and keyword inputs, and the left-padding layout (None: as given)."""
        layout = _Layout.of(mask) if self.padding_side == "left" else None
        if layout is None:
            return ids, ({"attention_mask": mask} if self.pass_mask else {}), None
        if not (self.pass_mask and self.pass_positions):
            raise ExecutionError(
                f"data.padding_side: left needs a model whose forward takes attention_mask and "
                f"position_ids; {type(self.model).__name__} does not (use padding_side: right)"
            )
        mask = layout.to_left(mask)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        kwargs = {"attention_mask": mask, "position_ids": positions}
        return layout.to_left(ids), kwargs, layout

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

    def prefix_modules(self, module: str) -> list[str]:
        """The outermost modules that run (once) and finish before ``module`` starts, in forward
        order: what a pass resuming at ``module`` need not run."""
        start = self.order[(module, "input")]
        ancestors = {".".join(module.split(".")[:i]) for i in range(module.count(".") + 1)}
        done = {
            name for (name, io), i in self.order.items()
            if io == "output" and i < start and name not in ancestors and self.calls.get(name) == 1
        }  # fmt: skip
        top = [m for m in done if m.rpartition(".")[0] not in done]
        return sorted(top, key=lambda m: self.order[(m, "input")])

    def outputs(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        modules: Sequence[str],
        logits: bool | torch.Tensor = True,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One plain forward (right-padded rows); the logits (``logits`` as in ``run``, not
        False) and each module's whole output, as the module returned it (a tensor or a tuple):
        what ``run(skips=...)`` resumes from."""
        got: dict[str, Any] = {}
        ids, kwargs, _ = self._inputs(ids, mask)
        at = logits if isinstance(logits, torch.Tensor) else None
        ordered = sorted(modules, key=lambda m: self.order[(m, "output")])
        feed = at is not None and self.unembed is not None
        if (
            feed
            and ordered
            and self.order[(ordered[-1], "output")] > self.order[(self.unembed, "input")]
        ):
            feed = False  # a module read after the unembedding starts: it runs on every position
        with torch.no_grad(), self.nn.trace(ids, **kwargs):
            for m in ordered:
                got[m] = self.envoy(m).output
            if feed:
                self.feed_unembed(ids.shape[0], at)
            got["__logits__"] = self.nn.output
        result = _logits_of(got.pop("__logits__"))
        return (result if feed or at is None else _pick(result, at)), got

    def feed_unembed(self, rows: int, at: torch.Tensor) -> None:
        """Inside a trace: give the unembedding the rows' positions ``at`` [B, P] only."""
        env = self.envoy(self.unembed or "")
        index = torch.arange(rows, device=at.device)[:, None]
        env.input = env.input[index, at.to(env.input.device)]

    def run(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        reads: Sequence[Read] = (),
        writes: Sequence[Write] = (),
        skips: Sequence[tuple[str, Any]] = (),
        logits: bool | torch.Tensor = True,
    ) -> tuple[Any, dict[Any, torch.Tensor]]:
        """One forward; returns the logits and the values read (``key`` -> tensor).

        ``skips``: (module, output) pairs of modules that do not run; each returns the given
        output instead (clean-prefix reuse: a pass resumes from cached outputs of the modules
        before its first write). Right-padded batches only.

        ``logits``: True, all of them ``[B, T, V]``; a ``[B, P]`` tensor of positions, only
        those, ``[B, P, V]`` (the unembedding runs on those positions alone, and the model's own
        post-processing, e.g. soft-capping, still applies); False, none: the pass stops after
        its last site and returns None for them."""
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
        ids, kwargs, layout = self._inputs(ids, mask)
        if skips and layout is not None:
            raise ExecutionError("a pass resuming from cached outputs needs right-padded rows")
        skipped = sorted(skips, key=lambda s: self.order[(s[0], "input")])
        if layout is not None:
            reads = [layout.read(r) for r in reads]
            writes = [layout.write(w) for w in writes]
            by_site = defaultdict(lambda: ([], []))
            for r in reads:
                by_site[(r.site.module, r.site.io)][0].append(r)
            for w in writes:
                by_site[(w.site.module, w.site.io)][1].append(w)
            ordered = sorted(by_site.items(), key=lambda kv: self.order[kv[0]])
        picked = isinstance(logits, torch.Tensor)
        at = None
        if picked:
            at = logits.to(ids.device) + (0 if layout is None else layout.shift[:, None])
        unembed = (self.unembed, "input") if picked and self.unembed else None
        if unembed and any(module == self.unembed for module, _ in by_site):
            unembed = None  # a site on the unembedding: it runs on every position
        try:
            with torch.no_grad(), self.nn.trace(ids, **kwargs) as tracer:
                events = [(self.order[(m, "input")], m, v) for m, v in skipped]
                events += [(self.order[key], key, pair) for key, pair in ordered]
                if unembed:
                    events.append((self.order[unembed], unembed, None))
                for _, where, what in sorted(events, key=lambda e: e[0]):
                    if isinstance(where, str):  # a module that does not run
                        self.envoy(where).skip(what)
                        continue
                    if what is None:  # the unembedding, fed the scored positions only
                        self.feed_unembed(ids.shape[0], at)
                        continue
                    (module, io), (site_reads, site_writes) = where, what
                    env = self.envoy(module)
                    act = env.input if io == "input" else env.output
                    for r in site_reads:
                        out[r.key] = _gather(act, r.site, r.pos).clone()
                    if site_writes:
                        new = act.clone()
                        for w in site_writes:
                            _scatter(new, w)
                        replace(env, io, act, new, site_writes[0].site.in_place)
                if logits is False:
                    tracer.stop()
                out["__logits__"] = self.nn.output
        except (ResolveError, ExecutionError):
            raise
        except Exception as e:
            names = ", ".join(sorted({_binding_of(v).name for v in by_site.values()}))
            raise _failed("forward pass with sites", names, e) from e
        result = None if logits is False else _logits_of(out.pop("__logits__"))
        if picked and not unembed:  # computed everywhere: pick the positions
            result = _pick(result, at)
        elif layout is not None and result is not None and not picked:
            result = layout.to_right(result)
        if layout is not None:
            whole = {r.key for r in reads if r.pos is None}
            out = {k: layout.to_right(v) if k in whole else v for k, v in out.items()}
        return result, out

    def run_with_grad(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        sites: Sequence[SiteBinding],
        logits: torch.Tensor | None = None,
    ) -> tuple[dict[tuple[str, str], torch.Tensor], torch.Tensor]:
        """One forward with autograd on: each site's whole activation, live in the graph, by
        (module, io), and the logits. Gradients w.r.t. these are those of the values a patch
        replaces: a module *input* becomes a copy only this module reads (a patch of it reaches
        this module only), except ``in_place`` sites (also a residual skip), which stay the live
        tensor so every use is in the graph; an activation that does not require grad yet (frozen
        weights) becomes an equal leaf that does (for an in-place site: plus a zero, in place).
        ``logits``: [B, P] positions: the logits there only, [B, P, V] (as in ``run``)."""
        keys = sorted({(s.module, s.io) for s in sites}, key=lambda k: self.order[k])
        at = None
        if logits is not None:
            at = logits.to(ids.device)
        feed = at is not None and self.unembed is not None
        if feed and any(module == self.unembed for module, _ in keys):
            feed = False  # a site on the unembedding: it runs on every position
        shared = {(s.module, s.io) for s in sites if s.in_place}
        for s in sites:
            self.check_binding(s)
        acts: dict[Any, torch.Tensor] = {}
        ids, kwargs, layout = self._inputs(ids, mask)
        try:
            with torch.enable_grad(), self.nn.trace(ids, **kwargs):
                for module, io in keys:
                    env = self.envoy(module)
                    act = env.input if io == "input" else env.output
                    if layout is not None:  # the model reads the site through a right-padded copy
                        right = layout.to_right(act.clone())
                        if not right.requires_grad:
                            right = right.detach().requires_grad_(True)
                        replace(env, io, act, layout.to_left(right), (module, io) in shared)
                        act = right
                    elif (module, io) in shared:
                        if not act.requires_grad:
                            act.add_(torch.zeros_like(act, requires_grad=True))
                    elif not act.requires_grad or io == "input":
                        fresh = act.detach().requires_grad_(True) if not act.requires_grad else None
                        act = fresh if fresh is not None else act.clone()
                        replace(env, io, act, act, in_place=False)
                    acts[(module, io)] = act
                if feed:
                    self.feed_unembed(
                        ids.shape[0], at + (0 if layout is None else layout.shift[:, None])
                    )
                acts["__logits__"] = self.nn.output
        except (ResolveError, ExecutionError):
            raise
        except Exception as e:
            names = ", ".join(sorted(f"{m}.{io}" for m, io in keys))
            raise _failed("gradient pass over", names, e) from e
        result = _logits_of(acts.pop("__logits__"))
        if feed:
            return acts, result
        if layout is not None:
            result = layout.to_right(result)
        return acts, result if at is None else _pick(result, at)

    def envoy(self, path: str) -> Any:
        """The nnsight envoy of the module at dotted ``path``."""
        env: Any = self.nn
        for part in path.split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env


def _failed(what: str, names: str, error: Exception) -> ExecutionError:
    return ExecutionError(f"{what} [{names}] failed: {type(error).__name__}: {error}")


def _pick(logits: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, T, ...] at per-row positions ``at`` [B, P]: [B, P, ...]."""
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    return logits[rows, at.to(logits.device)]


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
    return _accepts(model, "attention_mask")


def _accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes keyword ``name`` (or any keyword)."""
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@dataclass(frozen=True)
class _Layout:
    """Left padding of a right-padded batch: row b moves right by ``shift[b]`` (its pad count)."""

    shift: torch.Tensor  # [B]
    left_from: torch.Tensor  # [B, T]: left[b, j] = right[b, left_from[b, j]]
    right_from: torch.Tensor  # [B, T]: right[b, p] = left[b, right_from[b, p]]

    @classmethod
    def of(cls, mask: torch.Tensor) -> _Layout | None:
        """The layout for ``mask`` (right-padded), or None when no row is padded."""
        width = mask.shape[1]
        shift = width - mask.sum(1).long()
        if not bool(shift.any()):
            return None
        j = torch.arange(width, device=mask.device)[None, :]
        return cls(shift, (j - shift[:, None]) % width, (j + shift[:, None]) % width)

    def _move(
        self, x: torch.Tensor, index: torch.Tensor, rows: slice = slice(None)
    ) -> torch.Tensor:
        index = index[rows].to(x.device)
        if x.dim() == 2:
            return x.gather(1, index)
        if x.shape[0] == 1 and index.shape[0] > 1:
            x = x.expand(index.shape[0], *x.shape[1:])
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    def to_left(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return self._move(x, self.left_from, rows)

    def to_right(self, x: torch.Tensor) -> torch.Tensor:
        return self._move(x, self.right_from)

    def read(self, r: Read) -> Read:
        if r.pos is None:
            return r
        return Read(r.key, r.site, r.pos.to(self.shift.device) + self.shift[:, None])

    def write(self, w: Write) -> Write:
        if w.pos is not None:
            pos = w.pos.to(self.shift.device) + self.shift[w.rows][:, None]
            return Write(w.site, w.rows, pos, w.value)
        value = w.value
        if value.dim() == 3:  # a whole sequence per row (or one broadcast over rows)
            value = self.to_left(value, w.rows)
        return Write(w.site, w.rows, None, value)


def _binding_of(pair: tuple[list[Read], list[Write]]) -> SiteBinding:
    reads, writes = pair
    return (reads or writes)[0].site  # type: ignore[union-attr]


def _cols(site: SiteBinding) -> slice:
    return slice(site.start, site.stop)


def _gather(act: torch.Tensor, site: SiteBinding, pos: torch.Tensor | None) -> torch.Tensor:
    if pos is None:
        picked = act[:, :, _cols(site)]
    else:
        rows = torch.arange(act.shape[0], device=act.device)[:, None]
        picked = act[rows, pos.to(act.device), _cols(site)]
    return coords_of(site, picked)


def coords_of(site: SiteBinding, x: torch.Tensor) -> torch.Tensor:
    """A subspace site's coordinates of its columns ``x`` [..., w] (``x`` itself for a plain site)."""
    return x if site.subspace is None else subspace_for(site.subspace, x).coords(x)


def assign(x: torch.Tensor, site: SiteBinding, value: torch.Tensor) -> torch.Tensor:
    """What the site's columns ``x`` [..., w] become when the site is set to ``value``: the value
    itself, or for a subspace site ``x`` with only the subspace's coordinates set to ``value``."""
    if site.subspace is None:
        return value.to(device=x.device, dtype=x.dtype).expand_as(x)
    return subspace_for(site.subspace, x).write(x, value.to(x.device))


def _scatter(new: torch.Tensor, w: Write) -> None:
    block = new[w.rows]
    if w.pos is None:
        at: tuple[Any, ...] = (slice(None), slice(None), _cols(w.site))
    else:
        rows = torch.arange(block.shape[0], device=new.device)[:, None]
        at = (rows, w.pos.to(new.device), _cols(w.site))
    block[at] = assign(block[at], w.site, w.value)
