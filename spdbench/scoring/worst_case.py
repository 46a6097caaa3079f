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


#: the purifiers the headline worst case is meant to include beyond a suite's original ladder (issue
#: 38: a mismatched editor, Noisy Upscaling, a platform's sharing chain). A record measured without
#: one of them still shows, its worst case over what it was measured with, and the missing ones named
#: (`not_measured`), never silently dropped.
HEADLINE_ADDED = ("swap-vae-tiny-b", "swap-img2img-tiny-b", "noisy-upscale", "platform")

DRAW_SEP = "~"  # as purifiers/base.py names draw k >= 1 of a randomized purifier: "<name>~<k>"


def not_measured(purified: dict, expected: Sequence[str] = HEADLINE_ADDED) -> list[str]:
    """The `expected` purifiers a record's blocks lack (in `expected`'s order)."""
    return [p for p in expected if p not in purified]


def _base(name: str) -> str:
    head, sep, tail = name.rpartition(DRAW_SEP)
    return head if sep and tail.isdigit() and tail != "0" else name


def draw_spread(purified: dict[str, dict[str, Sequence[float]]], by: str = "ssim") -> dict[str, list[float]]:
    """Per randomized purifier drawn more than once: per image, the spread (max - min) of `by`
    over its draws ("diffpure0.2", "diffpure0.2~1", ...). The worst case already takes the worst
    draw (each draw is a block); the spread says how much one draw would have misstated it."""
    groups: dict[str, list[str]] = {}
    for name in purified:
        groups.setdefault(_base(name), []).append(name)
    out = {}
    for base, names in sorted(groups.items()):
        if len(names) < 2 or not all(purified[n].get(by) for n in names):
            continue
        vals = np.asarray([purified[n][by] for n in names], dtype=np.float64)
        out[base] = (vals.max(axis=0) - vals.min(axis=0)).tolist()
    return out
