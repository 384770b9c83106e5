"""Small models for contract tests: one with a module that never runs, one that runs a module twice;
and the two tiny 2-layer models (GPT-2 and the bundled attention-only architecture, 32 wide, 4 heads,
vocabulary 40) that the engine tests run every kind on, as hypothesis-file model sections."""

from __future__ import annotations

import torch
from torch import nn

TINY_MODELS = {
    "gpt2": "hf_config: {model_type: gpt2, n_layer: 2, n_embd: 32, n_head: 4, vocab_size: 40, "
    "n_positions: 32}",
    "toy": "factory: mi_spec.zoo:attn_only\n  kwargs: {n_layers: 2, n_heads: 4, d_model: 32, "
    "d_head: 8, n_ctx: 32, d_vocab: 40}",
}


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
