"""Slow, obviously-correct circuit discovery on the bundled attention-only transformer
(``mi_spec.zoo.AttnOnlyTransformer``): its forward written out by hand with every receiver (each
head's q, k, v input and the logits) reading its own copy of the residual stream, so an edge
sender -> receiver can be perturbed or ablated by editing one copy. No hooks, no mi_spec code.

- ``split_forward``: the model, each receiver's input passed through ``edit(receiver, x, writes)``
  (``writes``: each sender's write so far in this run: ``embed``, ``L{l}.H{h}``);
- ``edge_finite_difference``: central difference of the metric in ``eps`` when receiver r reads
  ``x + eps * (c_u(source) - c_u(base))``: the derivative EAP estimates;
- ``circuit_metric``: every edge outside ``circuit`` carries the source's write instead of this
  run's (``x_r - sum (c_u(run) - c_u(source))``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Edit = Callable[[str, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def split_forward(
    model, ids: torch.Tensor, edit: Edit | None = None, embed: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [B, T, V] and every sender's write [B, T, D]; ``embed`` overrides the token
    embedding (e.g. an interpolation)."""
    edit = edit or (lambda _r, x, _w: x)
    t = ids.shape[1]
    tok = model.embed.weight[ids] if embed is None else embed
    writes = {"embed": tok}
    resid = tok + model.pos_embed.weight[:t]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for layer, block in enumerate(model.blocks):
        a = block.attn
        dh = a.d_head
        new = torch.zeros_like(resid)
        for h in range(a.n_heads):
            cols = slice(h * dh, (h + 1) * dh)
            name = f"L{layer}.H{h}"
            q = edit(f"{name}:q", resid, writes) @ a.q_proj.weight[cols].T
            k = edit(f"{name}:k", resid, writes) @ a.k_proj.weight[cols].T
            v = edit(f"{name}:v", resid, writes) @ a.v_proj.weight[cols].T
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
            scores = scores.masked_fill(~causal, float("-inf"))
            z = scores.softmax(-1) @ v
            out = z @ a.o_proj.weight[:, cols].T
            writes[name] = out
            new = new + out
        resid = resid + new
    logits = edit("logits", resid, writes) @ model.unembed.weight.T + model.unembed.bias
    return logits, writes


def loss_rows(logits: torch.Tensor, ids: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """Next-token loss per row, averaged over ``positions``."""
    logp = torch.log_softmax(logits.double(), -1)
    cols = [-logp[:, p, :].gather(-1, ids[:, p + 1, None])[:, 0] for p in positions]
    return torch.stack(cols, -1).mean(-1)


def edge_finite_difference(
    model, base: torch.Tensor, source: torch.Tensor, edge: tuple[str, str],
    positions: Sequence[int], eps: float = 1e-4, alpha: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Per row: d/d(eps) of the loss when receiver ``edge[1]`` reads ``x + eps * delta c_u``,
    with the token embedding ``alpha`` of the way from base to source (EAP-IG's path)."""
    sender, receiver = edge
    _, w_base = split_forward(model, base)
    _, w_src = split_forward(model, source)
    delta = w_src[sender] - w_base[sender]
    emb = w_base["embed"] + alpha * (w_src["embed"] - w_base["embed"])

    def at(e: float) -> torch.Tensor:
        def edit(r, x, _w):
            return x + e * delta if r == receiver else x

        return loss_rows(split_forward(model, base, edit, embed=emb)[0], base, positions)

    return (at(eps) - at(-eps)) / (2 * eps)


def circuit_metric(
    model, base: torch.Tensor, source: torch.Tensor, circuit: set[tuple[str, str]],
    edges: Sequence[tuple[str, str]], positions: Sequence[int],
) -> torch.Tensor:  # fmt: skip
    """Per-row loss with every edge of ``edges`` not in ``circuit`` carrying the source's write."""
    _, w_src = split_forward(model, source)
    ablated: dict[str, list[str]] = {}
    for u, r in edges:
        if (u, r) not in circuit:
            ablated.setdefault(r, []).append(u)

    def edit(r, x, writes):
        for u in ablated.get(r, []):
            x = x - (writes[u] - w_src[u])
        return x

    return loss_rows(split_forward(model, base, edit)[0], base, positions)
