"""Obviously-correct references, independent of mi_spec's engine: plain PyTorch hooks, one
forward per variant, Python loops over rows and positions, metrics written out by hand."""

from __future__ import annotations

import math

import torch


def _module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return dict(model.named_modules())[path]


def capture(model, ids, mask, sites) -> dict[str, torch.Tensor]:
    """Full activations [B, T, D] of each site's module input/output (site name -> tensor)."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for s in sites:
        mod = _module(model, s.module)
        if s.io == "output":
            handles.append(
                mod.register_forward_hook(
                    lambda m, a, out, name=s.name: got.__setitem__(name, _first(out).clone())
                )
            )
        else:
            handles.append(
                mod.register_forward_pre_hook(
                    lambda m, a, kw, name=s.name: got.__setitem__(name, _first_arg(a, kw).clone()),
                    with_kwargs=True,
                )
            )
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return got


def patched_logits(model, ids, mask, edits) -> torch.Tensor:
    """``edits``: list of (site, per-row position lists or None, value_fn(row, pos) -> [w]); a
    ``value_fn`` with ``relative = True`` is called as value_fn(row, pos, current [w])."""
    handles = []

    def apply(act: torch.Tensor, site, positions, value_fn) -> torch.Tensor:
        act = act.clone()
        a, b = site.start, site.stop
        for row in range(act.shape[0]):
            ps = range(act.shape[1]) if positions is None else positions[row]
            for p in ps:
                if getattr(value_fn, "relative", False):  # the new value from the current one
                    act[row, p, a:b] = value_fn(row, p, act[row, p, a:b])
                else:
                    act[row, p, a:b] = value_fn(row, p)
        return act

    for site, positions, value_fn in edits:
        mod = _module(model, site.module)
        if site.io == "output":

            def hook(m, args, out, site=site, positions=positions, value_fn=value_fn):
                return (
                    apply(_first(out), site, positions, value_fn)
                    if torch.is_tensor(out)
                    else (apply(out[0], site, positions, value_fn), *out[1:])
                )

            handles.append(mod.register_forward_hook(hook))
        else:

            def pre(m, args, kwargs, site=site, positions=positions, value_fn=value_fn):
                if args and site.in_place:  # the input is also the residual skip: edit it there
                    args[0].copy_(apply(args[0], site, positions, value_fn))
                    return None
                if args:
                    return (apply(args[0], site, positions, value_fn), *args[1:]), kwargs
                key = next(iter(kwargs))
                return args, {**kwargs, key: apply(kwargs[key], site, positions, value_fn)}

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return out.logits if hasattr(out, "logits") else out


def metric_by_hand(kind, logits, positions, targets, wrong=None, clean_logits=None) -> list[float]:
    """Per-row metric with explicit loops (mean over the row's scored positions)."""
    out = []
    for row, ps in enumerate(positions):
        vals = []
        for j, p in enumerate(ps):
            z = logits[row, p].double()
            logz = math.log(sum(math.exp(v) for v in z.tolist()))
            t = targets[row][j]
            if kind == "loss":
                vals.append(logz - z[t].item())
            elif kind == "prob":
                vals.append(math.exp(z[t].item() - logz))
            elif kind == "accuracy":
                vals.append(float(int(z.argmax()) == t))
            elif kind == "logit_diff":
                vals.append(z[t].item() - z[wrong[row][j]].item())
            elif kind == "kl":
                c = clean_logits[row, p].double()
                logc = math.log(sum(math.exp(v) for v in c.tolist()))
                vals.append(
                    sum(
                        math.exp(ci - logc) * ((ci - logc) - (zi - logz))
                        for ci, zi in zip(c.tolist(), z.tolist(), strict=True)
                    )
                )
        out.append(sum(vals) / len(vals))
    return out


def _first(out):
    return out if torch.is_tensor(out) else out[0]


def _first_arg(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))
