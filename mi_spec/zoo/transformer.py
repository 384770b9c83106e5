"""A small, readable attention-only transformer (no MLPs, no LayerNorm).

Module layout (a contract: site adapters map site names onto these paths)::

    embed                 nn.Embedding(d_vocab, d_model)   token embedding      [B, T, D]
    pos_embed             nn.Embedding(n_ctx, d_model)     called on positions  [T, D]
    blocks[i]             AttnBlock: resid_pre [B, T, D] -> resid_post [B, T, D]
    blocks[i].attn        Attention: resid_pre -> attn_out [B, T, D]
    blocks[i].attn.q_proj / k_proj / v_proj   D -> H*dh, head h = columns h*dh:(h+1)*dh
    blocks[i].attn.pattern                    identity on the attention probabilities [B, H, T, T]
    blocks[i].attn.o_proj                     input z [B, T, H*dh] (concatenated heads) -> D
    unembed               nn.Linear(d_model, d_vocab)      logits               [B, T, V]

Every submodule runs exactly once per forward, and ``blocks[i](resid) == resid + attn(resid)``.
Projections inside attention have no bias, so ``attn_out`` is exactly the sum of per-head terms.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class AttnOnlyConfig:
    """Shape hyper-parameters of an :class:`AttnOnlyTransformer`."""

    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    d_head: int = 16
    n_ctx: int = 64
    d_vocab: int = 100

    def to_dict(self) -> dict[str, int]:
        """Plain-dict form (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttnOnlyConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        return cls(**{f.name: int(data[f.name]) for f in fields(cls) if f.name in data})


class Attention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v/o projections."""

    def __init__(self, cfg: AttnOnlyConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.d_head = cfg.d_head
        width = cfg.n_heads * cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, width, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, width, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, width, bias=False)
        self.pattern = nn.Identity()
        self.o_proj = nn.Linear(width, cfg.d_model, bias=False)
        causal = torch.tril(torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool))
        self.register_buffer("causal_mask", causal, persistent=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H*dh] -> [B, H, T, dh]."""
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        """Return attn_out [B, T, D] for the residual stream ``resid`` [B, T, D]."""
        b, t, _ = resid.shape
        q = self._split(self.q_proj(resid))
        k = self._split(self.k_proj(resid))
        v = self._split(self.v_proj(resid))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)
        scores = scores.masked_fill(~self.causal_mask[:t, :t], float("-inf"))
        pattern = self.pattern(scores.softmax(dim=-1))
        z = (pattern @ v).transpose(1, 2).reshape(b, t, self.n_heads * self.d_head)
        return self.o_proj(z)


class AttnBlock(nn.Module):
    """One residual block: ``resid_post = resid_pre + attn(resid_pre)``."""

    def __init__(self, cfg: AttnOnlyConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg)

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        """Return the new residual stream [B, T, D]."""
        return resid + self.attn(resid)


class AttnOnlyTransformer(nn.Module):
    """Token + learned positional embedding, ``n_layers`` attention blocks, linear unembed."""

    def __init__(self, cfg: AttnOnlyConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(AttnBlock(cfg) for _ in range(cfg.n_layers))
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small-normal init (std 1/sqrt(d_model)) for weights, zero unembed bias."""
        std = 1.0 / math.sqrt(self.config.d_model)
        for module in self.modules():
            if isinstance(module, (nn.Embedding, nn.Linear)):
                nn.init.normal_(module.weight, std=std)
        nn.init.zeros_(self.unembed.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return logits [B, T, V] for ``input_ids`` [B, T].

        ``attention_mask`` is accepted for HF-style callers and ignored: attention is causal, so
        right-padding never changes the logits at real positions.
        """
        del attention_mask
        t = input_ids.shape[-1]
        if t > self.config.n_ctx:
            raise ValueError(f"sequence length {t} exceeds n_ctx={self.config.n_ctx}")
        positions = torch.arange(t, device=input_ids.device)
        resid = self.embed(input_ids) + self.pos_embed(positions)
        for block in self.blocks:
            resid = block(resid)
        return self.unembed(resid)
