"""The torch-free structures ``validate --static`` uses describe exactly what the bundled factories
build: the class name the adapter matches, the sizes it reads, the module names ``path:`` sites
bind to, for every factory and with kwargs."""

from __future__ import annotations

import pytest

from mi_spec.compile.static import _meta_model
from mi_spec.sites.adapter import adapter_for
from mi_spec.spec.refs import import_ref
from mi_spec.zoo.skeletons import SKELETONS, skeleton

CASES = [
    ("mi_spec.zoo:attn_only", {}),
    ("mi_spec.zoo:attn_only", {"n_layers": 3, "n_heads": 2, "d_model": 32, "d_head": 8}),
    ("mi_spec.zoo:induction_2l", {}),
    ("mi_spec.zoo:induction_2l", {"pretrained": False}),
    ("mi_spec.zoo.handbuilt:induction_handbuilt", {}),
    ("mi_spec.zoo.handbuilt:induction_handbuilt", {"d_vocab": 6, "n_ctx": 9}),
    ("mi_spec.zoo.equality:equality_mlp", {}),
    ("mi_spec.zoo.equality:equality_mlp", {"pretrained": False}),
    ("mi_spec.zoo.equality:equality_handbuilt", {"d_embed": 3}),
]


@pytest.mark.parametrize(("factory", "kwargs"), CASES)
def test_skeleton_matches_the_built_model(factory, kwargs):
    real = import_ref(factory)(**kwargs)
    skel = skeleton(factory, kwargs)
    assert skel is not None
    assert type(skel).__name__ == type(real).__name__
    assert [n for n, _ in skel.named_modules()] == [n for n, _ in real.named_modules()]
    adapter = adapter_for(real)
    assert adapter_for(skel) is adapter
    assert adapter.dims(skel) == adapter.dims(real)
    assert adapter.vocabulary(skel) == adapter.vocabulary(real)


def test_every_bundled_factory_has_a_case_and_unknown_kwargs_fall_back():
    assert {f for f, _ in CASES} == set(SKELETONS)
    assert skeleton("mi_spec.zoo:attn_only", {"nope": 1}) is None  # the real build reports it
    assert skeleton("mi_spec.zoo:something_else", {}) is None


def test_static_validation_uses_the_skeleton(tmp_path):
    from mi_spec.compile.resolve import load_spec

    path = tmp_path / "h.yaml"
    path.write_text(
        "name: s\nmodel: {factory: 'mi_spec.zoo:induction_2l'}\n"
        "data: {generator: 'mi_spec.zoo.tasks:repeated_tokens'}\n"
    )
    spec, _ = load_spec(path)
    model, why = _meta_model(spec, tmp_path)
    assert why == "" and type(model).__module__ == "mi_spec.zoo.skeletons"
