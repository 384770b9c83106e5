"""Train a small SAE on the bundled induction model's residual stream (``L1.resid_pre``).

``python -m mi_spec.zoo.sae_train OUT_DIR`` collects the residual stream entering block 1 on
repeated-token rows, trains a standard ReLU SAE on it (seconds on a CPU) and saves it in the
SAELens layout (``cfg.json`` + ``sae_weights.safetensors``) with ``training.json`` (the settings
and the reconstruction figures). The shipped ``hypotheses/features/induction_L1_resid_pre/`` was
made by this command with its defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from mi_spec.features.sae import sae_stats, save_sae, train_sae
from mi_spec.sites.adapters.toy import TOY
from mi_spec.sites.vocabulary import parse_site
from mi_spec.zoo import induction_2l
from mi_spec.zoo.tasks import repeated_tokens, rows_to_tensor

SITE = "L1.resid_pre"
HOOK_NAME = "blocks.1.hook_resid_pre"
SEQ_LEN = 41
DEFAULTS: dict[str, Any] = {
    "n": 256, "seed": 0, "d_sae": 256, "l1": 0.4, "steps": 2000, "lr": 3e-3, "batch": 512,
    "threads": 1,  # torch threads while training: small matrices, fastest on one (busy CPUs)
}  # fmt: skip


@torch.no_grad()
def collect_resid(model: torch.nn.Module, tokens: torch.Tensor, site: str = SITE) -> torch.Tensor:
    """The activation at ``site`` of every position of ``tokens`` ``[B, T]``: ``[B, T, d]``,
    read by a plain forward hook on the module the toy adapter maps the site to."""
    binding = TOY.bind(parse_site(site), model)
    module = model.get_submodule(binding.module)
    got: list[torch.Tensor] = []
    if binding.io == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))
    else:
        handle = module.register_forward_hook(lambda _m, _a, out: got.append(out.detach()))
    try:
        model(tokens)
    finally:
        handle.remove()
    if len(got) != 1:
        raise RuntimeError(f"{site} ({binding.module}) fired {len(got)} times in one forward")
    return got[0]


def induction_tokens(n: int, seed: int) -> torch.Tensor:
    """``n`` repeated-token rows of length 41 for the bundled model: ``[n, 41]``."""
    return rows_to_tensor(repeated_tokens(n=n, seq_len=SEQ_LEN, seed=seed))[0]


def induction_sae(out_dir: str | Path | None, **settings: Any) -> dict[str, Any]:
    """Train an SAE on ``L1.resid_pre`` of ``mi_spec.zoo:induction_2l`` and save it in
    ``out_dir`` (None: do not save); return the stats (and ``sae``: the :class:`Sae`).

    ``settings`` override :data:`DEFAULTS`: ``n`` rows (seed ``seed``), ``d_sae``, ``l1``,
    ``steps``, ``lr``, ``batch``, ``threads``. Figures are measured on the training rows and on ``n`` fresh
    rows (seed ``seed + 1``): ``explained_variance``, ``mean_l0``, ``dead_features``.
    """
    if unknown := set(settings) - set(DEFAULTS):
        raise ValueError(f"induction_sae: unknown settings {sorted(unknown)}; known: "
                         f"{', '.join(DEFAULTS)}")  # fmt: skip
    s = DEFAULTS | settings
    model = induction_2l()
    acts = collect_resid(model, induction_tokens(s["n"], s["seed"]))
    sae, stats = train_sae(
        acts.reshape(-1, acts.shape[-1]), s["d_sae"], l1=s["l1"], steps=s["steps"],
        seed=s["seed"], lr=s["lr"], batch=s["batch"], hook_name=HOOK_NAME, threads=s["threads"],
    )  # fmt: skip
    fresh = collect_resid(model, induction_tokens(s["n"], s["seed"] + 1))
    stats["fresh"] = sae_stats(sae, fresh.reshape(-1, fresh.shape[-1]))
    cfg = {
        "hook_name": HOOK_NAME, "model_name": "mi_spec.zoo:induction_2l",
        "dataset_path": "mi_spec.zoo.tasks:repeated_tokens", "context_size": SEQ_LEN,
        "prepend_bos": True,
    }  # fmt: skip
    sae = dataclasses.replace(sae, cfg=cfg)
    if out_dir is not None:
        out = Path(out_dir)
        save_sae(out, sae)
        record = {"site": SITE, "command": f"python -m mi_spec.zoo.sae_train {out}", **s, **stats}
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return stats | {"sae": sae}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mi_spec.zoo.sae_train",
        description="Train an SAE on L1.resid_pre of the bundled induction model (SAELens layout).",
    )
    parser.add_argument("out_dir", help="folder to write cfg.json + sae_weights.safetensors to")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out_dir")
    stats = induction_sae(out, **args)
    stats.pop("sae")
    print(json.dumps({"out_dir": out, **stats}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
