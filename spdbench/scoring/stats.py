"""Seeded bootstrap confidence intervals over images: how certain a leaderboard mean is."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"

    def signed(self, digits: int = 4) -> str:
        """A difference's interval with its signs shown, "+0.0123 [-0.0010, +0.0250]": the form the
        paired tables use (`spdbench compare`, the docs' table scripts)."""
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap of the mean (resampling images with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("bootstrap of an empty sample")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    a = (1 - level) / 2
    return Interval(float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))


def bootstrap_diff_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0, paired: bool = True) -> Interval:
    """CI of mean(a) - mean(b); paired resampling when a and b are the same images."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if paired:
        if x.size != y.size:
            raise ValueError("paired bootstrap needs samples of equal size")
        idx = rng.integers(0, x.size, size=(n_boot, x.size))
        diffs = x[idx].mean(axis=1) - y[idx].mean(axis=1)
    else:
        diffs = (x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
                 - y[rng.integers(0, y.size, size=(n_boot, y.size))].mean(axis=1))
    q = (1 - level) / 2
    return Interval(float(x.mean() - y.mean()), float(np.quantile(diffs, q)), float(np.quantile(diffs, 1 - q)))
