"""The per-image worst case over purifiers: the protection a protected photo can actually promise.

Why per image: an editor who strips protections tries what works on *that* photo, so the number a
protection can promise is, for each image, its protection after the purifier (or none) that best
restores that image's edit -- by SSIM of the edit to the clean edit, the leaderboard's headline
metric -- averaged over images (BlurGuard's per-sample worst case). It is derived here from the
per-image values a record holds, never stored as a number of its own, so nothing can claim it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

NONE = "none"  # the unpurified protected photo: an editor may also just edit it


def worst_case(protection: dict[str, Sequence[float]], purified: dict[str, dict[str, Sequence[float]]],
               by: str = "ssim") -> tuple[dict[str, list[float]], list[str]]:
    """({metric: per-image values of the chosen block}, [chosen block per image]).

    Blocks: the unpurified protection ("none") and every purifier. Per image the block with the
    highest `by` (most similar to the clean edit = least protection) is chosen; ties go to the
    first in ("none", then purifiers by name). Metrics missing from a block are skipped.
    """
    blocks = {NONE: protection, **{p: purified[p] for p in sorted(purified)}}
    names = [b for b in blocks if blocks[b].get(by)]
    if not names:
        return {}, []
    key = np.asarray([blocks[b][by] for b in names], dtype=np.float64)       # (blocks, images)
    key = np.where(np.isnan(key), -np.inf, key)
    choice = key.argmax(axis=0)
    metrics = set.intersection(*(set(blocks[b]) for b in names))
    out = {}
    for m in sorted(metrics):
        vals = np.asarray([blocks[b][m] for b in names], dtype=np.float64)
        out[m] = vals[choice, np.arange(vals.shape[1])].tolist()
    return out, [names[i] for i in choice]
