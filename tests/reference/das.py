"""An obviously-correct interchange intervention for DAS, independent of mi_spec's engine and op:
plain forward hooks, one capture pass per input, the rotated swap written out per row and
position in float64."""

from __future__ import annotations

import torch
from reference.hooks import capture, patched_logits


def interchange_logits(model, site, base, sources, positions, rotation, k, on, masks=None):
    """Logits of ``base`` with each variable's rotated subspace swapped in from its source.

    ``base``: (ids, mask); ``sources``: one (ids, mask) per variable (row i is base row i's
    source); ``positions``: (base positions, [source positions per variable]) as per-row lists, or
    None for every position; ``rotation``: [w, cols]; variable v owns columns v*k..(v+1)*k;
    ``on``: [n_vars][rows] 0/1; ``masks``: [n_vars][k] weights (default 1).
    """
    r = rotation.double()
    h_base = capture(model, *base, [site])[site.name].double()
    h_src = [capture(model, *src, [site])[site.name].double() for src in sources]
    a, b = site.start, site.stop
    base_pos, src_pos = positions if positions is not None else (None, None)

    def value(row: int, p: int) -> torch.Tensor:
        hb = h_base[row, p, a:b]
        out = hb.clone()
        j = None if base_pos is None else base_pos[row].index(p)
        for v, hs in enumerate(h_src):
            if not on[v][row]:
                continue
            sp = p if src_pos is None else src_pos[v][row][j]
            diff = hs[row, sp, a:b] - hb
            for c in range(v * k, (v + 1) * k):
                weight = 1.0 if masks is None else float(masks[v][c - v * k])
                out = out + weight * (r[:, c] @ diff) * r[:, c]
        return out.float()

    return patched_logits(model, *base, [(site, base_pos, value)])
