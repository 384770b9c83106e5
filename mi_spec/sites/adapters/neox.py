"""Hugging Face GPT-NeoX / Pythia (``GPTNeoXForCausalLM``).

``attention.query_key_value`` is one fused projection laid out head by head: its output is viewed
as ``[..., n_heads, 3 * d_head]`` and chunked into q, k, v, so head ``h``'s query, key and value are
the columns ``[3h, 3h+1, 3h+2] * d_head`` (not three blocks of heads as in GPT-2). Rotary position
embeddings are applied after that projection: ``:q``/``:k`` sites are pre-rotary.

With ``use_parallel_residual=True`` (Pythia's default) attention and MLP both read
``resid_pre`` and ``resid_post = resid_pre + attn_out + mlp_out``: there is no ``resid_mid``.
With a sequential residual, ``resid_mid`` is the input of ``post_attention_layernorm``.
"""

from __future__ import annotations

from typing import Any

from mi_spec.sites.adapter import Adapter, Dims, Hook, class_name_in, register

_LAYER = "gpt_neox.layers.{layer}"
_QKV = f"{_LAYER}.attention.query_key_value"


def _dims(model: Any) -> Dims:
    c = model.config
    d_head = c.hidden_size // c.num_attention_heads
    return Dims(c.num_hidden_layers, c.num_attention_heads, d_head, c.hidden_size, c.vocab_size)


def _unavailable(model: Any) -> dict[str, str]:
    if not getattr(model.config, "use_parallel_residual", True):
        return {}
    return {
        "resid_mid": "this GPT-NeoX model uses a parallel residual "
        "(config.use_parallel_residual=True): attention and MLP both read resid_pre, so no "
        "residual point lies between them; use L<l>.resid_pre, L<l>.attn_out and L<l>.mlp_out "
        "(resid_post = resid_pre + attn_out + mlp_out), or L<l>.mlp_in for the MLP's input"
    }


NEOX = register(
    Adapter(
        name="gpt_neox",
        matches=class_name_in(["GPTNeoXForCausalLM"]),
        dims=_dims,
        table={
            "embed": Hook("gpt_neox.embed_in"),
            "resid_pre": Hook(_LAYER, "input"),
            "resid_mid": Hook(f"{_LAYER}.post_attention_layernorm", "input", shared=True),
            "resid_post": Hook(_LAYER),
            "attn_out": Hook(f"{_LAYER}.attention.dense"),
            "mlp_in": Hook(f"{_LAYER}.mlp", "input"),
            "mlp_out": Hook(f"{_LAYER}.mlp"),
            "head": Hook(f"{_LAYER}.attention.dense", "input"),
            "q": Hook(_QKV, block=0, per_head=3),
            "k": Hook(_QKV, block=1, per_head=3),
            "v": Hook(_QKV, block=2, per_head=3),
            "logits": Hook("lm_head"),
        },
        unavailable=_unavailable,
    )
)
