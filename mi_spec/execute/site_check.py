"""Sites mean what their names say: checked when a model is resolved, before any study runs.

For each site: its module runs exactly once per forward; writing a site's own clean value back
leaves the logits unchanged; and the residual identities the architecture promises hold
(``resid_post = resid_pre + attn_out [+ mlp_out]``, ``resid_mid = resid_pre + attn_out``); and a
residual point written at every position with another input's value carries that input forward
(the logits become that input's logits), so a site whose tensor is also used elsewhere (a norm's
input that is the skip connection too) cannot be half-patched. A mis-mapped adapter fails here
with the site's name, not later as a strange result.

Cost: a few forward passes of short rows, not one per site (see :func:`site_check_cost`): a
GPT-2-small sweep over 144 heads and 12 residual sites makes 3. One *read* pass copies every site and every residual-identity site of
every layer. A *check* pass then holds, as blocks of rows: the unpatched rows (the reference, so
both sides of every comparison come from the same batch shape); per place of the forward (module
and io), the rows with all its sites (e.g. every head of a layer) written with their own clean
values; and one block per residual site written with the other row's values. Sites at different
places never share a block: a downstream write of a clean value would undo an upstream error.
Only when a block of several sites fails are they checked one per block, to name the culprit.
Blocks beyond ``MAX_ROWS`` rows go to further check passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mi_spec.errors import ResolveError
from mi_spec.sites.adapter import SiteBinding

if TYPE_CHECKING:  # `mi-spec plan` prices the checks without importing the engine (nnsight)
    from mi_spec.execute.engine import Engine

CHECK_ROWS = 2  # rows the checks run on (two, so a row can take the other row's values)
CHECK_TOKENS = 8  # the first tokens of each row
MAX_ROWS = 64  # rows per check pass

_IDENTITY_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


@dataclass(frozen=True)
class SiteCheckCost:
    """What :func:`check_sites` costs: forward passes and the rows x tokens of the largest."""

    passes: int
    sites: int
    rows: int  # rows of the largest pass
    tokens: int  # tokens per row (at most)

    def describe(self) -> str:
        """One line for ``mi-spec plan``."""
        return (
            f"site checks: {self.passes} forward passes ({self.sites} sites; largest pass "
            f"{self.rows} rows x <= {self.tokens} tokens)"
        )


def site_check_cost(sites: Iterable[SiteBinding], n_rows: int = CHECK_ROWS) -> SiteCheckCost:
    """The passes :func:`check_sites` makes for ``sites`` when every site passes (no model
    needed): one read pass, then check passes of ``MAX_ROWS`` rows at most, holding two rows per
    place of the forward the sites use and per residual site, plus the unpatched rows."""
    sites = list(sites)
    rows = min(n_rows, CHECK_ROWS)
    blocks = len(_self_blocks(sites)) + (len(_carried(sites)) if rows >= 2 else 0)
    per_pass = _blocks_per_pass(rows)
    check_passes = -(-blocks // per_pass) if sites else 0
    largest = rows * (1 + min(blocks, per_pass)) if sites else rows
    return SiteCheckCost(1 + check_passes, len(sites), largest, CHECK_TOKENS)


def check_sites(
    engine: Engine,
    sites: Iterable[SiteBinding],
    ids: torch.Tensor,
    mask: torch.Tensor,
    bind: Callable[[str], SiteBinding] | None = None,
    n_layers: int = 0,
    atol: float = 1e-4,
) -> None:
    """Raise ResolveError naming the first site that breaks a contract. ``bind`` maps canonical
    names (for the residual identities of ``n_layers`` layers). ``ids``/``mask``: candidate rows;
    the checks use the first ``CHECK_ROWS`` of them, cut to their first ``CHECK_TOKENS`` real
    tokens (the contracts do not depend on length)."""
    from mi_spec.execute.engine import Read

    sites = list(sites)
    for site in sites:
        engine.check_binding(site)
    ids = _short_rows(ids, mask)
    mask = torch.ones_like(ids)
    identity = _identity_bindings(bind, n_layers)
    reads = [Read(("site", s.name), s, None) for s in sites]
    reads += [Read(("id", key), b, None) for key, b in identity.items()]
    _, got = engine.run(ids, mask, reads=reads)
    _check_identities(got, n_layers, _tolerance(engine, atol))
    if not sites:
        return
    values = {s.name: got[("site", s.name)] for s in sites}
    carried = _carried(sites) if ids.shape[0] >= 2 else []
    blocks = [("self", group) for group in _self_blocks(sites)]
    blocks += [("carry", [s]) for s in carried]
    failed = _run_blocks(engine, ids, values, blocks, atol)
    if failed and failed[0] == "self" and len(failed[1]) > 1:  # name the site: one per block
        failed = _run_blocks(engine, ids, values, [("self", [s]) for s in failed[1]], atol)
    if failed:
        _raise(failed[0], failed[1][0], failed[2])


def _short_rows(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Up to CHECK_ROWS rows, each its first real tokens, all of one length (no padding)."""
    rows = [ids[r][mask[r].bool()] for r in range(min(CHECK_ROWS, ids.shape[0]))]
    length = max(1, min(CHECK_TOKENS, *(len(r) for r in rows)))
    return torch.stack([r[:length] for r in rows])


def _self_blocks(sites: Sequence[SiteBinding]) -> list[list[SiteBinding]]:
    """Groups of sites written together with their own values: one place of the forward (module
    and io) per group, no shared columns. A write downstream with its own clean value would undo
    any change made upstream, so sites at different places never share a block."""
    groups: dict[tuple[str, str], list[list[SiteBinding]]] = {}
    for site in sites:
        layers = groups.setdefault((site.module, site.io), [])
        for group in layers:
            if not any(_overlap(site, other) for other in group):
                group.append(site)
                break
        else:
            layers.append([site])
    return [group for layers in groups.values() for group in layers]


def _overlap(a: SiteBinding, b: SiteBinding) -> bool:
    if (a.module, a.io) != (b.module, b.io):
        return False
    a0, a1 = a.start or 0, a.stop if a.stop is not None else float("inf")
    b0, b1 = b.start or 0, b.stop if b.stop is not None else float("inf")
    return a0 < b1 and b0 < a1


def _carried(sites: Sequence[SiteBinding]) -> list[SiteBinding]:
    """Residual points written whole (no subspace): they must carry another input forward."""
    return [
        s
        for s in sites
        if s.name.rsplit(".", 1)[-1].startswith("resid_") and s.start is None and not s.subspace
    ]


def _tolerance(engine: Engine, atol: float) -> float:
    """``atol`` for fp32/fp64 models; a few rounding steps of a half-precision model's dtype."""
    dtype = next(engine.model.parameters()).dtype
    return max(atol, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else atol


def _blocks_per_pass(rows: int) -> int:
    """Blocks of ``rows`` rows a check pass holds besides the unpatched one."""
    return max(1, MAX_ROWS // rows - 1)


def _run_blocks(
    engine: Engine,
    ids: torch.Tensor,
    values: dict[str, torch.Tensor],
    blocks: list[tuple[str, list[SiteBinding]]],
    atol: float,
) -> tuple[str, list[SiteBinding], float] | None:
    """Check passes: [unpatched | block 1 | block 2 ...] rows; the first failing block, or None."""
    from mi_spec.execute.engine import Write

    n = ids.shape[0]
    tol = _tolerance(engine, atol)
    perm = torch.roll(torch.arange(n), 1)
    per_pass = _blocks_per_pass(n)
    for first in range(0, len(blocks), per_pass):
        chunk = blocks[first : first + per_pass]
        batch = ids.repeat(len(chunk) + 1, 1)
        writes = []
        for i, (what, block_sites) in enumerate(chunk, start=1):
            rows = slice(i * n, (i + 1) * n)
            for s in block_sites:
                value = values[s.name] if what == "self" else values[s.name][perm]
                writes.append(Write(s, rows, None, value))
        logits, _ = engine.run(batch, torch.ones_like(batch), writes=writes)
        clean = logits[:n].float()
        scale = max(1.0, clean.abs().max().item())
        for i, (what, block_sites) in enumerate(chunk, start=1):
            target = clean if what == "self" else clean[perm]
            diff = (logits[i * n : (i + 1) * n].float() - target).abs().max().item()
            if diff > tol * scale:
                return what, block_sites, diff
    return None


def _raise(what: str, site: SiteBinding, diff: float) -> None:
    if what == "self":
        raise ResolveError(
            f"site {site.name!r} ({site.module}.{site.io}): writing its own clean value "
            f"changed the logits by {diff:.3g}; the adapter maps it to the wrong place"
        )
    raise ResolveError(
        f"site {site.name!r} ({site.module}.{site.io}): writing another input's value "
        f"at every position did not carry it forward (logits off by {diff:.3g}); the "
        "tensor is also used outside the module (e.g. a residual skip): map the site "
        "with shared: true (written in place), or to another place"
    )


def _identity_bindings(
    bind: Callable[[str], SiteBinding] | None, n_layers: int
) -> dict[tuple[int, str], SiteBinding]:
    """(layer, kind) -> binding for the residual-identity sites this model has."""
    if bind is None:
        return {}
    bound = {}
    for layer in range(n_layers):
        for kind in _IDENTITY_KINDS:
            try:
                bound[(layer, kind)] = bind(f"L{layer}.{kind}")
            except ResolveError:
                continue
    return bound


def _check_identities(got: dict, n_layers: int, atol: float) -> None:
    for layer in range(n_layers):
        acts = {k: got[("id", (layer, k))] for k in _IDENTITY_KINDS if ("id", (layer, k)) in got}
        identities = [
            ("resid_mid", ["resid_pre", "attn_out"]),
            ("resid_post", ["resid_mid", "mlp_out"]),
        ]
        if "resid_mid" not in acts:  # attention-only, or attention and MLP in parallel (NeoX)
            parallel = ["mlp_out"] if "mlp_out" in acts else []
            identities = [("resid_post", ["resid_pre", "attn_out", *parallel])]
        for lhs, rhs in identities:
            if lhs in acts and all(r in acts for r in rhs):
                lhs_value = acts[lhs].float()
                total = sum(acts[r].float() for r in rhs)
                err = (lhs_value - total).abs().max().item()
                if err > atol * max(1.0, lhs_value.abs().max().item()):
                    raise ResolveError(
                        f"L{layer}.{lhs} != {' + '.join(f'L{layer}.{r}' for r in rhs)} "
                        f"(max error {err:.3g}): a residual site is mis-mapped"
                    )
