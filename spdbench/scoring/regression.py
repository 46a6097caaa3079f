"""Regression mode: compare a run to a stored baseline and fail when protection weakens.

Each metric knows its direction (protection metrics: lower is stronger). A cell regresses when
the paired bootstrap interval of (new - baseline) lies entirely on the weaker side, i.e. the
weakening is significant, not noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from spdbench.store.records import Record, Status
from spdbench.scoring.stats import Interval, bootstrap_diff_ci
from spdbench.scoring.metrics import METRICS


@dataclass
class Regression:
    cell: str
    metric: str
    diff: Interval

    def __str__(self) -> str:
        return f"{self.cell}: protection {self.metric} weakened by {self.diff} (new - baseline)"


def _key(r: Record) -> tuple:
    return (r.attack, r.suite, r.norm, r.eps_label, r.prompt_key, r.split.value)


def compare(new: Iterable[Record], baseline: Iterable[Record], metrics: Sequence[str] = ("ssim",),
            level: float = 0.95, seed: int = 0) -> list[Regression]:
    """Regressions of `new` against `baseline`, matched by (attack, suite, eps, prompt, split)."""
    base = {_key(r): r for r in baseline if r.status == Status.ok}
    found = []
    for r in new:
        b = base.get(_key(r))
        if b is None or r.status != Status.ok:
            continue
        for m in metrics:
            x, y = r.protection.get(m), b.protection.get(m)
            if not x or not y:
                continue
            paired = r.image_sha256 == b.image_sha256
            ci = bootstrap_diff_ci(x, y, level=level, seed=seed, paired=paired)
            # protection metrics: similarity higher than baseline = weaker immunization
            weaker = ci.low > 0 if METRICS[m].higher_is_better else ci.high < 0
            if weaker:
                found.append(Regression(r.cell_id, m, ci))
    return found
