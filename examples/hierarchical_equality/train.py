"""Train the bundled hierarchical-equality MLP: ``(a == b) == (c == d)`` over 1000 entities.

The architecture follows the DAS tutorial: four 4-dimensional entity vectors (fixed, uniform in
[-1, 1]) concatenated, three ReLU layers of 16 units, two output classes. Training batches are
drawn from 200k rows of the balanced generator (``a == b`` and ``c == d`` each true half the time);
accuracy is reported on held-out balanced and uniformly drawn rows.

Usage: python examples/hierarchical_equality/train.py [--steps N] [--seed S] [--out PATH.pt]
Writes PATH.pt (fp32 state_dict) and PATH.json (config, accuracy, training settings).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mi_spec.zoo.equality import (
    EQUALITY_CHECKPOINT,
    EqualityConfig,
    EqualityMLP,
    hierarchical_equality,
)

CONFIG = EqualityConfig(n_entities=1000, d_embed=4, d_hidden=16, n_layers=3, embed_seed=0)
BATCH_SIZE = 512
POOL_ROWS = 200_000  # training rows; batches are drawn from them
LR = 3e-3
WEIGHT_DECAY = 0.1
EVAL_ROWS = 20_000
EVAL_SEED = 10_000


def tensors(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([r["tokens"] for r in rows])
    return ids, torch.tensor([r["label"] for r in rows])


@torch.no_grad()
def accuracy(model: EqualityMLP, rows: list[dict]) -> float:
    ids, labels = tensors(rows)
    return (model(ids)[:, -1].argmax(-1) == labels).float().mean().item()


def train(steps: int, seed: int) -> tuple[EqualityMLP, list[float]]:
    torch.manual_seed(seed)
    model = EqualityMLP(CONFIG)
    params = [p for p in model.parameters() if p.requires_grad]  # entity vectors stay fixed
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    pool_ids, pool_labels = tensors(hierarchical_equality(POOL_ROWS, seed, CONFIG.n_entities))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, POOL_ROWS, (BATCH_SIZE,), generator=gen)
        loss = F.cross_entropy(model(pool_ids[idx])[:, -1], pool_labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}")
    return model.eval(), losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=EQUALITY_CHECKPOINT)
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    t0 = time.perf_counter()
    model, losses = train(args.steps, args.seed)
    balanced = accuracy(model, hierarchical_equality(EVAL_ROWS, EVAL_SEED, CONFIG.n_entities))
    uniform = accuracy(model, hierarchical_equality(EVAL_ROWS, EVAL_SEED, CONFIG.n_entities, False))
    print(f"accuracy: balanced {balanced:.4f}, uniform {uniform:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    meta = {
        "config": CONFIG.to_dict(),
        "task": "(a == b) == (c == d); generator mi_spec.zoo.equality:hierarchical_equality",
        "accuracy": {"balanced": balanced, "uniform": uniform, "rows": EVAL_ROWS},
        "training": {
            "steps": args.steps,
            "seed": args.seed,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "optimizer": f"adamw (weight decay {WEIGHT_DECAY}), constant learning rate",
            "final_loss": sum(losses[-100:]) / len(losses[-100:]),
            "seconds": round(time.perf_counter() - t0, 1),
        },
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
