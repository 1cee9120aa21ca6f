"""Bootstrap confidence intervals for benchmark scores over (prompt, seed) items.

A score (benchmarks/compbench.py) is a mean over items, one item per generated image. Its 95% interval is
the percentile bootstrap (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13): draw n
items with replacement from the n items, take the mean, repeat `RESAMPLES` times; the interval runs from
the 2.5th to the 97.5th percentile of those means.

Two settings sampled on the same items (the same prompts and initial noise: compbench's `seed_noise`)
compare by their *paired* difference: the per-item differences are resampled as one sample, so what
the items share (an easy prompt, a lucky seed) cancels, and the interval is narrower than two separate
intervals suggest. An interval that excludes 0 is a difference the items support at the 95% level.

Everything is seeded: the same scores give the same intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap interval [low, high]; n: the items it is over (NaN everywhere when n is 0)."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:  # "0.412 [0.37, 0.45]"
        return f"{self.mean:.3f} [{self.low:.2f}, {self.high:.2f}]"

    def signed(self) -> str:  # a difference: "+0.031 [-0.01, 0.07]"
        return f"{self.mean:+.3f} [{self.low:+.2f}, {self.high:+.2f}]"


def bootstrap_mean(values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = 0) -> Interval:
    """The mean of `values` (n items) and its percentile bootstrap interval at `level` (default 95%)."""
    x = torch.as_tensor(values, dtype=torch.float64)  # (n,)
    n = x.numel()
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (resamples, n), generator=g)  # (resamples, n) items drawn with replacement
    means = x[idx].mean(dim=1)  # (resamples,)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(x.mean().item(), low, high, n)


def category_intervals(scores: Sequence[Mapping[str, float | None]], categories: Sequence[str],
                       resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Interval]:
    """Per category, the mean over the items that have it (a None is "not scored": compbench's spatial of
    one-object prompts) with its bootstrap interval. scores: one dict per (prompt, seed) item."""
    return {c: bootstrap_mean([s[c] for s in scores if s[c] is not None], resamples, seed=seed) for c in categories}


def paired_differences(base: Sequence[Mapping[str, float | None]], other: Sequence[Mapping[str, float | None]],
                       categories: Sequence[str], resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Interval]:
    """Per category, the mean of `other - base` over the items both score, with its paired bootstrap interval.

    base, other: one dict per item, the same (prompt, seed) items in the same order (ValueError if their
    numbers differ)."""
    if len(base) != len(other):
        raise ValueError(f"paired differences need the same items in both settings, got {len(base)} and {len(other)}")
    out = {}
    for c in categories:
        diffs = [o[c] - b[c] for b, o in zip(base, other) if b[c] is not None and o[c] is not None]
        out[c] = bootstrap_mean(diffs, resamples, seed=seed)
    return out
