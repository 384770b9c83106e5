"""Hugging Face GPT-2 (``GPT2LMHeadModel``): fused qkv in ``c_attn``, heads split before ``c_proj``."""

from __future__ import annotations

from typing import Any

from mi_spec.sites.adapter import Adapter, Dims, Hook, class_name_in, register


def _dims(model: Any) -> Dims:
    c = model.config
    return Dims(c.n_layer, c.n_head, c.n_embd // c.n_head, c.n_embd, c.vocab_size)


GPT2 = register(
    Adapter(
        name="gpt2",
        matches=class_name_in(["GPT2LMHeadModel"]),
        dims=_dims,
        table={
            "embed": Hook("transformer.wte"),
            "resid_pre": Hook("transformer.h.{layer}", "input"),
            "resid_mid": Hook("transformer.h.{layer}.ln_2", "input", shared=True),
            "resid_post": Hook("transformer.h.{layer}"),
            "attn_out": Hook("transformer.h.{layer}.attn.c_proj"),
            "mlp_in": Hook("transformer.h.{layer}.mlp", "input"),
            "mlp_out": Hook("transformer.h.{layer}.mlp"),
            "head": Hook("transformer.h.{layer}.attn.c_proj", "input"),
            "q": Hook("transformer.h.{layer}.attn.c_attn", block=0),
            "k": Hook("transformer.h.{layer}.attn.c_attn", block=1),
            "v": Hook("transformer.h.{layer}.attn.c_attn", block=2),
            "logits": Hook("lm_head"),
        },
    )
)
