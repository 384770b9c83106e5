"""The bundled models' structure without torch, for ``mi-spec validate --static``: an object with
the model's class name (so the adapter matches), its ``config`` (so the adapter reads its sizes)
and its module names (for ``path:`` sites). Importing torch alone takes longer than the whole
static check; these describe exactly what building the model would (a test compares them)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

_CHECKPOINTS = Path(__file__).parent / "checkpoints"


class Skeleton:
    """A model's class name, config and module names; nothing that runs."""

    def __init__(self, config: Any, modules: list[str]):
        self.config = config
        self._modules = modules

    def named_modules(self) -> Iterator[tuple[str, None]]:
        yield from ((name, None) for name in self._modules)


class AttnOnlyTransformer(Skeleton):
    """``mi_spec.zoo.transformer.AttnOnlyTransformer``'s structure."""


class EqualityMLP(Skeleton):
    """``mi_spec.zoo.equality.EqualityMLP``'s structure."""


def _attn_only(**kwargs: Any) -> AttnOnlyTransformer:
    """``mi_spec.zoo.attn_only(**kwargs)``'s structure (its own defaults fill the rest)."""
    from mi_spec.zoo import attn_only  # torch-free to import: torch is loaded inside it

    bound = inspect.signature(attn_only).bind(**kwargs)
    bound.apply_defaults()
    sizes = {k: v for k, v in bound.arguments.items() if k != "seed"}
    config = SimpleNamespace(**sizes)
    modules = ["", "embed", "pos_embed", "blocks"]
    for layer in range(config.n_layers):
        block = f"blocks.{layer}"
        modules += [block, f"{block}.attn"]
        modules += [
            f"{block}.attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "pattern", "o_proj")
        ]
    return AttnOnlyTransformer(config, modules + ["unembed"])


def _induction_2l(pretrained: bool = True) -> AttnOnlyTransformer:
    del pretrained  # the same architecture either way
    meta = json.loads((_CHECKPOINTS / "induction_2l.json").read_text())
    return _attn_only(**meta["config"])


def _handbuilt(d_vocab: int = 12, n_ctx: int = 16, **_: Any) -> AttnOnlyTransformer:
    d_model, d_head = 4 * d_vocab + n_ctx, max(d_vocab, n_ctx)
    return _attn_only(n_layers=2, n_heads=2, d_model=d_model, d_head=d_head, n_ctx=n_ctx,
                      d_vocab=d_vocab)  # fmt: skip


def _equality(n_entities: int, d_embed: int, d_hidden: int, n_layers: int) -> EqualityMLP:
    config = SimpleNamespace(n_entities=n_entities, d_embed=d_embed, d_hidden=d_hidden,
                             n_layers=n_layers)  # fmt: skip
    modules = ["", "embed", "blocks"]
    for layer in range(n_layers):
        modules += [f"blocks.{layer}", f"blocks.{layer}.linear"]
    return EqualityMLP(config, modules + ["unembed"])


def _equality_mlp(pretrained: bool = True, seed: int = 0) -> EqualityMLP:
    del seed
    meta = json.loads((_CHECKPOINTS / "equality_mlp.json").read_text())["config"]
    if not pretrained:
        return _equality(1000, 4, 16, 3)  # EqualityConfig's defaults
    return _equality(meta["n_entities"], meta["d_embed"], meta["d_hidden"], meta["n_layers"])


def _equality_handbuilt(
    n_entities: int = 1000, d_embed: int = 4, embed_seed: int = 0
) -> EqualityMLP:
    del embed_seed
    return _equality(n_entities, d_embed, 4 * d_embed, 3)


SKELETONS: dict[str, Callable[..., Skeleton]] = {
    "mi_spec.zoo:attn_only": _attn_only,
    "mi_spec.zoo:induction_2l": _induction_2l,
    "mi_spec.zoo.handbuilt:induction_handbuilt": _handbuilt,
    "mi_spec.zoo.equality:equality_mlp": _equality_mlp,
    "mi_spec.zoo.equality:equality_handbuilt": _equality_handbuilt,
}


def skeleton(factory: str, kwargs: dict[str, Any]) -> Skeleton | None:
    """The structure ``factory(**kwargs)`` would build, or None (unknown factory, bad kwargs:
    the caller builds the model instead, and reports what is wrong)."""
    fn = SKELETONS.get(factory)
    if fn is None:
        return None
    try:
        return fn(**kwargs)
    except TypeError:
        return None
