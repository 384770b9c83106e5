"""A 2-layer attention-only induction model with hand-set weights: its mechanism is known exactly.

Residual stream (``d_model = 4V + T`` for vocabulary V and context T), one-hot blocks::

    TOK  [0, V)          token at this position          (embed)
    POS  [V, V+T)        this position                   (pos_embed)
    PREV [V+T, 2V+T)     token at the previous position  (written by L0.H0)
    OUT  [2V+T, 3V+T)    predicted next token            (written by L1.H0)
    JUNK [3V+T, 4V+T)    read by nothing                 (written by L0.H1, L1.H1)

Heads (``d_head = max(V, T)``; a matching query/key pair scores ``beta``, any other pair 0):

- ``L0.H0`` previous-token head: query POS(p), key POS(j) shifted by one, so p attends to p-1;
  value TOK -> PREV.
- ``L0.H1`` distractor: attends to itself (query and key POS), value TOK -> JUNK.
- ``L1.H0`` induction head: query TOK(p), key PREV(j): p attends to the position after an earlier
  occurrence of its token; value TOK -> OUT (K-composition with L0.H0, copying by OV).
- ``L1.H1`` distractor: no query (uniform attention), value TOK -> JUNK.

Unembed: ``alpha`` * OUT, so on ``repeated_tokens`` rows (distinct tokens) the loss at every
predictable second-half position is ~(V-1)·exp(-alpha) and the model is the induction algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mi_spec.zoo.transformer import AttnOnlyConfig, AttnOnlyTransformer


def induction_handbuilt(
    d_vocab: int = 12, n_ctx: int = 16, beta: float = 20.0, alpha: float = 12.0
) -> AttnOnlyTransformer:
    """The hand-set induction model described above (eval mode)."""
    v, t = d_vocab, n_ctx
    tok, pos, prev, out, junk = 0, v, v + t, 2 * v + t, 3 * v + t
    d_head = max(v, t)
    cfg = AttnOnlyConfig(
        n_layers=2, n_heads=2, d_model=4 * v + t, d_head=d_head, n_ctx=t, d_vocab=v
    )
    model = AttnOnlyTransformer(cfg)
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    q_scale = beta * math.sqrt(d_head)  # scores are q.k / sqrt(d_head)
    h1 = d_head  # columns of head 1
    with torch.no_grad():
        model.embed.weight[:, tok : tok + v] = torch.eye(v)
        model.pos_embed.weight[:, pos : pos + t] = torch.eye(t)
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        for i in range(t):
            a0.q_proj.weight[i, pos + i] = q_scale  # L0.H0: query = this position
            if i + 1 < t:
                a0.k_proj.weight[i + 1, pos + i] = 1.0  # key = next position
            a0.q_proj.weight[h1 + i, pos + i] = q_scale  # L0.H1: attend to itself
            a0.k_proj.weight[h1 + i, pos + i] = 1.0
        for i in range(v):
            a0.v_proj.weight[i, tok + i] = 1.0
            a0.o_proj.weight[prev + i, i] = 1.0  # L0.H0: TOK -> PREV
            a0.v_proj.weight[h1 + i, tok + i] = 1.0
            a0.o_proj.weight[junk + i, h1 + i] = 1.0  # L0.H1: TOK -> JUNK
            a1.q_proj.weight[i, tok + i] = q_scale  # L1.H0: query = token
            a1.k_proj.weight[i, prev + i] = 1.0  # key = previous token (K-composition)
            a1.v_proj.weight[i, tok + i] = 1.0
            a1.o_proj.weight[out + i, i] = 1.0  # TOK -> OUT (copy)
            a1.v_proj.weight[h1 + i, tok + i] = 1.0  # L1.H1: uniform attention
            a1.o_proj.weight[junk + i, h1 + i] = 1.0
            model.unembed.weight[i, out + i] = alpha
    return model.eval()


def induction_target(row: Mapping[str, Any], values: Mapping[str, Sequence[Any]], pos: int) -> Any:
    """The induction algorithm as a high-level variable: the token after the latest earlier position
    whose previous token (``ind_k``) equals the current token (``ind_q``), read from ``ind_v``;
    -1 where there is none. Declare ``parents: [ind_q, ind_k, ind_v]``."""
    del row
    query, keys = values["ind_q"][pos], values["ind_k"]
    for j in range(pos, 0, -1):
        if keys[j] == query:
            return values["ind_v"][j]
    return -1
