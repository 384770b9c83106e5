"""An independent reference for attribution patching: plain PyTorch hooks, ``torch.autograd.grad``
on zero perturbations added to each site, Python loops over rows and positions, metrics written
out by hand; and central finite differences of the (path-)patched metric, in float64.

Nothing here imports mi_spec's executor: sites come in as objects with ``module``, ``io``,
``start``, ``stop`` (e.g. mi_spec's ``SiteBinding``, used as plain data).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Edit = tuple[Any, Callable[[torch.Tensor], torch.Tensor]]  # (site, full activation -> new one)


def _module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return dict(model.named_modules())[path]


def run(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    edits: Sequence[Edit] = (),
    reads: Sequence[Any] = (),
) -> tuple[torch.Tensor, dict[Any, torch.Tensor]]:
    """One forward: each edit maps its site's whole activation to a new one (applied in the
    order given), each read copies its site's whole activation after the edits (site -> tensor).
    Autograd stays on, so edits may add tensors that require grad."""
    handles, got = [], {}

    def apply(site, act: torch.Tensor) -> torch.Tensor:
        for s, fn in edits:
            if (s.module, s.io) == (site.module, site.io):
                act = fn(act)
        for s in reads:
            if (s.module, s.io) == (site.module, site.io):
                got[s] = act
        return act

    places = {(s.module, s.io): s for s, _ in edits} | {(s.module, s.io): s for s in reads}
    for (module, io), site in places.items():
        mod = _module(model, module)
        if io == "output":
            handles.append(
                mod.register_forward_hook(
                    lambda m, a, out, site=site: (
                        apply(site, out)
                        if torch.is_tensor(out)
                        else (apply(site, out[0]), *out[1:])
                    )
                )
            )
        else:

            def pre(m, args, kwargs, site=site):
                if args and site.in_place:  # the input is also the residual skip: edit it there
                    args[0].copy_(apply(site, args[0]))
                    return None
                if args:
                    return (apply(site, args[0]), *args[1:]), kwargs
                key = next(iter(kwargs))
                return args, {**kwargs, key: apply(site, kwargs[key])}

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        out = model(ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return (out.logits if hasattr(out, "logits") else out), got


def metric_rows(kind: str, logits: torch.Tensor, positions, targets, wrong=None) -> torch.Tensor:
    """Per-row metric, differentiable, with explicit loops (mean over the row's positions)."""
    out = []
    for row, ps in enumerate(positions):
        vals = []
        for j, p in enumerate(ps):
            z = logits[row, p]
            logz = torch.logsumexp(z, 0)
            t = targets[row][j]
            if kind == "loss":
                vals.append(logz - z[t])
            elif kind == "prob":
                vals.append(torch.exp(z[t] - logz))
            elif kind == "logit_diff":
                vals.append(z[t] - z[wrong[row][j]])
            else:
                raise ValueError(kind)
        out.append(torch.stack(vals).mean())
    return torch.stack(out)


def _cols(site) -> slice:
    return slice(site.start, site.stop)


Delta = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (source, base) columns -> change


def _minus(src: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return src - base


def node_estimates(
    model,
    base,
    source,
    site,
    base_pos,
    src_pos,
    metric: Callable[[torch.Tensor], torch.Tensor],
    delta: Delta = _minus,
) -> list[float]:
    """sum_j D_j . dM/da(base_pos[j]) per row, D_j = ``delta``(a_src(src_pos[j]),
    a_base(base_pos[j])) (the patch's change: their difference, or for a subspace what writing the source's
    coordinates does), the gradient taken on a zero tensor added to the site's whole activation."""
    with torch.no_grad():
        _, got = run(model, *source, reads=[site])
    src = got[site]
    zero: dict[str, torch.Tensor] = {}

    def add_zero(act: torch.Tensor) -> torch.Tensor:
        zero["d"] = torch.zeros_like(act, requires_grad=True)
        return act + zero["d"]

    with torch.enable_grad():
        logits, got = run(model, *base, edits=[(site, add_zero)], reads=[site])
        m = metric(logits)
        (grad,) = torch.autograd.grad(m.sum(), [zero["d"]])
    act = got[site].detach()
    out = []
    for row in range(act.shape[0]):
        total = 0.0
        for p, q in zip(base_pos[row], src_pos[row], strict=True):
            d = delta(src[row, q, _cols(site)], act[row, p, _cols(site)])
            total += float((d * grad[row, p, _cols(site)]).sum())
        out.append(total)
    return out


def node_finite_difference(
    model, base, source, site, base_pos, src_pos, metric, delta: Delta = _minus, eps: float = 1e-4
) -> list[float]:
    """(M(base + eps*D) - M(base - eps*D)) / (2 eps) per row, D = ``delta``(source, base) at the
    site."""
    with torch.no_grad():
        _, src = run(model, *source, reads=[site])
        _, clean = run(model, *base, reads=[site])
    s, a = src[site], clean[site]

    def shifted(sign: float):
        def fn(act: torch.Tensor) -> torch.Tensor:
            act = act.clone()
            for row in range(act.shape[0]):
                for p, q in zip(base_pos[row], src_pos[row], strict=True):
                    d = delta(s[row, q, _cols(site)], a[row, p, _cols(site)])
                    act[row, p, _cols(site)] = a[row, p, _cols(site)] + sign * eps * d
            return act

        return fn

    with torch.no_grad():
        plus = metric(run(model, *base, edits=[(site, shifted(1.0))])[0])
        minus = metric(run(model, *base, edits=[(site, shifted(-1.0))])[0])
    return ((plus - minus) / (2 * eps)).tolist()


def head_write(proj: torch.nn.Module, z: torch.Tensor, site) -> torch.Tensor:
    """What head ``site`` writes through the output projection ``proj`` for z values ``z``
    (its columns only; the bias cancels): proj(z on the head's columns) - proj(0)."""
    full = torch.zeros(*z.shape[:-1], proj_in_features(proj), dtype=z.dtype)
    full[..., _cols(site)] = z[..., _cols(site)]
    return proj(full) - proj(torch.zeros_like(full))


def proj_in_features(proj: torch.nn.Module) -> int:
    w = proj.weight
    return w.shape[1] if isinstance(proj, torch.nn.Linear) else w.shape[0]  # HF Conv1D: [in, out]


def edge_estimates(
    model, base, source, sender, proj, point, receiver, base_pos, metric
) -> list[float]:
    """EAP: sum_j dc(base_pos[j]) . dM/dx_r, where dM/dx_r is the gradient of the metric with
    respect to a zero tensor added to the residual point *only in the copy the receiver reads*.
    ``proj``: the head's output projection (None for senders that write the stream directly).

    The receiver-only copy: one pass records x_r; a second adds a zero tensor to x_r, recomputes
    the receiver from it (a read in a pass where x_r carries the zero) and writes that receiver
    value into the base run, so the zero reaches M through the receiver alone. Base and
    source rows have one length (the sender's change is taken at the same positions).
    """
    with torch.no_grad():
        _, got = run(model, *source, reads=[sender])
        _, clean = run(model, *base, reads=[sender])
    d_sender = got[sender][:, :, _cols(sender)] - clean[sender][:, :, _cols(sender)]
    gap = d_sender if proj is None else head_write(proj, _pad(d_sender, sender), sender)
    return _edge_grad(model, base, gap, point, receiver, base_pos, metric)


def _pad(cols: torch.Tensor, site) -> torch.Tensor:
    """Columns of ``site`` placed back in a zero activation as wide as the site's stop."""
    full = torch.zeros(*cols.shape[:-1], site.stop, dtype=cols.dtype)
    full[..., _cols(site)] = cols
    return full


def _edge_grad(model, base, gap, point, receiver, base_pos, metric) -> list[float]:
    with torch.enable_grad():
        zero: dict[str, torch.Tensor] = {}

        def add_zero(act: torch.Tensor) -> torch.Tensor:
            zero["z"] = torch.zeros_like(act, requires_grad=True)
            return act + zero["z"]

        _, got = run(model, *base, edits=[(point, add_zero)], reads=[receiver])
        seen = got[receiver][:, :, _cols(receiver)]

        def put(act: torch.Tensor) -> torch.Tensor:
            act = act.clone()
            act[:, :, _cols(receiver)] = seen
            return act

        logits, _ = run(model, *base, edits=[(receiver, put)])
        (g,) = torch.autograd.grad(metric(logits).sum(), [zero["z"]])
    out = []
    for row in range(gap.shape[0]):
        total = 0.0
        for p in base_pos[row]:
            total += float((gap[row, p] * g[row, p]).sum())
        out.append(total)
    return out


def edge_finite_difference(
    model, base, source, sender, proj, point, receiver, base_pos, metric, eps=1e-4
) -> list[float]:
    """Central difference of the path-patched metric along eps * (the sender's change to its
    write) on the direct path: x_r + eps*dc at the sender positions is seen by the receiver
    alone (read in one pass, written into the base run in a second), every other component
    keeping its clean value."""
    with torch.no_grad():
        _, got = run(model, *source, reads=[sender])
        _, clean = run(model, *base, reads=[sender])
    d_sender = got[sender][:, :, _cols(sender)] - clean[sender][:, :, _cols(sender)]
    gap = d_sender if proj is None else head_write(proj, _pad(d_sender, sender), sender)

    def metric_at(sign: float) -> torch.Tensor:
        def shift(act: torch.Tensor) -> torch.Tensor:
            act = act.clone()
            for row in range(act.shape[0]):
                for p in base_pos[row]:
                    act[row, p] = act[row, p] + sign * eps * gap[row, p]
            return act

        with torch.no_grad():
            _, seen = run(model, *base, edits=[(point, shift)], reads=[receiver])
            value = seen[receiver][:, :, _cols(receiver)].clone()

            def put(act: torch.Tensor) -> torch.Tensor:
                act = act.clone()
                act[:, :, _cols(receiver)] = value
                return act

            return metric(run(model, *base, edits=[(receiver, put)])[0])

    return ((metric_at(1.0) - metric_at(-1.0)) / (2 * eps)).tolist()
