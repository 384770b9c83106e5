"""Bundled toy models: a random-init attention-only transformer and a trained induction model.

Importing this package (or a data generator such as ``mi_spec.zoo.tasks:repeated_tokens``) does not
import torch: the model classes load on first use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mi_spec.zoo.transformer import Attention, AttnBlock, AttnOnlyConfig, AttnOnlyTransformer

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
INDUCTION_2L_CHECKPOINT = CHECKPOINT_DIR / "induction_2l.pt"
INDUCTION_2L_METADATA = CHECKPOINT_DIR / "induction_2l.json"

__all__ = [
    "CHECKPOINT_DIR",
    "INDUCTION_2L_CHECKPOINT",
    "INDUCTION_2L_METADATA",
    "Attention",
    "AttnBlock",
    "AttnOnlyConfig",
    "AttnOnlyTransformer",
    "attn_only",
    "induction_2l",
    "induction_2l_metadata",
]
_MODEL_CLASSES = ("Attention", "AttnBlock", "AttnOnlyConfig", "AttnOnlyTransformer")


def __getattr__(name: str) -> Any:
    """The model classes of `mi_spec.zoo.transformer`, imported (with torch) on first use."""
    if name in _MODEL_CLASSES:
        from mi_spec.zoo import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attn_only(
    n_layers: int = 2,
    n_heads: int = 4,
    d_model: int = 64,
    d_head: int = 16,
    n_ctx: int = 64,
    d_vocab: int = 100,
    seed: int = 0,
) -> AttnOnlyTransformer:
    """A randomly initialised attention-only transformer (eval mode); the global RNG is untouched."""
    import torch

    from mi_spec.zoo.transformer import AttnOnlyConfig, AttnOnlyTransformer

    cfg = AttnOnlyConfig(n_layers, n_heads, d_model, d_head, n_ctx, d_vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttnOnlyTransformer(cfg)
    return model.eval()


def induction_2l_metadata() -> dict:
    """The training metadata bundled with ``induction_2l`` (config, losses, identified heads)."""
    return json.loads(INDUCTION_2L_METADATA.read_text())


def induction_2l(pretrained: bool = True) -> AttnOnlyTransformer:
    """The bundled 2-layer attention-only induction model in eval mode.

    With ``pretrained=False`` the same architecture is returned with seed-0 random weights.
    """
    import torch

    from mi_spec.zoo.transformer import AttnOnlyConfig, AttnOnlyTransformer

    cfg = AttnOnlyConfig.from_dict(induction_2l_metadata()["config"])
    if not pretrained:
        return attn_only(**cfg.to_dict())
    model = AttnOnlyTransformer(cfg)
    state = torch.load(INDUCTION_2L_CHECKPOINT, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
