"""Small models for contract tests: one with a module that never runs, one that runs a module twice."""

from __future__ import annotations

import torch
from torch import nn


class Quirky(nn.Module):
    def __init__(self, vocab: int = 40, d: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.shared = nn.Linear(d, d)  # called twice per forward
        self.unused = nn.Linear(d, d)  # never called
        self.out = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = h + self.shared(h)
        h = h + self.shared(h)
        return self.out(h)


def quirky() -> Quirky:
    torch.manual_seed(0)
    return Quirky().eval()
