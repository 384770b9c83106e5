"""The bundled attention-only transformer (``mi_spec.zoo``): separate q/k/v projections, no MLPs.

With no MLP, ``resid_mid`` is the block output, so it is not offered (one name per place).
"""

from __future__ import annotations

from typing import Any

from mi_spec.sites.adapter import Adapter, Dims, Hook, class_name_in, register


def _dims(model: Any) -> Dims:
    c = model.config
    return Dims(c.n_layers, c.n_heads, c.d_head, c.d_model, c.d_vocab)


TOY = register(
    Adapter(
        name="attn_only",
        matches=class_name_in(["AttnOnlyTransformer"]),
        dims=_dims,
        table={
            "embed": Hook("embed"),
            "resid_pre": Hook("blocks.{layer}", "input"),
            "resid_post": Hook("blocks.{layer}"),
            "attn_out": Hook("blocks.{layer}.attn"),
            "head": Hook("blocks.{layer}.attn.o_proj", "input"),
            "q": Hook("blocks.{layer}.attn.q_proj"),
            "k": Hook("blocks.{layer}.attn.k_proj"),
            "v": Hook("blocks.{layer}.attn.v_proj"),
            "logits": Hook("unembed"),
        },
    )
)
