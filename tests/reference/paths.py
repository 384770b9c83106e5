"""Path patching the textbook way (Wang et al. 2022), independent of mi_spec's engine: plain
PyTorch hooks, every pass of every pair its own forward, Python loops over rows and positions.

A site is anything with ``name``, ``module``, ``io`` ("input"/"output") and feature columns
``start``/``stop`` (None = all), e.g. a bound ``SiteBinding``. Positions are per-row lists of
absolute indices, or None for every position.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from reference.hooks import capture, patched_logits


@contextmanager
def recording(model: torch.nn.Module, sites):
    """Copy each site's whole activation during the forwards run inside the block. Registered
    before any edit hook, so a site is recorded as it arrives, before any edit of its own."""
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = []
    for s in sites:
        mod = modules[s.module]
        if s.io == "output":

            def hook(m, args, out, name=s.name):
                got[name] = (out if torch.is_tensor(out) else out[0]).clone()

            handles.append(mod.register_forward_hook(hook))
        else:

            def pre(m, args, kwargs, name=s.name):
                got[name] = (args[0] if args else next(iter(kwargs.values()))).clone()

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def path_patched_logits(
    model,
    base: tuple[torch.Tensor, torch.Tensor],
    source: tuple[torch.Tensor, torch.Tensor],
    sender,
    sender_pos: tuple[list[list[int]], list[list[int]]] | None,
    receivers,
    receiver_pos: list[list[int]] | None,
    freeze,
) -> torch.Tensor:
    """The logits of pass 3 for one (sender, receivers) pair.

    ``sender_pos`` is (positions in the base rows, the same roles' positions in the source rows),
    or None for every position. ``freeze`` lists the sites (one per head) frozen in pass 2.
    """
    ids, mask = base
    # pass 1: the sender on the source input; every freeze site on the base input
    src = capture(model, source[0], source[1], [sender])[sender.name]
    clean = capture(model, ids, mask, list(freeze))

    def frozen(site):
        return lambda row, p: clean[site.name][row, p, site.start : site.stop]

    def from_source(row, p):
        if sender_pos is None:
            return src[row, p, sender.start : sender.stop]
        base_pos, src_pos = sender_pos
        return src[row, src_pos[row][base_pos[row].index(p)], sender.start : sender.stop]

    # pass 2: freeze everything else, patch the sender, record the receivers
    edits = [(f, None, frozen(f)) for f in freeze]
    edits.append((sender, None if sender_pos is None else sender_pos[0], from_source))
    with recording(model, receivers) as recorded:
        patched_logits(model, ids, mask, edits)

    # pass 3: only the receivers take their pass-2 values
    def recorded_value(site):
        return lambda row, p: recorded[site.name][row, p, site.start : site.stop]

    return patched_logits(
        model, ids, mask, [(r, receiver_pos, recorded_value(r)) for r in receivers]
    )
