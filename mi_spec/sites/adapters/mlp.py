"""The bundled hierarchical-equality MLP (``mi_spec.zoo.equality``): hidden layers, no heads.

With no residual stream, ``L{l}.resid_pre`` is what layer ``l`` reads (for ``L0``: the four entity
vectors concatenated) and ``L{l}.resid_post`` the hidden state it writes (after the ReLU).
``embed`` is the per-entity embedding ``[B, 4, d_embed]``.
"""

from __future__ import annotations

from typing import Any

from mi_spec.sites.adapter import Adapter, Dims, Hook, class_name_in, register


def _dims(model: Any) -> Dims:
    c = model.config
    return Dims(c.n_layers, 0, 0, c.d_hidden, 2)


MLP = register(
    Adapter(
        name="mlp",
        matches=class_name_in(["EqualityMLP"]),
        dims=_dims,
        table={
            "embed": Hook("embed"),
            "resid_pre": Hook("blocks.{layer}", "input"),
            "resid_post": Hook("blocks.{layer}"),
            "logits": Hook("unembed"),
        },
    )
)
