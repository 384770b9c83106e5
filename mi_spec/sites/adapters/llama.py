"""Hugging Face Llama-family models: ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM`` (the same module paths).

Separate ``q_proj``/``k_proj``/``v_proj``; ``o_proj``'s input is the heads' outputs concatenated.
Rotary position embeddings are applied after the projections: ``:q`` and kv ``:k`` sites are
pre-rotary. With grouped-query attention (``num_key_value_heads < num_attention_heads``) ``k_proj``
and ``v_proj`` hold one head per key/value group, so keys and values are named ``L{l}.KV{g}:k`` /
``:v``; kv head ``g`` serves query heads ``g * group .. (g + 1) * group - 1``.
"""

from __future__ import annotations

from typing import Any

from mi_spec.sites.adapter import Adapter, Dims, Hook, class_name_in, register

_LAYER = "model.layers.{layer}"
_ATTN = f"{_LAYER}.self_attn"


def _dims(model: Any) -> Dims:
    c = model.config
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return Dims(
        c.num_hidden_layers, c.num_attention_heads, d_head, c.hidden_size, c.vocab_size, n_kv
    )


LLAMA = register(
    Adapter(
        name="llama",
        matches=class_name_in(["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]),
        dims=_dims,
        table={
            "embed": Hook("model.embed_tokens"),
            "resid_pre": Hook(_LAYER, "input"),
            "resid_mid": Hook(f"{_LAYER}.post_attention_layernorm", "input", shared=True),
            "resid_post": Hook(_LAYER),
            "attn_out": Hook(f"{_ATTN}.o_proj"),
            "mlp_in": Hook(f"{_LAYER}.mlp", "input"),
            "mlp_out": Hook(f"{_LAYER}.mlp"),
            "head": Hook(f"{_ATTN}.o_proj", "input"),
            "q": Hook(f"{_ATTN}.q_proj"),
            "k": Hook(f"{_ATTN}.k_proj"),
            "v": Hook(f"{_ATTN}.v_proj"),
            "logits": Hook("lm_head"),
        },
    )
)
