"""Dataset generators (and their loss helpers) for the bundled zoo models.

Repeated-token rows look like ``[BOS, t_1..t_k, t_1..t_k]`` with ``BOS = 0`` and
``k = (seq_len - 1) // 2``; an odd ``seq_len`` (e.g. 41) uses every slot, an even one yields rows of
length ``seq_len - 1``. Index ``i`` of the row holds ``t_i`` (first half, ``1 <= i <= k``) or
``t_{i-k}`` (second half, ``k < i <= 2k``).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the generators need no torch; the loss helpers import it when called
    import torch

BOS = 0
DEFAULT_VOCAB = 100


def repeated_tokens(
    n: int,
    seq_len: int,
    seed: int = 0,
    d_vocab: int = DEFAULT_VOCAB,
    distinct: bool = True,
) -> list[dict]:
    """``n`` rows ``{"tokens": [BOS, t_1..t_k, t_1..t_k], "half": k, "seq_len": 2k + 1}``.

    Tokens are drawn from ``1..d_vocab-1`` by ``random.Random(seed)``; with ``distinct`` (default)
    the ``k`` tokens of a row are all different, so each second-half token has exactly one earlier
    occurrence. Deterministic for a given set of arguments.
    """
    k = (seq_len - 1) // 2
    if k < 1:
        raise ValueError(f"seq_len must be >= 3, got {seq_len}")
    if distinct and k > d_vocab - 1:
        raise ValueError(f"cannot draw {k} distinct tokens from a vocabulary of {d_vocab - 1}")
    rng = random.Random(seed)
    pool = range(1, d_vocab)
    rows = []
    for _ in range(n):
        half = rng.sample(pool, k) if distinct else [rng.choice(pool) for _ in range(k)]
        rows.append({"tokens": [BOS, *half, *half], "half": k, "seq_len": 2 * k + 1})
    return rows


def token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy [B, T-1]: entry ``i - 1`` is the loss of predicting ``tokens[:, i]``."""
    import torch.nn.functional as F

    targets = tokens[:, 1:]
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat.float(), targets.reshape(-1), reduction="none").view(targets.shape)


def half_losses(logits: torch.Tensor, tokens: torch.Tensor, half: int) -> tuple[float, float]:
    """Mean loss on the first half (targets ``t_1..t_k``) and the second half.

    The second half counts targets at indices ``k+2..2k``: the ones an induction circuit can
    predict. The first repeated token (index ``k+1``) follows ``t_k``, which has no earlier
    occurrence, so it is as unpredictable as a first-half token and is excluded.
    """
    losses = token_losses(logits, tokens)
    first = losses[:, 0:half].mean().item()
    second = losses[:, half + 1 : 2 * half].mean().item()
    return first, second


def rows_to_tensor(rows: list[dict]) -> tuple[torch.Tensor, int]:
    """Stack equal-length repeated-token rows into a LongTensor [N, 2k+1] and return ``k``."""
    import torch

    halves = {row["half"] for row in rows}
    if len(halves) != 1:
        raise ValueError(f"rows mix half lengths {sorted(halves)}")
    return torch.tensor([row["tokens"] for row in rows], dtype=torch.long), halves.pop()
