"""Sparse autoencoders in the SAELens on-disk layout, as sources of feature subspaces.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``,
``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for JumpReLU, ``threshold
[d_sae]``. The encoder is SAELens's: ``pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc``,
``f = relu(pre)`` (``standard``) or ``relu(pre) * (pre > threshold)`` (``jumprelu``); the decoder
``f @ W_dec + b_dec``. Both config layouts are read: SAELens 6 nests ``hook_name`` under
``metadata``; earlier versions keep it at the top level. :func:`save_sae` writes the flat layout
(every SAELens reads it: version 6 converts it on load).

Only architectures whose feature ``i`` is a function of ``x`` alone are accepted (``standard``,
``jumprelu``): a feature subspace reads and writes a subset of the features, which is only
meaningful when the others do not decide its value (``topk`` / ``batchtopk`` keep the k largest, so
a feature's value depends on every other one; ``gated`` has a second encoder path not read here).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mi_spec.features.subspace import SaeFeatures
from mi_spec.sites.vocabulary import SiteSyntaxError, parse_site

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "jumprelu")
REFUSED = {
    "topk": "a TopK SAE keeps the k largest pre-activations, so a feature's value depends on every "
    "other feature: the coordinates of a subset are not a function of the subset",
    "batchtopk": "a BatchTopK SAE picks active features across the batch, so a feature's value "
    "depends on the other features and the other rows",
    "matryoshka_batchtopk": "a BatchTopK SAE picks active features across the batch, so a "
    "feature's value depends on the other features and the other rows",
    "gated": "a gated SAE's features need its gate path (b_gate, r_mag, b_mag), which is not read "
    "here",
}
_SITE_HOOKS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_([a-z_]+)$")


@dataclass(frozen=True, eq=False)
class Sae:
    """A sparse autoencoder's weights and what its config says about them (``cfg``: as read)."""

    W_enc: Tensor  # SAELens's names and shapes
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor | None
    hook_name: str
    apply_b_dec_to_input: bool = True
    architecture: str = "standard"
    cfg: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(_architecture_message(self.architecture))
        if self.W_enc.ndim != 2:
            raise ValueError(f"SAE: W_enc must be [d_in, d_sae], got {tuple(self.W_enc.shape)}")
        d_in, d_sae = self.W_enc.shape
        want = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if self.architecture == "jumprelu":
            if self.threshold is None:
                raise ValueError("SAE: a jumprelu SAE needs a 'threshold' tensor [d_sae]")
            want["threshold"] = (d_sae,)
        elif self.threshold is not None:
            raise ValueError("SAE: a 'threshold' tensor given for a standard SAE (jumprelu?)")
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(
                    f"SAE: {name} has shape {got}, expected {shape} "
                    f"(W_enc is {tuple(self.W_enc.shape)} = [d_in, d_sae])"
                )

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def encode(self, x: Tensor) -> Tensor:
        """All feature activations ``[..., d_sae]`` of ``x [..., d_in]`` (in the SAE's dtype)."""
        x = x.to(self.W_enc)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        acts = torch.relu(pre)
        return acts if self.threshold is None else acts * (pre > self.threshold)

    def decode(self, f: Tensor) -> Tensor:
        """The reconstruction ``[..., d_in]`` of features ``f [..., d_sae]``."""
        return f.to(self.W_dec) @ self.W_dec + self.b_dec

    def features(self, idx: Sequence[int]) -> SaeFeatures:
        """The subspace of features ``idx`` (distinct, in ``0..d_sae-1``; their order is kept)."""
        idx = [int(i) for i in idx]
        if not idx:
            raise ValueError("SAE features: give at least one feature index")
        if bad := [i for i in idx if not 0 <= i < self.d_sae]:
            raise ValueError(f"SAE features: {bad} out of range; this SAE has 0..{self.d_sae - 1}")
        if len(set(idx)) != len(idx):
            dupes = sorted({i for i in idx if idx.count(i) > 1})
            raise ValueError(f"SAE features: {dupes} given more than once")
        sel = torch.tensor(idx, dtype=torch.long, device=self.W_enc.device)
        return SaeFeatures(
            self.W_enc[:, sel], self.b_enc[sel], self.W_dec[sel], self.b_dec,
            None if self.threshold is None else self.threshold[sel],
            apply_b_dec_to_input=self.apply_b_dec_to_input, indices=idx,
        )  # fmt: skip


def _architecture_message(arch: str) -> str:
    why = REFUSED.get(arch, "it is not one of the encoders mi_spec implements")
    supported = ", ".join(ARCHITECTURES)
    return f"SAE architecture {arch!r} is not supported ({why}); supported: {supported}"


def sae_site(hook_name: str) -> str:
    """The mi_spec site of a SAELens / TransformerLens hook point (``blocks.1.hook_resid_pre`` ->
    ``L1.resid_pre``; ``hook_embed`` -> ``embed``)."""
    supported = (
        "hook_embed, blocks.<l>.hook_resid_pre, blocks.<l>.hook_resid_mid, "
        "blocks.<l>.hook_resid_post, blocks.<l>.hook_attn_out, blocks.<l>.hook_mlp_out"
    )
    name = hook_name.strip()
    m = _HOOK_RE.match(name)
    ok = name == "hook_embed" or (m is not None and m[2] in _SITE_HOOKS)
    why = ""
    if m is not None and m[2] == "mlp_in":
        why = (
            " (TransformerLens's hook_mlp_in is the MLP block's input before its layer norm; "
            "mi_spec's mlp_in is after it: use blocks.<l>.hook_resid_mid)"
        )
    elif name.endswith(("hook_z", "hook_q", "hook_k", "hook_v")):
        why = " (per-head hook points: an SAE there reads every head at once)"
    if not ok:
        raise ValueError(
            f"SAE hook point {hook_name!r} has no mi_spec site{why}; supported: {supported}"
        )
    try:
        return parse_site(name).name
    except SiteSyntaxError as exc:  # pragma: no cover - the patterns above are in the vocabulary
        raise ValueError(f"SAE hook point {hook_name!r}: {exc}") from exc


def _hook_name(cfg: dict[str, Any]) -> str | None:
    for where in (cfg, cfg.get("metadata") or {}, cfg.get("meta") or {}):
        for key in ("hook_name", "hook_point"):
            if isinstance(where, dict) and where.get(key):
                return str(where[key])
    return None


def _read_cfg(folder: Path) -> tuple[dict[str, Any], str, str]:
    """``(cfg, architecture, hook_name)`` of an SAE folder, or the reason it cannot be used."""
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"SAE folder {folder}: {CFG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"SAE folder {folder}: {CFG_FILE} holds a {type(cfg).__name__}, not {{}}")
    arch = str(cfg.get("architecture") or "standard")
    if arch == "standard" and cfg.get("activation_fn", cfg.get("activation_fn_str")) == "topk":
        arch = "topk"  # SAELens < 6 wrote TopK SAEs as standard + activation_fn topk
    if arch not in ARCHITECTURES:
        raise ValueError(f"SAE folder {folder}: {_architecture_message(arch)}")
    norm = cfg.get("normalize_activations")
    if norm not in (None, "none", False):
        raise ValueError(
            f"SAE folder {folder}: normalize_activations is {norm!r}; only 'none' is supported: "
            "a normalised SAE rescales each activation before encoding (by a dataset constant "
            "not stored in the folder, or per token), so its features are not the fixed linear "
            "read-out and decoder directions a subspace needs. Fold the scaling into the "
            "weights (SAELens: fold_activation_norm_scaling_factor) and save it with "
            "normalize_activations 'none'"
        )
    if cfg.get("reshape_activations") not in (None, "none"):
        raise ValueError(
            f"SAE folder {folder}: reshape_activations is {cfg['reshape_activations']!r}; "
            "only 'none' is supported (hook_z SAEs read per-head activations)"
        )
    hook = _hook_name(cfg)
    if hook is None:
        raise ValueError(f"SAE folder {folder}: {CFG_FILE} names no hook_name")
    return cfg, arch, hook


def _read_tensors(folder: Path, arch: str) -> dict[str, Tensor]:
    """The weights an ``arch`` SAE needs, float32 (float64 kept), a fine-tuning scale folded."""
    try:
        tensors = dict(load_file(folder / WEIGHTS_FILE))
    except Exception as exc:
        raise ValueError(f"SAE folder {folder}: {WEIGHTS_FILE} is not safetensors: {exc}") from exc
    if arch == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    scale = tensors.pop("finetuning_scaling_factor", tensors.pop("scaling_factor", None))
    need = ["W_enc", "b_enc", "W_dec", "b_dec"] + ["threshold"] * (arch == "jumprelu")
    if absent := [k for k in need if k not in tensors]:
        raise ValueError(
            f"SAE folder {folder}: {WEIGHTS_FILE} lacks {', '.join(absent)} "
            f"(it holds: {', '.join(sorted(tensors)) or 'nothing'})"
        )
    if extra := sorted(set(tensors) - set(need)):
        raise ValueError(
            f"SAE folder {folder}: {WEIGHTS_FILE} holds tensors a {arch} SAE does not have: "
            f"{', '.join(extra)}"
        )
    for name in need:
        t = tensors[name]
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"SAE folder {folder}: {name} holds non-finite or non-float values")
        tensors[name] = t.double() if t.dtype == torch.float64 else t.float()
    if scale is not None and not torch.allclose(scale.float(), torch.ones_like(scale.float())):
        if scale.shape != tensors["W_dec"].shape[:1]:
            raise ValueError(
                f"SAE folder {folder}: finetuning_scaling_factor has shape "
                f"{tuple(scale.shape)}, expected ({tensors['W_dec'].shape[0]},)"
            )
        tensors["W_dec"] = tensors["W_dec"] * scale.to(tensors["W_dec"])[:, None]  # folded
    return tensors


def load_sae(folder: str | Path) -> Sae:
    """Read an SAE folder in the SAELens layout; every refusal names the folder and the reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"SAE folder not found: {folder}")
    missing = [f for f in (CFG_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
    if missing:
        raise ValueError(
            f"SAE folder {folder}: missing {', '.join(missing)} "
            f"(the SAELens layout is {CFG_FILE} + {WEIGHTS_FILE})"
        )
    cfg, arch, hook = _read_cfg(folder)
    tensors = _read_tensors(folder, arch)
    try:
        sae = Sae(
            **{k: tensors[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")},
            threshold=tensors.get("threshold"), hook_name=hook,
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
            architecture=arch, cfg=cfg,
        )  # fmt: skip
    except ValueError as exc:
        raise ValueError(f"SAE folder {folder}: {exc}") from exc
    for key, have in (("d_in", sae.d_in), ("d_sae", sae.d_sae)):
        if key in cfg and int(cfg[key]) != have:
            raise ValueError(
                f"SAE folder {folder}: {CFG_FILE} says {key}={cfg[key]}, the weights have {have} "
                f"(W_enc is {tuple(sae.W_enc.shape)})"
            )
    return sae


def _hook_layer(hook_name: str) -> int:
    m = re.match(r"^blocks\.(\d+)\.", hook_name)
    return int(m[1]) if m else 0


def save_sae(folder: str | Path, sae: Sae) -> None:
    """Write ``sae`` in the SAELens layout (flat ``cfg.json``; keys of ``sae.cfg`` kept)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / WEIGHTS_FILE)
    cfg = dict(sae.cfg)
    for nested in ("metadata", "meta"):  # SAELens 6 nests these; the flat layout lifts them
        for key, value in (cfg.pop(nested, None) or {}).items():
            cfg.setdefault(key, value)
    cfg.pop("sae_lens_version", None)  # a version >= 6 would tell SAELens to expect nesting
    defaults = {
        "model_name": "", "hook_head_index": None, "activation_fn_str": "relu",
        "finetuning_scaling_factor": False, "context_size": None, "dataset_path": "",
        "dataset_trust_remote_code": False, "prepend_bos": True,
        "sae_lens_training_version": None,
    }  # fmt: skip
    for key, value in defaults.items():
        cfg.setdefault(key, value)
    cfg.pop("activation_fn", None)  # the pre-6 name is activation_fn_str
    cfg.update(
        d_in=sae.d_in, d_sae=sae.d_sae, hook_name=sae.hook_name,
        hook_layer=_hook_layer(sae.hook_name), architecture=sae.architecture,
        apply_b_dec_to_input=sae.apply_b_dec_to_input, normalize_activations="none",
        reshape_activations="none", finetuning_scaling_factor=False,
        dtype=str(sae.W_enc.dtype).removeprefix("torch."), device="cpu",
    )  # fmt: skip
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


def train_sae(
    acts: Tensor,
    d_sae: int,
    *,
    l1: float,
    steps: int,
    seed: int,
    lr: float = 1e-3,
    batch: int = 256,
    hook_name: str,
    threads: int | None = None,
) -> tuple[Sae, dict[str, Any]]:
    """Train a standard ReLU SAE on ``acts [N, d]``; ``(sae, stats)``.

    Loss: squared error summed over ``d`` plus ``l1`` times the sum of feature activations,
    averaged over a batch; decoder rows are kept at unit norm (so the L1 term cannot be dodged by
    shrinking features), ``b_dec`` starts at the data mean. Adam. Deterministic from ``seed``
    alone (its own ``torch.Generator``; the global RNG is left as it was). ``stats``, measured
    on all of ``acts``: ``explained_variance`` (1 - residual / total variance), ``mean_l0``
    (active features per row), ``dead_features`` (never active), ``seconds``, ``final_loss``.
    Trains on ``acts``'s device. ``threads``: torch's intra-op threads while training (restored
    after); 1 is fastest for small SAEs on a busy CPU (the matrices are too small to split).
    """
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise ValueError(f"train_sae: acts must be [N, d] with N >= 2, got {tuple(acts.shape)}")
    if d_sae < 1 or steps < 0 or batch < 1:
        raise ValueError(f"train_sae: need d_sae >= 1, steps >= 0, batch >= 1 (got {d_sae}, "
                         f"{steps}, {batch})")  # fmt: skip
    t0, saved_threads = time.perf_counter(), torch.get_num_threads()
    x = acts.detach().float()
    n, d = x.shape
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        w_dec = torch.randn(d_sae, d, generator=gen).to(x.device)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        params = {
            "W_enc": w_dec.T.clone().requires_grad_(),
            "b_enc": torch.zeros(d_sae, device=x.device, requires_grad=True),
            "W_dec": w_dec.requires_grad_(),
            "b_dec": x.mean(0).clone().requires_grad_(),
        }
        opt = torch.optim.Adam(list(params.values()), lr=lr)
        loss = torch.tensor(math.nan)
        for _ in range(steps):
            xb = x[torch.randint(n, (min(batch, n),), generator=gen).to(x.device)]
            f = torch.relu((xb - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
            recon = f @ params["W_dec"] + params["b_dec"]
            loss = ((recon - xb) ** 2).sum(-1).mean() + l1 * f.sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True).clamp_min(1e-12)
    finally:
        torch.set_num_threads(saved_threads)
    p = {k: v.detach().clone() for k, v in params.items()}
    sae = Sae(**p, threshold=None, hook_name=hook_name, apply_b_dec_to_input=True,
              architecture="standard", cfg={"hook_name": hook_name})  # fmt: skip
    stats = sae_stats(sae, x) | {
        "seconds": time.perf_counter() - t0, "final_loss": float(loss.detach()), "steps": steps,
        "d_sae": d_sae, "l1": l1, "lr": lr, "batch": batch, "seed": seed, "rows": n,
    }  # fmt: skip
    return sae, stats


@torch.no_grad()
def sae_stats(sae: Sae, acts: Tensor) -> dict[str, Any]:
    """How well ``sae`` reconstructs ``acts [N, d]``: explained variance, mean L0, dead features."""
    x = acts.to(sae.W_enc)
    f = sae.encode(x)
    residual = ((sae.decode(f) - x) ** 2).sum()
    total = ((x - x.mean(0)) ** 2).sum()
    active = f > 0
    return {
        "explained_variance": float(1 - residual / total),
        "mean_l0": float(active.sum(-1).float().mean()),
        "dead_features": int((~active.any(0)).sum()),
    }
