"""The bundled 2-layer induction model, its module contract, and the repeated-token task."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mi_spec.zoo import AttnOnlyConfig, attn_only, induction_2l, induction_2l_metadata
from mi_spec.zoo.tasks import BOS, half_losses, repeated_tokens, rows_to_tensor

FRESH_SEED = 123  # training used a torch.Generator stream and eval seed 10_000


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return induction_2l()


@pytest.fixture(scope="module")
def meta() -> dict:
    return induction_2l_metadata()


@pytest.fixture(scope="module")
def data(model: torch.nn.Module) -> tuple[torch.Tensor, int]:
    rows = repeated_tokens(96, 41, seed=FRESH_SEED, d_vocab=model.config.d_vocab)
    return rows_to_tensor(rows)


def _losses(model: torch.nn.Module, tokens: torch.Tensor, half: int) -> tuple[float, float]:
    with torch.no_grad():
        return half_losses(model(tokens), tokens, half)


def _ablated_second_half(model: torch.nn.Module, layer: int, head: int, data) -> float:
    tokens, half = data
    d_head = model.config.d_head

    def zero_head(_module, args):
        z = args[0].clone()
        z[..., head * d_head : (head + 1) * d_head] = 0.0
        return (z,)

    handle = model.blocks[layer].attn.o_proj.register_forward_pre_hook(zero_head)
    try:
        return _losses(model, tokens, half)[1]
    finally:
        handle.remove()


def test_bundled_model_loads_with_contract_names(model, meta) -> None:
    assert not model.training
    assert model.config == AttnOnlyConfig.from_dict(meta["config"])
    names = dict(model.named_modules())
    expected = ["embed", "pos_embed", "blocks", "unembed"]
    for i in range(model.config.n_layers):
        expected += [f"blocks.{i}", f"blocks.{i}.attn"]
        expected += [f"blocks.{i}.attn.{p}_proj" for p in "qkvo"]
    assert set(expected) <= set(names)
    width = model.config.n_heads * model.config.d_head
    assert names["blocks.0.attn.q_proj"].out_features == width
    assert names["blocks.0.attn.o_proj"].in_features == width
    assert names["unembed"].out_features == model.config.d_vocab


def test_each_module_called_once_and_block_is_residual() -> None:
    small = attn_only(n_layers=2, n_heads=2, d_model=16, d_head=8, n_ctx=12, d_vocab=20, seed=1)
    calls: Counter[str] = Counter()
    seen: dict[str, tuple] = {}

    def record(name):
        def hook(_module, args, out):
            calls[name] += 1
            seen[name] = (args, out)

        return hook

    for name, module in small.named_modules():
        if name and not isinstance(module, torch.nn.ModuleList):
            module.register_forward_hook(record(name))
    ids = torch.randint(0, 20, (3, 10))
    logits = small(ids, attention_mask=torch.ones_like(ids))
    assert logits.shape == (3, 10, 20)
    assert set(calls.values()) == {1}
    args, out = seen["blocks.1"]
    assert len(args) == 1 and isinstance(out, torch.Tensor) and out.shape == (3, 10, 16)
    torch.testing.assert_close(out, args[0] + seen["blocks.1.attn"][1])
    torch.testing.assert_close(seen["unembed"][1], logits)


def test_config_round_trip() -> None:
    cfg = AttnOnlyConfig(2, 4, 64, 16, 64, 100)
    assert AttnOnlyConfig.from_dict(cfg.to_dict()) == cfg


def test_model_does_induction_on_fresh_data(model, data) -> None:
    first, second = _losses(model, *data)
    assert first > 3.5
    assert second < 0.3 * first


def test_identified_heads_are_causally_necessary(model, meta, data) -> None:
    _, second = _losses(model, *data)
    for role in ("induction", "prev_token"):
        head = meta["heads"][role]
        ablated = _ablated_second_half(model, head["layer"], head["head"], data)
        assert ablated > max(1.0, 5 * second), (role, second, ablated)


def test_repeated_tokens_is_deterministic_and_well_formed() -> None:
    rows = repeated_tokens(5, 41, seed=3)
    assert rows == repeated_tokens(5, 41, seed=3)
    assert rows != repeated_tokens(5, 41, seed=4)
    for row in rows:
        k = row["half"]
        toks = row["tokens"]
        assert k == 20 and row["seq_len"] == len(toks) == 41
        assert toks[0] == BOS and toks[1 : k + 1] == toks[k + 1 :]
        assert len(set(toks[1 : k + 1])) == k and all(0 < t < 100 for t in toks[1:])
