"""Train the bundled 2-layer attention-only induction model and identify its heads.

Training data: BOS followed by a random span of k tokens (k in [MIN_SPAN, (n_ctx - 1) // 2])
repeated until n_ctx. Varying k rules out a purely positional "look back k" solution, so the model
has to learn content-based induction (a previous-token head feeding an induction head by
K-composition). A concave sparsity penalty on per-head OV norms, ramped in once the circuit has
formed, concentrates each role in a single head (see ``head_penalty``).

After training, heads are identified on held-out ``repeated_tokens`` data:
  * previous-token head: layer-0 head with the highest mean attention from position p to p-1;
  * induction head: layer-1 head with the highest mean attention from a second-half token at
    index i to index i-k+1, the position right after that token's first occurrence;
and checked causally by zero-ablating each head's slice of the ``o_proj`` input.

Usage: python examples/induction/train.py [--steps N] [--seed S] [--out PATH.pt]
Writes PATH.pt (fp32 state_dict) and PATH.json (config, losses, heads, ablations).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from mi_spec.zoo import AttnOnlyConfig, AttnOnlyTransformer, attn_only
from mi_spec.zoo.tasks import BOS, half_losses, repeated_tokens, rows_to_tensor

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "mi_spec/zoo/checkpoints/induction_2l.pt"
CONFIG = AttnOnlyConfig(n_layers=2, n_heads=4, d_model=64, d_head=16, n_ctx=64, d_vocab=100)
BATCH_SIZE = 32
LR = 1e-2
MIN_SPAN = 4
HEAD_L1 = 0.1
EVAL_ROWS = 256
EVAL_SEQ_LEN = 41
EVAL_SEED = 10_000


def make_batch(gen: torch.Generator, batch: int, cfg: AttnOnlyConfig) -> torch.Tensor:
    """Sequences [batch, n_ctx]: BOS, then a random span of k tokens repeated until n_ctx.

    ``k`` is drawn per row from ``[MIN_SPAN, (n_ctx - 1) // 2]`` so the copy offset varies.
    """
    n = cfg.n_ctx
    tokens = torch.randint(1, cfg.d_vocab, (batch, n), generator=gen)
    tokens[:, 0] = BOS
    span = torch.randint(MIN_SPAN, (n - 1) // 2 + 1, (batch, 1), generator=gen)
    idx = torch.arange(n).expand(batch, n)
    periodic = 1 + (idx - 1) % span
    return tokens.gather(1, torch.where(idx > span, periodic, idx))


def head_penalty(model: AttnOnlyTransformer) -> torch.Tensor:
    """Sparsity penalty over heads: sum of sqrt(Frobenius norm of each head's OV matrix).

    Weight decay spreads one role over several redundant heads, and a plain group lasso is
    indifferent to splitting it; the concave sqrt makes concentrating a role in one head cheapest,
    so each role ends up in a single head and ablations are decisive.
    """
    d_head = model.config.d_head
    norms = []
    for block in model.blocks:
        w_v, w_o = block.attn.v_proj.weight, block.attn.o_proj.weight
        for h in range(model.config.n_heads):
            cols = slice(h * d_head, (h + 1) * d_head)
            norms.append(torch.linalg.matrix_norm(w_o[:, cols] @ w_v[cols, :]))
    return torch.stack(norms).add(1e-6).sqrt().sum()


def head_l1_weight(step: int, steps: int) -> float:
    """Penalty weight: 0 for the first 20% of training (the circuit forms), then a linear ramp
    to HEAD_L1 at 60% (redundant heads are pruned), constant afterwards."""
    return HEAD_L1 * min(1.0, max(0.0, (step / steps - 0.2) / 0.4))


def train(model: AttnOnlyTransformer, steps: int, seed: int, eval_tokens: torch.Tensor) -> float:
    """AdamW with linear warmup + cosine decay; prints progress; returns the final train loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    half = (EVAL_SEQ_LEN - 1) // 2
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        model.train()
        tokens = make_batch(gen, BATCH_SIZE, model.config)
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].ravel())
        opt.zero_grad(set_to_none=True)
        (loss + head_l1_weight(step, steps) * head_penalty(model)).backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 20) == 0 or step == steps:
            first, second = evaluate(model, eval_tokens, half)
            print(
                f"step {step:5d}  train {loss.item():.3f}  eval first {first:.3f}  second {second:.3f}"
            )
    return loss.item()


@torch.no_grad()
def evaluate(model: AttnOnlyTransformer, tokens: torch.Tensor, half: int) -> tuple[float, float]:
    """First/second-half losses on repeated-token data."""
    model.eval()
    return half_losses(model(tokens), tokens, half)


@torch.no_grad()
def attention_patterns(model: AttnOnlyTransformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer attention probabilities [B, H, T, T], captured at ``blocks[i].attn.pattern``."""
    captured: list[torch.Tensor] = []
    hooks = [
        b.attn.pattern.register_forward_hook(lambda _m, _i, out: captured.append(out))
        for b in model.blocks
    ]
    try:
        model.eval()
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return captured


def prev_token_scores(pattern: torch.Tensor) -> list[float]:
    """Mean attention from position p to p-1 (p >= 1), per head."""
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2)).tolist()


def induction_scores(pattern: torch.Tensor, half: int) -> list[float]:
    """Mean attention from second-half index i (k+1..2k) to i-k+1, per head."""
    return pattern.diagonal(offset=-(half - 1), dim1=-2, dim2=-1)[..., 2:].mean(dim=(0, 2)).tolist()


@contextmanager
def ablate_head(model: AttnOnlyTransformer, layer: int, head: int) -> Iterator[None]:
    """Zero one head's columns of the ``o_proj`` input in ``blocks[layer]``."""
    d_head = model.config.d_head

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        z = args[0].clone()
        z[..., head * d_head : (head + 1) * d_head] = 0.0
        return (z,)

    handle = model.blocks[layer].attn.o_proj.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def analyse(model: AttnOnlyTransformer, tokens: torch.Tensor, half: int) -> dict:
    """Head scores, the identified heads, and per-head zero-ablation losses."""
    patterns = attention_patterns(model, tokens)
    prev = prev_token_scores(patterns[0])
    ind = induction_scores(patterns[1], half)
    ablations = {}
    for layer in range(model.config.n_layers):
        for head in range(model.config.n_heads):
            with ablate_head(model, layer, head):
                first, second = evaluate(model, tokens, half)
            ablations[f"L{layer}H{head}"] = {"first_half_loss": first, "second_half_loss": second}
    prev_head = max(range(len(prev)), key=prev.__getitem__)
    ind_head = max(range(len(ind)), key=ind.__getitem__)
    return {
        "prev_token_scores_layer0": prev,
        "induction_scores_layer1": ind,
        "heads": {
            "prev_token": _head_entry(0, prev_head, prev[prev_head], ablations),
            "induction": _head_entry(1, ind_head, ind[ind_head], ablations),
        },
        "ablations": ablations,
    }


def _head_entry(layer: int, head: int, score: float, ablations: dict) -> dict:
    """JSON record of an identified head with its zero-ablation second-half loss."""
    ablated = ablations[f"L{layer}H{head}"]["second_half_loss"]
    return {"layer": layer, "head": head, "score": score, "ablated_second_half_loss": ablated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint path (.pt)")
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    eval_tokens, half = rows_to_tensor(repeated_tokens(EVAL_ROWS, EVAL_SEQ_LEN, seed=EVAL_SEED))
    model = attn_only(**CONFIG.to_dict(), seed=args.seed)

    t0 = time.perf_counter()
    final_train_loss = train(model, args.steps, args.seed, eval_tokens)
    train_time = time.perf_counter() - t0
    first, second = evaluate(model, eval_tokens, half)
    report = analyse(model, eval_tokens, half)
    heads = report["heads"]
    print(
        f"trained {args.steps} steps in {train_time:.1f}s: first {first:.3f}, second {second:.3f}"
    )
    for role, h in heads.items():
        name, abl = f"L{h['layer']}H{h['head']}", h["ablated_second_half_loss"]
        print(f"{role}: {name} score {h['score']:.3f}, ablated second-half loss {abl:.3f}")

    meta = {
        "config": model.config.to_dict(),
        "training": {
            "seed": args.seed,
            "steps": args.steps,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "schedule": "AdamW(wd=0.01, betas=(0.9, 0.98)), 5% warmup, cosine decay",
            "min_span": MIN_SPAN,
            "head_sparsity": HEAD_L1,
            "final_train_loss": final_train_loss,
            "train_time_s": round(train_time, 1),
            "torch_version": torch.__version__,
        },
        "eval": {"n": EVAL_ROWS, "seq_len": EVAL_SEQ_LEN, "seed": EVAL_SEED, "half": half},
        "first_half_loss": first,
        "second_half_loss": second,
        **report,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    torch.save(state, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
