"""Per-cell means as a frame, and seeded bootstrap confidence intervals over images: how certain a
leaderboard mean is. The frame is here, below the harness and the report, because both read it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from spdbench.scoring.metrics import list_metrics
from spdbench.store.records import Record, Status, method_label


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


def mean_or_none(values: Sequence[float]) -> Optional[float]:
    """Mean of per-image values (None for an empty list): the only way a mean enters a table."""
    return float(np.mean(np.asarray(values, dtype=np.float64))) if len(values) else None


def records_frame(records: Iterable[Record]) -> pd.DataFrame:
    """One row per ok record: axes, protection and imperceptibility means (of the per-image values), costs."""
    rows = []
    for r in records:
        if r.status != Status.ok:
            continue
        row = dict(method=method_label(r), attack=r.attack, suite=r.suite, task=r.task, target=r.target.name, norm=r.norm,
                   eps=r.eps, eps_label=r.eps_label, prompt=r.prompt_key, split=r.split.value,
                   n_images=len(r.image_names), universal=r.universal,
                   seconds_per_image=r.timing.per_image_s, fit_seconds=r.timing.fit_wall_s,
                   peak_memory_mb=(r.timing.peak_memory_bytes or 0) / 2**20 or None, cell_id=r.cell_id)
        # every registered metric: one an entry predates is None ("not measured")
        row.update({m: mean_or_none(r.protection.get(m, [])) for m in list_metrics()})
        row.update({f"imp_{m}": mean_or_none(r.imperceptibility.get(m, [])) for m in list_metrics()})
        rows.append(row)
    return pd.DataFrame(rows)
