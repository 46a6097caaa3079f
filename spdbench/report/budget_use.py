"""How much of its budget each board row's stored perturbation uses (issue 35).

Why: the stochastic attacks (AdvDM, SDS, Mist, DiffusionGuard) make noisy sign steps and can end
well inside the ball; ranked "at 8/255" beside methods that spend all of it, they would be compared
at a smaller budget than their label says. The fraction is derived from the records' per-image
imperceptibility PSNR (RMS = 10^(-PSNR/20)), never from what an attack reports: on the kept region
for inpainting under L-inf (the repainted region is replaced by the editor), on the whole photo
otherwise. The 8-bit norm fraction is the record's `max_norm_applied` over eps.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from spdbench.budget import BUDGET_USE_FLOOR, Budget, budget_use_from_psnr
from spdbench.store.records import Record

#: rows whose budget use is not a property of a method: no change at all by definition
NO_BUDGET = frozenset({"none"})


def _per_image(rec: Record) -> list[float]:
    """Each photo's RMS as a fraction of the full-budget RMS."""
    kept = rec.imperceptibility_kept.get("psnr") if rec.norm == "linf" else None
    psnrs = kept or rec.imperceptibility.get("psnr", [])
    size = int(rec.suite_config.get("image_size") or 0)
    if not psnrs or size <= 0:
        return []
    budget = Budget(rec.norm, rec.eps)
    return [budget_use_from_psnr(p, budget, 3 * size * size) for p in psnrs if math.isfinite(p)]


def budget_use_columns(recs: Sequence[Record], floor: Optional[float] = None) -> dict:
    """`budget_rms` (mean over photos and prompts), `budget_norm` (largest applied norm / eps) and
    `under_budget` (budget_rms below the suite's floor) for one board row's records."""
    if not recs or recs[0].attack in NO_BUDGET:
        return dict(budget_rms=None, budget_norm=None, under_budget=False)
    values = [v for r in recs for v in _per_image(r)]
    rms = float(np.mean(values)) if values else None
    norms = [r.validation.max_norm_applied / r.eps for r in recs if r.validation.max_norm_applied is not None]
    floor = BUDGET_USE_FLOOR if floor is None else floor
    return dict(budget_rms=rms, budget_norm=max(norms) if norms else None,
                under_budget=rms is not None and rms < floor)


def under_budget_flag(rms: float) -> str:
    """The flag text shown in the row's flags column."""
    return f"under budget (RMS {rms:.0%} of eps)"
