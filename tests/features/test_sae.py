"""SAEs in the SAELens layout: save/load round trip, both config layouts, every refusal, hook
point -> site, and (where ``sae_lens`` is installed) SAELens's own loader on our files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mi_spec.features.sae import Sae, load_sae, sae_site, save_sae

REQUIRED_KEYS = {
    "d_in", "d_sae", "hook_name", "hook_layer", "architecture", "apply_b_dec_to_input",
    "normalize_activations", "dtype", "device",
}  # fmt: skip
WEIGHTS = "sae_weights.safetensors"


def make_sae(jump: bool = False, d: int = 8, d_sae: int = 24, seed: int = 0, **kw) -> Sae:
    g = torch.Generator().manual_seed(seed)
    return Sae(
        W_enc=torch.randn(d, d_sae, generator=g),
        b_enc=torch.randn(d_sae, generator=g),
        W_dec=torch.randn(d_sae, d, generator=g),
        b_dec=torch.randn(d, generator=g),
        threshold=torch.rand(d_sae, generator=g) if jump else None,
        hook_name=kw.pop("hook_name", "blocks.1.hook_resid_pre"),
        architecture="jumprelu" if jump else "standard",
        **kw,
    )


def _equal(a: Sae, b: Sae) -> None:
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.threshold is None) == (b.threshold is None)
    if a.threshold is not None:
        assert torch.equal(a.threshold, b.threshold)
    assert (a.hook_name, a.architecture, a.apply_b_dec_to_input) == (
        b.hook_name, b.architecture, b.apply_b_dec_to_input,
    )  # fmt: skip


@pytest.mark.parametrize("jump", [False, True])
def test_save_load_round_trip_keeps_tensors_and_cfg(tmp_path, jump):
    cfg = {"model_name": "mi_spec.zoo:induction_2l", "context_size": 41, "custom": [1, 2]}
    sae = make_sae(jump, apply_b_dec_to_input=False, cfg=cfg)
    save_sae(tmp_path / "sae", sae)
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == [
        "cfg.json", "sae_weights.safetensors",
    ]  # fmt: skip
    back = load_sae(tmp_path / "sae")
    _equal(back, sae)
    written = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert set(written) >= REQUIRED_KEYS
    assert written["hook_layer"] == 1 and written["d_in"] == 8 and written["d_sae"] == 24
    assert {k: back.cfg[k] for k in cfg} == cfg  # the config's own keys are kept
    stored = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    assert set(stored) == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if jump else set())
    x = torch.randn(5, 8)
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)


def test_saelens_6_nested_metadata_is_read_and_flattened(tmp_path):
    sae = make_sae()
    save_sae(tmp_path / "a", sae)
    cfg = {"d_in": 8, "d_sae": 24, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "architecture": "standard",
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.0.hook_mlp_out"}}  # fmt: skip
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    got = load_sae(tmp_path / "a")
    assert got.hook_name == "blocks.0.hook_mlp_out" and sae_site(got.hook_name) == "L0.mlp_out"
    save_sae(tmp_path / "b", got)
    flat = json.loads((tmp_path / "b" / "cfg.json").read_text())
    assert flat["hook_name"] == "blocks.0.hook_mlp_out" and "metadata" not in flat
    assert "sae_lens_version" not in flat


def test_a_scaling_factor_is_folded_into_the_decoder(tmp_path):
    sae = make_sae()
    save_sae(tmp_path / "s", sae)
    tensors = load_file(tmp_path / "s" / "sae_weights.safetensors")
    scale = torch.linspace(0.5, 2.0, 24)
    save_file(tensors | {"finetuning_scaling_factor": scale}, tmp_path / "s" / WEIGHTS)
    got = load_sae(tmp_path / "s")
    f = torch.rand(3, 24)
    torch.testing.assert_close(got.decode(f), (f * scale) @ sae.W_dec + sae.b_dec)


def _write(folder, cfg_update=None, tensors_update=None, drop=(), jump=False):
    save_sae(folder, make_sae(jump))
    cfg = json.loads((folder / "cfg.json").read_text()) | (cfg_update or {})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    tensors = load_file(folder / WEIGHTS) | (tensors_update or {})
    save_file({k: v.contiguous() for k, v in tensors.items() if k not in drop}, folder / WEIGHTS)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"cfg_update": {"architecture": "topk"}}, r"'topk' is not supported \(a TopK SAE keeps"),
        ({"cfg_update": {"activation_fn_str": "topk"}}, r"'topk' is not supported"),
        ({"cfg_update": {"architecture": "gated"}}, r"'gated' is not supported.*gate path"),
        ({"cfg_update": {"architecture": "gated"}}, r"supported: standard, jumprelu"),
        ({"cfg_update": {"normalize_activations": "expected_average_only_in"}},
         r"normalize_activations is 'expected_average_only_in'; only 'none'.*fold"),
        ({"cfg_update": {"normalize_activations": "layer_norm"}}, r"'layer_norm'"),
        ({"cfg_update": {"d_in": 9}}, r"cfg.json says d_in=9, the weights have 8"),
        ({"cfg_update": {"hook_name": None}}, r"names no hook_name"),
        ({"tensors_update": {"W_dec": torch.zeros(24, 7)}},
         r"W_dec has shape \(24, 7\), expected \(24, 8\)"),
        ({"tensors_update": {"b_enc": torch.zeros(23)}}, r"b_enc has shape \(23,\)"),
        ({"drop": ("b_dec",)}, r"lacks b_dec"),
        ({"drop": ("threshold",), "jump": True}, r"lacks threshold"),
        ({"tensors_update": {"threshold": torch.zeros(24)}}, r"does not have: threshold"),
        ({"tensors_update": {"b_enc": torch.full((24,), float("nan"))}}, r"b_enc holds non-finite"),
    ],
)  # fmt: skip
def test_load_refusals_name_folder_and_reason(tmp_path, setup, message):
    folder = tmp_path / "bad_sae"
    _write(folder, **setup)
    with pytest.raises(ValueError, match=message) as info:
        load_sae(folder)
    assert "bad_sae" in str(info.value)


def test_missing_folder_files_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="SAE folder not found"):
        load_sae(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"missing cfg.json, sae_weights.safetensors"):
        load_sae(tmp_path / "empty")
    _write(tmp_path / "j")
    (tmp_path / "j" / "cfg.json").write_text("{oops")
    with pytest.raises(ValueError, match="cfg.json is not valid JSON"):
        load_sae(tmp_path / "j")


def test_a_jumprelu_log_threshold_is_read_as_its_exponential(tmp_path):
    _write(tmp_path / "l", jump=True)
    tensors = load_file(tmp_path / "l" / WEIGHTS)
    threshold = tensors.pop("threshold")
    save_file(tensors | {"log_threshold": threshold.log()}, tmp_path / "l" / WEIGHTS)
    torch.testing.assert_close(load_sae(tmp_path / "l").threshold, threshold)


@pytest.mark.parametrize(
    ("hook", "site"),
    [
        ("blocks.1.hook_resid_pre", "L1.resid_pre"),
        ("blocks.0.hook_mlp_out", "L0.mlp_out"),
        ("blocks.0.hook_attn_out", "L0.attn_out"),
        ("blocks.3.hook_resid_mid", "L3.resid_mid"),
        ("blocks.11.hook_resid_post", "L11.resid_post"),
        ("hook_embed", "embed"),
    ],
)
def test_sae_site_maps_transformerlens_hook_points(hook, site):
    assert sae_site(hook) == site


@pytest.mark.parametrize(
    ("hook", "why"),
    [
        ("blocks.0.attn.hook_z", "per-head"),
        ("blocks.0.hook_mlp_in", "before its layer norm"),
        ("hook_pos_embed", "supported: hook_embed"),
        ("logits", "supported: hook_embed"),
        ("L1.resid_pre", "blocks.<l>.hook_resid_pre"),
    ],
)
def test_sae_site_refuses_other_hook_points(hook, why):
    with pytest.raises(ValueError, match="has no mi_spec site") as info:
        sae_site(hook)
    assert why in str(info.value)


@pytest.mark.parametrize("jump", [False, True])
def test_saelens_reads_what_save_sae_writes(tmp_path, jump):
    """SAELens's own loader (where it is installed) gets the same tensors and the same encoder."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_sae(jump, cfg={"model_name": "toy", "context_size": 41})
    save_sae(tmp_path / "sae", sae)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec") + ("threshold",) * jump:
        assert torch.equal(getattr(theirs, name).detach(), getattr(sae, name)), name
    assert theirs.cfg.architecture() == sae.architecture
    meta = getattr(theirs.cfg, "metadata", None) or getattr(theirs.cfg, "meta", None)
    hook = getattr(meta, "hook_name", None) or getattr(theirs.cfg, "hook_name", None)
    assert hook == sae.hook_name
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x))
        torch.testing.assert_close(theirs.decode(sae.encode(x)), sae.decode(sae.encode(x)))


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_load_sae_reads_what_saelens_writes(tmp_path, arch):
    """A folder SAELens itself saved (its nested config layout) loads with the same encoder."""
    sae_lens = pytest.importorskip("sae_lens")
    cfg = {"d_in": 8, "d_sae": 24, "architecture": arch,
           "metadata": {"hook_name": "blocks.2.hook_resid_post"}}  # fmt: skip
    theirs = sae_lens.SAE.from_dict(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    theirs.save_model(str(tmp_path / "theirs"))
    ours = load_sae(tmp_path / "theirs")
    assert ours.architecture == arch and sae_site(ours.hook_name) == "L2.resid_post"
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x))
        torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x)))
