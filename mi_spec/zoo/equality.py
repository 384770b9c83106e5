"""Hierarchical equality ``(a == b) == (c == d)``: the classic DAS task (Geiger et al.).

Inputs are four entity ids ``[a, b, c, d]``; each entity is a fixed random vector (``embed``,
uniform in [-1, 1], frozen). An MLP reads the four vectors concatenated and predicts the label.
With many entities (1000) a trained MLP cannot memorise pairs and has to compute equality from
the vectors, which is what makes its two equality relations linearly separable (DAS IIA ~1).

Module layout (a contract: the ``mlp`` site adapter maps site names onto these paths)::

    embed          nn.Embedding(n_entities, d_embed)   per-entity vectors          [B, 4, d_embed]
    blocks[i]      Layer: relu(linear(x))              hidden layer i              [B, T, d_hidden]
    unembed        nn.Linear(d_hidden, 2)              logits (0 = False, 1 = True) [B, T, 2]

The engine and metrics work on sequences (logits ``[B, T, V]``, positions resolved per token
row), so the concatenated input is broadcast to every position: each position holds the same
state and the same prediction, and ``blocks[i]`` runs on ``[B, T, d_hidden]``. Interventions at
one position (``@last``) change only that position's prediction; score the metric there
(``metric: {kind: accuracy, at: last, target: label}``).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
EQUALITY_CHECKPOINT = CHECKPOINT_DIR / "equality_mlp.pt"
EQUALITY_METADATA = CHECKPOINT_DIR / "equality_mlp.json"
N_ARGS = 4


@dataclass(frozen=True)
class EqualityConfig:
    """Shapes of an :class:`EqualityMLP`; ``embed_seed`` fixes the entity vectors."""

    n_entities: int = 1000
    d_embed: int = 4
    d_hidden: int = 16
    n_layers: int = 3
    embed_seed: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EqualityConfig:
        return cls(**{f.name: int(data[f.name]) for f in fields(cls) if f.name in data})


def entity_vectors(cfg: EqualityConfig) -> torch.Tensor:
    """The entity vectors [n_entities, d_embed], uniform in [-1, 1], from ``embed_seed``."""
    gen = torch.Generator().manual_seed(cfg.embed_seed)
    return torch.rand(cfg.n_entities, cfg.d_embed, generator=gen) * 2 - 1


class Layer(nn.Module):
    """One hidden layer: ``relu(linear(x))``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


class EqualityMLP(nn.Module):
    """Entity embedding, ``n_layers`` ReLU layers, a 2-way unembedding; see the module doc."""

    def __init__(self, cfg: EqualityConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.n_entities, cfg.d_embed)
        self.embed.weight.data.copy_(entity_vectors(cfg))
        self.embed.weight.requires_grad_(False)
        widths = [N_ARGS * cfg.d_embed] + [cfg.d_hidden] * cfg.n_layers
        self.blocks = nn.ModuleList(Layer(i, o) for i, o in zip(widths, widths[1:], strict=False))
        self.unembed = nn.Linear(cfg.d_hidden, 2)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, T, 2] for entity ids [B, 4] (T = 4; the same at every position)."""
        del attention_mask  # every row has exactly four entities
        b, t = input_ids.shape
        if t != N_ARGS:
            raise ValueError(f"expected {N_ARGS} entity ids per row, got {t}")
        x = self.embed(input_ids).reshape(b, 1, -1).expand(b, t, -1)
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)


def hierarchical_equality(
    n: int, seed: int = 0, n_entities: int = 1000, balanced: bool = True
) -> list[dict]:
    """``n`` rows ``{tokens: [a, b, c, d], a, b, c, d, label}``, label = int((a==b) == (c==d)).

    With ``balanced`` (default) ``a == b`` and ``c == d`` each hold in half the rows,
    independently, so labels and both equality relations are balanced; otherwise entities are
    drawn uniformly. Deterministic for a given set of arguments.
    """
    rng = random.Random(seed)

    def pair() -> tuple[int, int]:
        x = rng.randrange(n_entities)
        if not balanced:
            return x, rng.randrange(n_entities)
        if rng.random() < 0.5:
            return x, x
        y = rng.randrange(n_entities - 1)
        return x, y + (y >= x)

    rows = []
    for _ in range(n):
        (a, b), (c, d) = pair(), pair()
        label = int((a == b) == (c == d))
        rows.append({"tokens": [a, b, c, d], "a": a, "b": b, "c": c, "d": d, "label": label})
    return rows


def equality_metadata() -> dict:
    """Training metadata bundled with ``equality_mlp`` (config, accuracy, training settings)."""
    return json.loads(EQUALITY_METADATA.read_text())


def equality_mlp(pretrained: bool = True, seed: int = 0) -> EqualityMLP:
    """The bundled trained MLP (eval mode), or the same architecture with seeded random weights."""
    cfg = EqualityConfig.from_dict(equality_metadata()["config"]) if pretrained else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EqualityMLP(cfg or EqualityConfig())
    if pretrained:
        state = torch.load(EQUALITY_CHECKPOINT, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()


def equality_handbuilt(
    n_entities: int = 1000, d_embed: int = 4, embed_seed: int = 0
) -> EqualityMLP:
    """A hand-set network that computes the task exactly, with known variables at layer 0.

    ``L0`` units 0-7 hold ``relu(±(a_i - b_i))`` (so ``a == b`` iff they are all 0) and units
    8-15 the same for ``c, d``; ``L1`` units 0/1 are ``relu(1 - |a-b|_1 / eps)`` and the same for
    ``c, d`` (1 if equal, 0 otherwise; ``eps`` = half the smallest L1 distance of two entities);
    ``L2`` units 0/1 are ``relu(e1 - e2)`` and ``relu(e2 - e1)``; the logits read their sum.
    So WX lives in L0 dims 0-7 and YZ in dims 8-15: swapping those is exact.
    """
    cfg = EqualityConfig(n_entities, d_embed, 4 * d_embed, 3, embed_seed)
    model = EqualityMLP(cfg)
    vec = entity_vectors(cfg)
    eps = torch.cdist(vec, vec, p=1).masked_fill(torch.eye(n_entities, dtype=torch.bool), 1e9)
    eps = float(eps.min()) / 2
    with torch.no_grad():
        for p in model.parameters():
            if p is not model.embed.weight:
                p.zero_()
        w0 = model.blocks[0].linear.weight  # [16, 4 * d_embed]: input = [a, b, c, d]
        for pair, (x, y) in enumerate(((0, 1), (2, 3))):
            for i in range(d_embed):
                row = pair * 2 * d_embed + i
                w0[row, x * d_embed + i], w0[row, y * d_embed + i] = 1.0, -1.0
                w0[row + d_embed, x * d_embed + i], w0[row + d_embed, y * d_embed + i] = -1.0, 1.0
        l1 = model.blocks[1].linear
        half = 2 * d_embed
        l1.weight[0, :half], l1.weight[1, half:] = -1 / eps, -1 / eps
        l1.bias[:2] = 1.0
        l2 = model.blocks[2].linear
        l2.weight[0, :2] = torch.tensor([1.0, -1.0])
        l2.weight[1, :2] = torch.tensor([-1.0, 1.0])
        model.unembed.weight[0, :2], model.unembed.bias[0] = 1.0, -0.5
        model.unembed.weight[1, :2], model.unembed.bias[1] = -1.0, 0.5
    return model.eval()
