"""Architecture adapters: map the site vocabulary onto a model family's module paths.

An adapter is mostly a table (site kind -> module path template, input or output, head split). Adding a
family is one file in ``sites/adapters/`` that calls :func:`register`. No torch here: an adapter reads
dimensions from the model's config object and module names from ``named_modules()``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from mi_spec.errors import ResolveError
from mi_spec.sites.subspace_ref import SubspaceRef
from mi_spec.sites.vocabulary import GLOBAL_KINDS, LAYER_KINDS, Site, parse_site


@dataclass(frozen=True)
class Hook:
    """Where a site kind lives: ``module`` may contain ``{layer}``.

    For head sites, ``block`` says which part of a fused qkv projection holds them (0 for q or z,
    1 for k, 2 for v). With ``per_head == 0`` the fused columns are ``[all q | all k | all v]``
    (``n_heads``, ``n_kv_heads``, ``n_kv_heads`` heads of ``d_head``); with ``per_head == 3`` they
    go head by head, ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` (GPT-NeoX's ``query_key_value``).
    """

    module: str
    io: Literal["input", "output"] = "output"
    block: int = 0
    per_head: int = 0
    shared: bool = False  # the module's input is also a skip connection: write it in place


@dataclass(frozen=True)
class Dims:
    """A model's sizes. ``n_kv_heads`` < ``n_heads`` means grouped-query attention (0: same)."""

    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    n_kv_heads: int = 0

    def __post_init__(self) -> None:
        if not self.n_kv_heads:
            object.__setattr__(self, "n_kv_heads", self.n_heads)

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads if self.n_kv_heads else 1

    @property
    def gqa(self) -> bool:
        return self.n_kv_heads != self.n_heads


class SiteBinding(BaseModel):
    """A site resolved to a concrete place in one model: plain data, shipped in Plans."""

    model_config = ConfigDict(frozen=True)

    name: str
    module: str
    io: Literal["input", "output"]
    start: int | None = None  # feature columns [start, stop) of the activation; None = all
    stop: int | None = None
    # Write in place: the tensor is also used outside the module (e.g. GPT-2's ``ln_2`` input is
    # the residual skip too), so replacing only the module's argument would patch half a site.
    in_place: bool = False
    # Only these coordinates of the activation's columns are read and written (``site[name]``).
    subspace: SubspaceRef | None = None

    @property
    def width(self) -> int | None:
        """The width of the values read and written: the subspace's coordinates, or columns."""
        if self.subspace is not None:
            return self.subspace.width
        return None if self.start is None or self.stop is None else self.stop - self.start

    @property
    def whole(self) -> SiteBinding:
        """The same columns without the subspace."""
        return self if self.subspace is None else self.model_copy(update={"subspace": None})


@dataclass(frozen=True)
class Adapter:
    """A model family: which models it matches, its site table and how to read its dimensions."""

    name: str
    matches: Callable[[Any], bool]
    dims: Callable[[Any], Dims]
    table: dict[str, Hook] = field(default_factory=dict)  # kind ("head", "q", "embed", ...) -> hook
    # kinds in the table that this particular model lacks, with the reason (config-dependent)
    unavailable: Callable[[Any], dict[str, str]] = field(default=lambda model: {})

    def bind(self, site: Site, model: Any) -> SiteBinding:
        """Resolve a parsed site on ``model`` or raise a ResolveError naming the valid ones."""
        if site.kind == "path":
            modules = dict(model.named_modules())
            if site.path not in modules:
                near = difflib.get_close_matches(site.path or "", list(modules), n=5)
                raise ResolveError(
                    f"site {site.name!r}: no module {site.path!r} in the model"
                    + (f"; close: {', '.join(near)}" if near else "")
                )
            return SiteBinding(name=site.name, module=site.path or "", io=site.io)
        d = self.dims(model)
        if site.layer is not None and not 0 <= site.layer < d.n_layers:
            raise ResolveError(
                f"site {site.name!r}: layer {site.layer} out of range; "
                f"this {self.name} model has layers 0..{d.n_layers - 1}"
            )
        key = site.part or site.kind
        if key in (why := self.unavailable(model)):
            raise ResolveError(f"site {site.name!r}: {why[key]}")
        hook = self.table.get(key)
        if hook is None:
            raise ResolveError(
                f"site {site.name!r}: the {self.name} adapter has no {key!r} sites; it has: "
                + ", ".join(sorted(set(self.table) - set(why)))
            )
        module = hook.module.format(layer=site.layer)
        if site.kind not in ("head", "kv_head"):
            return SiteBinding(name=site.name, module=module, io=hook.io, in_place=hook.shared)
        kv = site.part in ("k", "v")
        if kv and site.kind == "head" and d.gqa:
            raise ResolveError(gqa_message(site, d, self.name))
        count, what = (d.n_kv_heads, "key/value heads") if kv else (d.n_heads, "heads")
        if not 0 <= (site.head or 0) < count:
            raise ResolveError(
                f"site {site.name!r}: head {site.head} out of range; "
                f"this {self.name} model has {what} 0..{count - 1} per layer"
            )
        start = head_start(hook, d, site.head or 0)
        return SiteBinding(
            name=site.name, module=module, io=hook.io, start=start, stop=start + d.d_head
        )

    def vocabulary(self, model: Any) -> list[str]:
        """Every canonical site name this model supports (for listings and suggestions)."""
        d = self.dims(model)
        has = set(self.table) - set(self.unavailable(model))
        names = [k for k in GLOBAL_KINDS if k in has]
        for layer in range(d.n_layers):
            names += [f"L{layer}.{k}" for k in LAYER_KINDS if k in has]
            if "head" in has:
                names += [f"L{layer}.H{h}" for h in range(d.n_heads)]
            for part in ("q", "k", "v"):
                if part not in has:
                    continue
                if part != "q" and d.gqa:  # keys and values belong to kv heads
                    names += [f"L{layer}.KV{g}:{part}" for g in range(d.n_kv_heads)]
                else:
                    names += [f"L{layer}.H{h}:{part}" for h in range(d.n_heads)]
        return names


def head_start(hook: Hook, d: Dims, index: int) -> int:
    """The first column of head ``index`` (a query head for z/q, a kv head for k/v)."""
    if hook.per_head:
        if d.gqa:
            raise ResolveError(
                f"module {hook.module!r}: a head-by-head fused qkv layout with grouped-query "
                "attention is not supported; describe it as separate q/k/v blocks"
            )
        return (index * hook.per_head + hook.block) * d.d_head
    widths = (d.n_heads, d.n_kv_heads, d.n_kv_heads)
    return (sum(widths[: hook.block]) + index) * d.d_head


def gqa_message(site: Site, d: Dims, adapter: str) -> str:
    """Why ``L{l}.H{h}:k`` does not exist on a grouped-query model, and which site serves h."""
    part = {"k": "key", "v": "value"}[site.part or "k"]
    g = (site.head or 0) // d.group
    first, last = g * d.group, (g + 1) * d.group - 1
    return (
        f"site {site.name!r}: this {adapter} model uses grouped-query attention: {d.n_heads} query "
        f"heads share {d.n_kv_heads} key/value heads ({d.group} query heads per kv head), so keys "
        f"and values are sites of kv heads, L<layer>.KV<g>:k / :v; head {site.head}'s {part} is "
        f"L{site.layer}.KV{g}:{site.part}, shared by query heads {first}..{last}"
    )


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    if adapter.name in _REGISTRY:
        raise ValueError(f"adapter {adapter.name!r} is registered twice")
    _REGISTRY[adapter.name] = adapter
    return adapter


def _load_builtin() -> None:
    from mi_spec.sites.adapters import (  # noqa: F401  (registration side effect)
        gpt2,
        llama,
        mlp,
        neox,
        toy,
    )


_BUILTIN_LOADED: list[bool] = []  # not `if not _REGISTRY`: one adapter imported directly registers


def adapters() -> dict[str, Adapter]:
    if not _BUILTIN_LOADED:
        _load_builtin()
        _BUILTIN_LOADED.append(True)
    return dict(_REGISTRY)


def adapter_for(model: Any, name: str | None = None) -> Adapter:
    """The adapter called ``name``, or the first one whose ``matches`` accepts the model."""
    table = adapters()
    if name is not None:
        if name not in table:
            near = difflib.get_close_matches(name, list(table), n=3)
            raise ResolveError(
                f"unknown adapter {name!r}; known: {', '.join(sorted(table))}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
            )
        return table[name]
    for adapter in table.values():
        if adapter.matches(model):
            return adapter
    raise ResolveError(
        f"no adapter matches model class {type(model).__name__}; known adapters: "
        f"{', '.join(sorted(table))}. Set model.adapter, or use raw 'path:' sites."
    )


def bind_site(adapter: Adapter, model: Any, text: str) -> SiteBinding:
    """Parse and bind, turning vocabulary errors into ResolveErrors with nearby valid names."""
    try:
        site = parse_site(text)
    except ValueError as e:
        raise ResolveError(str(e)) from None
    try:
        return adapter.bind(site, model)
    except ResolveError as e:
        near = difflib.get_close_matches(site.name, adapter.vocabulary(model), n=4, cutoff=0.5)
        hint = f"; nearby valid sites: {', '.join(near)}" if near else ""
        raise ResolveError(f"{e}{hint}") from None


def class_name_in(names: Iterable[str]) -> Callable[[Any], bool]:
    wanted = set(names)
    return lambda model: type(model).__name__ in wanted
