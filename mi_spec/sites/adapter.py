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
from mi_spec.sites.vocabulary import GLOBAL_KINDS, LAYER_KINDS, Site, parse_site


@dataclass(frozen=True)
class Hook:
    """Where a site kind lives: ``module`` may contain ``{layer}``.

    For head sites, ``block`` says which block of ``n_heads * d_head`` columns holds the heads
    (0 for q or z, 1 for k, 2 for v in a fused qkv projection).
    """

    module: str
    io: Literal["input", "output"] = "output"
    block: int = 0


@dataclass(frozen=True)
class Dims:
    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    d_vocab: int


class SiteBinding(BaseModel):
    """A site resolved to a concrete place in one model: plain data, shipped in Plans."""

    model_config = ConfigDict(frozen=True)

    name: str
    module: str
    io: Literal["input", "output"]
    start: int | None = None  # feature columns [start, stop) of the activation; None = all
    stop: int | None = None

    @property
    def width(self) -> int | None:
        return None if self.start is None or self.stop is None else self.stop - self.start


@dataclass(frozen=True)
class Adapter:
    """A model family: which models it matches, its site table and how to read its dimensions."""

    name: str
    matches: Callable[[Any], bool]
    dims: Callable[[Any], Dims]
    table: dict[str, Hook] = field(default_factory=dict)  # kind ("head", "q", "embed", ...) -> hook

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
        hook = self.table.get(key)
        if hook is None:
            raise ResolveError(
                f"site {site.name!r}: the {self.name} adapter has no {key!r} sites; it has: "
                + ", ".join(sorted(self.table))
            )
        module = hook.module.format(layer=site.layer)
        if site.kind != "head":
            return SiteBinding(name=site.name, module=module, io=hook.io)
        if not 0 <= (site.head or 0) < d.n_heads:
            raise ResolveError(
                f"site {site.name!r}: head {site.head} out of range; "
                f"this {self.name} model has heads 0..{d.n_heads - 1} per layer"
            )
        start = hook.block * d.n_heads * d.d_head + (site.head or 0) * d.d_head
        return SiteBinding(
            name=site.name, module=module, io=hook.io, start=start, stop=start + d.d_head
        )

    def vocabulary(self, model: Any) -> list[str]:
        """Every canonical site name this model supports (for listings and suggestions)."""
        d = self.dims(model)
        names = [k for k in GLOBAL_KINDS if k in self.table]
        for layer in range(d.n_layers):
            names += [f"L{layer}.{k}" for k in LAYER_KINDS if k in self.table]
            if "head" in self.table:
                names += [f"L{layer}.H{h}" for h in range(d.n_heads)]
            for part in ("q", "k", "v"):
                if part in self.table:
                    names += [f"L{layer}.H{h}:{part}" for h in range(d.n_heads)]
        return names


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    if adapter.name in _REGISTRY:
        raise ValueError(f"adapter {adapter.name!r} is registered twice")
    _REGISTRY[adapter.name] = adapter
    return adapter


def _load_builtin() -> None:
    from mi_spec.sites.adapters import gpt2, mlp, toy  # noqa: F401  (registration side effect)


def adapters() -> dict[str, Adapter]:
    if not _REGISTRY:
        _load_builtin()
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
