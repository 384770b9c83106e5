"""Percentile-bootstrap confidence intervals over examples, vectorized over everything else.

Resampling draws one ``[n_boot, n]`` index matrix per call (from `seed`) and applies it to every
row at once, so all cells of e.g. a ``[layer, position, n]`` effect grid share the same bootstrap
replicates, and the same seed gives the same intervals whatever the statistic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Stat = Callable[..., np.ndarray]

_CHUNK_ELEMENTS = 1 << 24  # cap on the resampled array built at once by a generic `stat`


def bootstrap_ci(
    samples: np.ndarray,
    stat: Stat = np.mean,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    axis: int = -1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(estimate, low, high) of ``stat`` over the examples on `axis`.

    `samples` has shape ``[..., n]`` (after moving `axis` last); outputs have shape ``[...]``.
    `stat` must accept ``axis=-1``. The interval is the ``(alpha/2, 1 - alpha/2)`` percentile
    interval of `n_boot` resampled statistics. NaNs in `samples` propagate.
    """
    x = _examples_last(samples, axis)
    idx = _draw_indices(x.shape[-1], n_boot, seed)
    estimate = np.asarray(stat(x, axis=-1))
    boots = _boot_means(x, idx) if stat is np.mean else _boot_stat(x, idx, stat)
    low, high = _percentiles(boots, alpha)
    return estimate, low, high


def bootstrap_ratio_ci(
    num: np.ndarray,
    den: np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    axis: int = -1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(estimate, low, high) of ``mean(num) / mean(den)``, resampling examples in pairs.

    `num` is ``[..., n]`` and `den` is ``[n]`` or broadcastable ``[..., n]`` (examples on `axis`
    for both); the same resampled examples feed numerator and denominator. A denominator whose
    mean is near zero gives very wide (or infinite/NaN) intervals: the ratio is just computed,
    with no guarding, so check the denominator (e.g. the clean–corrupt logit difference) first.
    """
    x = _examples_last(num, axis)
    d = _examples_last(den, axis if np.ndim(den) > 1 else -1)
    if x.shape[-1] != d.shape[-1]:
        raise ValueError(f"num has {x.shape[-1]} examples but den has {d.shape[-1]}")
    idx = _draw_indices(x.shape[-1], n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = np.asarray(x.mean(axis=-1) / d.mean(axis=-1))
        ratios = _boot_means(x, idx) / _boot_means(d, idx)
    low, high = _percentiles(ratios, alpha)
    return estimate, low, high


def _examples_last(a: np.ndarray, axis: int) -> np.ndarray:
    x = np.moveaxis(np.asarray(a, dtype=float), axis, -1)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError("bootstrap needs at least one example along the resampled axis")
    return x


def _draw_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _boot_means(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Means of every resample, ``[..., n_boot]``, via a count matrix (no ``[..., n_boot, n]``)."""
    n_boot, n = idx.shape
    flat = (idx + n * np.arange(n_boot)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n)
    return x @ counts.T.astype(float) / n


def _boot_stat(x: np.ndarray, idx: np.ndarray, stat: Stat) -> np.ndarray:
    """``stat`` of every resample, ``[..., n_boot]``, built in memory-bounded chunks."""
    n_boot, n = idx.shape
    per_boot = max(1, int(np.prod(x.shape[:-1])) * n)
    step = max(1, _CHUNK_ELEMENTS // per_boot)
    parts = [np.asarray(stat(x[..., idx[i : i + step]], axis=-1)) for i in range(0, n_boot, step)]
    return np.concatenate(parts, axis=-1)


def _percentiles(boots: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    low, high = np.percentile(boots, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=-1)
    return np.asarray(low), np.asarray(high)


def ranks(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Ranks 1..n along ``axis``, ties sharing their average rank (as Spearman's rho needs)."""
    a = np.moveaxis(np.asarray(x, dtype=float), axis, -1)
    order = np.argsort(a, axis=-1, kind="stable")
    sorted_a = np.take_along_axis(a, order, -1)
    n = a.shape[-1]
    out = np.empty_like(a)
    for idx in np.ndindex(a.shape[:-1]):
        s = sorted_a[idx]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        stops = np.r_[starts[1:], n]
        avg = np.repeat((starts + stops + 1) / 2.0, stops - starts)  # mean of ranks start+1..stop
        out[idx][order[idx]] = avg
    return np.moveaxis(out, -1, axis)


def pearson(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Pearson's r along ``axis`` (NaN where either side is constant)."""
    a = np.moveaxis(np.asarray(x, dtype=float), axis, -1)
    b = np.moveaxis(np.asarray(y, dtype=float), axis, -1)
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray((a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1)))


def spearman(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Spearman's rank correlation along ``axis``: Pearson's r of the (tie-averaged) ranks."""
    return pearson(ranks(x, axis), ranks(y, axis), axis)


def bootstrap_correlation_ci(
    x: np.ndarray,
    y: np.ndarray,
    method: str = "spearman",
    magnitude: bool = False,
    zero_tol: float = 0.0,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high) of the correlation between the per-item means of ``x`` and ``y``.

    ``x`` and ``y`` are ``[items, n]`` per-example values (e.g. estimated and true effects of each
    site); each bootstrap replicate resamples the examples (the same ones for every item and both
    sides), takes the per-item means and correlates them across items (``spearman``/``pearson``).
    ``magnitude``: correlate ``|mean|`` (a ranking by size). ``zero_tol``: means within
    ``zero_tol * max|mean|`` of 0 count as exactly 0 (float noise must not make ranks).
    """
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"x and y must both be [items, n], got {a.shape} and {b.shape}")
    corr = {"spearman": spearman, "pearson": pearson}[method]

    def prep(means: np.ndarray) -> np.ndarray:  # [items, ...]
        m = np.abs(means) if magnitude else means.copy()
        m[np.abs(m) <= zero_tol * np.abs(m).max(axis=0, keepdims=True)] = 0.0
        return m

    estimate = float(corr(prep(a.mean(-1)), prep(b.mean(-1))))
    idx = _draw_indices(a.shape[-1], n_boot, seed)
    boots = corr(prep(_boot_means(a, idx)), prep(_boot_means(b, idx)), axis=0)  # [n_boot]
    boots = boots[np.isfinite(boots)]
    if not boots.size:
        return estimate, float("nan"), float("nan")
    low, high = _percentiles(boots, alpha)
    return estimate, float(low), float(high)
