"""A 2-layer attention-only transformer WITHOUT a causal mask, weights set by hand: its mechanism
is known exactly. Plus a slow recursive scrub reference for bidirectional attention.

Model (``read_ahead``): the bundled ``AttnOnlyTransformer`` with its mask opened up (every position
attends to every position). Residual stream, one-hot blocks (``d_model = 4V + T``)::

    TOK   [0, V)          token at this position          (embed)
    POS   [V, V+T)        this position                   (pos_embed)
    AHEAD [V+T, 2V+T)     token two positions AHEAD       (written by L0.H0, reading the future)
    OUT   [2V+T, 3V+T)    predicted next token            (written by L1.H0)
    JUNK  [3V+T, 4V+T)    read by nothing                 (written by L0.H1, L1.H1)

- ``L0.H0``: query POS(p), key POS(p + 2): p attends to p + 2 (a later position); TOK -> AHEAD.
- ``L0.H1``: attends to itself; TOK -> JUNK.  ``L1.H1``: uniform; TOK -> JUNK.
- ``L1.H0``: query POS(p), key POS(p - 1): p attends to p - 1; AHEAD -> OUT. So OUT(p) =
  AHEAD(p - 1) = token p + 1: the next token, read from the future through two heads.

Unembed ``alpha`` * OUT: at positions 1..T-2 the next-token loss is ~(V-1)·exp(-alpha).
"""

from __future__ import annotations

import torch
from reference.scrub import Reference

from mi_spec.zoo.transformer import AttnOnlyConfig, AttnOnlyTransformer


def read_ahead(
    d_vocab: int = 6, n_ctx: int = 7, beta: float = 30.0, alpha: float = 14.0, causal: bool = False
) -> AttnOnlyTransformer:
    """The hand-set model above (eval mode); ``causal=True`` keeps the causal mask (a control)."""
    v, t = d_vocab, n_ctx
    tok, pos, ahead, out, junk = 0, v, v + t, 2 * v + t, 3 * v + t
    d_head = max(v, t)
    cfg = AttnOnlyConfig(
        n_layers=2, n_heads=2, d_model=4 * v + t, d_head=d_head, n_ctx=t, d_vocab=v
    )
    model = AttnOnlyTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.weight[:, tok : tok + v] = torch.eye(v)
        model.pos_embed.weight[:, pos : pos + t] = torch.eye(t)

        def head(layer: int, h: int, shift: int | None, v_from: int, v_to: int) -> None:
            attn = model.blocks[layer].attn
            cols = slice(h * d_head, (h + 1) * d_head)
            q, k = torch.zeros(d_head, cfg.d_model), torch.zeros(d_head, cfg.d_model)
            if shift is not None:  # query POS(p) matches key POS(p + shift)
                for p in range(t):
                    if 0 <= p + shift < t:
                        q[p, pos + p] = beta
                        k[p, pos + p + shift] = 1.0
            attn.q_proj.weight[cols] = q * d_head**0.5
            attn.k_proj.weight[cols] = k
            attn.v_proj.weight[cols, :] = 0
            attn.v_proj.weight[cols][:v, v_from : v_from + v] = torch.eye(v)
            attn.o_proj.weight[v_to : v_to + v, cols][:, :v] = torch.eye(v)

        head(0, 0, 2, tok, ahead)
        head(0, 1, 0, tok, junk)
        head(1, 0, -1, ahead, out)
        head(1, 1, None, tok, junk)
        model.unembed.weight[:, out : out + v] = alpha * torch.eye(v)
        if not causal:
            for block in model.blocks:
                block.attn.causal_mask.fill_(True)
    return model.eval()


class BidirectionalReference(Reference):
    """``reference.scrub.Reference`` for bidirectional attention: a head reads its inputs at
    every position of the row (there: up to the last needed one); all else is the same."""

    def visible(self, need: list[int], length: int) -> range:
        return range(length)


class _Shifted(torch.nn.Module):
    """A linear map applied to the previous position's input: positions mix outside attention."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.roll(x, 1, dims=1))


def query_shift() -> AttnOnlyTransformer:
    """``read_ahead`` whose L1 query projection reads the previous position (token shift)."""
    model = read_ahead()
    model.blocks[1].attn.q_proj = _Shifted(model.blocks[1].attn.q_proj)
    return model
