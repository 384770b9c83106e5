"""A tiny regression model for numeric metrics (mse / mae): token + position embeddings, residual
ReLU MLP blocks, and a one-number readout per position ([B, T, 1]). No attention: the output at a
position depends on that position's token only."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class Block(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.mlp = Mlp(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class RegressionMLP(nn.Module):
    def __init__(self, vocab: int = 40, d: int = 16, hidden: int = 32, n_layers: int = 2):
        super().__init__()
        self.n_layers, self.d = n_layers, d
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(64, d)
        self.blocks = nn.ModuleList(Block(d, hidden) for _ in range(n_layers))
        self.readout = nn.Linear(d, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        x = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.readout(x)


def regression_mlp(seed: int = 0) -> RegressionMLP:
    torch.manual_seed(seed)
    return RegressionMLP().eval()


ADAPTER = (
    "{dims: {n_layers: n_layers, n_heads: 0, d_head: 0, d_model: d, d_vocab: 1}, sites: "
    "{embed: embed, resid_pre: {module: 'blocks.{layer}', io: input}, resid_post: 'blocks.{layer}', "
    "mlp_in: {module: 'blocks.{layer}.mlp', io: input}, mlp_out: 'blocks.{layer}.mlp', "
    "logits: readout}}"
)
