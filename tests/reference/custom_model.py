"""A small custom (non-Hugging Face) transformer, described to mi_spec only by a declarative adapter
(``hypotheses/arch/adapters/tiny_lm.yaml``).

Pre-norm blocks with grouped-query attention through one fused projection ``attn.qkv`` whose columns
are ``[q: n_heads | k: n_kv_heads | v: n_kv_heads] * d_head``, an output projection ``attn.out``, and
a GELU MLP. Module names are deliberately unlike any Hugging Face family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TinyConfig:
    n_layers: int = 2
    d_model: int = 32
    n_heads: int = 4
    n_kv_heads: int = 2
    d_head: int = 8
    d_mlp: int = 64
    vocab: int = 48
    n_ctx: int = 64


class Attention(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.c = c
        self.qkv = nn.Linear(c.d_model, (c.n_heads + 2 * c.n_kv_heads) * c.d_head)
        self.out = nn.Linear(c.n_heads * c.d_head, c.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c, (b, t, _) = self.c, x.shape
        q, k, v = self.qkv(x).split(
            [c.n_heads * c.d_head, c.n_kv_heads * c.d_head, c.n_kv_heads * c.d_head], dim=-1
        )
        q = q.view(b, t, c.n_heads, c.d_head).transpose(1, 2)
        group = c.n_heads // c.n_kv_heads
        k = k.view(b, t, c.n_kv_heads, c.d_head).transpose(1, 2).repeat_interleave(group, dim=1)
        v = v.view(b, t, c.n_kv_heads, c.d_head).transpose(1, 2).repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / c.d_head**0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c.n_heads * c.d_head)
        return self.out(z)


class Mlp(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.up = nn.Linear(c.d_model, c.d_mlp)
        self.down = nn.Linear(c.d_mlp, c.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.attn, self.mlp = Attention(c), Mlp(c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.config = c
        self.tok = nn.Embedding(c.vocab, c.d_model)
        self.pos = nn.Embedding(c.n_ctx, c.d_model)
        self.stack = nn.ModuleList([Block(c) for _ in range(c.n_layers)])
        self.norm = nn.LayerNorm(c.d_model)
        self.readout = nn.Linear(c.d_model, c.vocab, bias=False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = input_ids.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        x = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        for block in self.stack:
            x = block(x, mask)
        return self.readout(self.norm(x))


def tiny_lm(gain: float = 3.0, **kwargs: int) -> TinyLM:
    """The factory a hypothesis names: ``factory: reference.custom_model:tiny_lm``.

    Linear weights are scaled by ``gain`` so that a random model's components matter visibly.
    """
    model = TinyLM(TinyConfig(**kwargs))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(gain)
    return model
