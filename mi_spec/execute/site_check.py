"""Sites mean what their names say: checked when a model is resolved, before any study runs.

For each site: its module runs exactly once per forward; writing a site's own clean value back
leaves the logits unchanged; and the residual identities the architecture promises hold
(``resid_post = resid_pre + attn_out [+ mlp_out]``, ``resid_mid = resid_pre + attn_out``); and a
residual point written at every position with another input's value carries that input forward
(the logits become that input's logits), so a site whose tensor is also used elsewhere (a norm's
input that is the skip connection too) cannot be half-patched. A mis-mapped adapter fails here
with the site's name, not later as a strange result.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mi_spec.errors import ResolveError
from mi_spec.execute.engine import Engine, Read, Write
from mi_spec.sites.adapter import SiteBinding


def check_sites(
    engine: Engine,
    sites: Iterable[SiteBinding],
    ids: torch.Tensor,
    mask: torch.Tensor,
    bind=None,
    n_layers: int = 0,
    atol: float = 1e-4,
) -> None:
    """Raise ResolveError naming the first site that breaks a contract. ``bind`` maps names."""
    sites = list(sites)
    for site in sites:
        engine.check_binding(site)
    clean, got = engine.run(ids, mask, reads=[Read(s.name, s, None) for s in sites])
    for site in sites:
        patched, _ = engine.run(ids, mask, writes=[Write(site, slice(None), None, got[site.name])])
        diff = (patched - clean).abs().max().item()
        if diff > atol * max(1.0, clean.abs().max().item()):
            raise ResolveError(
                f"site {site.name!r} ({site.module}.{site.io}): writing its own clean value "
                f"changed the logits by {diff:.3g}; the adapter maps it to the wrong place"
            )
    if bind is not None:
        _check_residual(engine, ids, mask, bind, n_layers, atol)
    _check_residual_writes(engine, sites, ids, mask, clean, got, atol)


def _check_residual_writes(engine: Engine, sites, ids, mask, clean, got, atol: float) -> None:
    """Residual points patched everywhere with the next row's values give the next row's logits."""
    if ids.shape[0] < 2 or not bool((mask == mask[:1]).all()):
        return  # needs two rows with the same padding
    perm = torch.roll(torch.arange(ids.shape[0]), 1)
    target = clean[perm]
    for site in sites:
        if not site.name.rsplit(".", 1)[-1].startswith("resid_") or site.start is not None:
            continue
        value = got[site.name][perm]
        patched, _ = engine.run(ids, mask, writes=[Write(site, slice(None), None, value)])
        diff = (patched - target).abs().max().item()
        if diff > atol * max(1.0, target.abs().max().item()):
            raise ResolveError(
                f"site {site.name!r} ({site.module}.{site.io}): writing another input's value "
                f"at every position did not carry it forward (logits off by {diff:.3g}); the "
                "tensor is also used outside the module (e.g. a residual skip): map the site "
                "with shared: true (written in place), or to another place"
            )


def _check_residual(engine: Engine, ids, mask, bind, n_layers: int, atol: float) -> None:
    for layer in range(n_layers):
        names = {k: f"L{layer}.{k}" for k in ("resid_pre", "resid_mid", "resid_post")}
        names |= {k: f"L{layer}.{k}" for k in ("attn_out", "mlp_out")}
        bound = {}
        for k, name in names.items():
            try:
                bound[k] = bind(name)
            except ResolveError:
                continue
        _, got = engine.run(ids, mask, reads=[Read(k, b, None) for k, b in bound.items()])
        identities = [
            ("resid_mid", ["resid_pre", "attn_out"]),
            ("resid_post", ["resid_mid", "mlp_out"]),
        ]
        if "resid_mid" not in got:  # attention-only, or attention and MLP in parallel (NeoX)
            parallel = ["mlp_out"] if "mlp_out" in got else []
            identities = [("resid_post", ["resid_pre", "attn_out", *parallel])]
        for lhs, rhs in identities:
            if lhs in got and all(r in got for r in rhs):
                total = sum(got[r] for r in rhs)
                err = (got[lhs] - total).abs().max().item()
                if err > atol * max(1.0, got[lhs].abs().max().item()):
                    raise ResolveError(
                        f"L{layer}.{lhs} != {' + '.join(f'L{layer}.{r}' for r in rhs)} "
                        f"(max error {err:.3g}): a residual site is mis-mapped"
                    )
