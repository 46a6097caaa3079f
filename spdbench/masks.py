"""Inpainting masks: boxes and free-form brush strokes, drawn only from a torch.Generator.

Why one module: the inpainting target is trained on these masks and the inpainting suites edit
with them; a second copy would let the two drift. A mask is (N, 1, H, W) float32 with 1 where
the editor repaints and 0 where it keeps the photo (diffusers' convention: white = repaint).
Strokes are drawn with scikit-image (`skimage.draw`), not by hand.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

MASK_KINDS = ("box", "strokes", "full")


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """An integer in [lo, hi] (both included)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def box_mask(size: int, g: torch.Generator, min_frac: float = 0.25, max_frac: float = 0.6) -> torch.Tensor:
    """(1, size, size): one axis-aligned box with sides in [min_frac, max_frac] of the image."""
    h = max(1, round(size * _uniform(g, min_frac, max_frac)))
    w = max(1, round(size * _uniform(g, min_frac, max_frac)))
    top, left = _randint(g, 0, size - h), _randint(g, 0, size - w)
    m = torch.zeros(1, size, size)
    m[:, top:top + h, left:left + w] = 1.0
    return m


def stroke_mask(size: int, g: torch.Generator, strokes: tuple[int, int] = (1, 4),
                vertices: tuple[int, int] = (2, 6), width_frac: tuple[float, float] = (0.06, 0.16)) -> torch.Tensor:
    """(1, size, size): free-form brush strokes (LaMa-style polylines of random width)."""
    from skimage.draw import disk, line

    canvas = np.zeros((size, size), dtype=bool)
    for _ in range(_randint(g, *strokes)):
        radius = max(1.0, size * _uniform(g, *width_frac) / 2)
        r, c = _uniform(g, 0, size - 1), _uniform(g, 0, size - 1)
        for _ in range(_randint(g, *vertices) - 1):
            angle, length = _uniform(g, 0, 2 * math.pi), size * _uniform(g, 0.1, 0.4)
            r2 = min(size - 1.0, max(0.0, r + length * math.sin(angle)))
            c2 = min(size - 1.0, max(0.0, c + length * math.cos(angle)))
            rr, cc = line(round(r), round(c), round(r2), round(c2))
            for y, x in zip(rr[::max(1, int(radius // 2))], cc[::max(1, int(radius // 2))]):
                dr, dc = disk((y, x), radius, shape=canvas.shape)
                canvas[dr, dc] = True
            dr, dc = disk((round(r2), round(c2)), radius, shape=canvas.shape)
            canvas[dr, dc] = True
            r, c = r2, c2
    return torch.from_numpy(canvas).float()[None]


def random_masks(n: int, size: int, g: torch.Generator, kinds: Sequence[str] = ("box", "strokes"),
                 weights: Sequence[float] | None = None) -> torch.Tensor:
    """(n, 1, size, size): each mask of a kind drawn with `weights` ("full" repaints everything)."""
    unknown = [k for k in kinds if k not in MASK_KINDS]
    if unknown:
        raise ValueError(f"mask kind(s) {unknown}: expected some of {list(MASK_KINDS)}")
    w = torch.tensor(list(weights) if weights is not None else [1.0] * len(kinds), dtype=torch.float64)
    out = []
    for _ in range(n):
        kind = kinds[int(torch.multinomial(w, 1, generator=g))]
        if kind == "box":
            out.append(box_mask(size, g))
        elif kind == "strokes":
            out.append(stroke_mask(size, g))
        else:
            out.append(torch.ones(1, size, size))
    return torch.stack(out)


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """The mask at latent resolution, as diffusers' inpainting pipeline makes it (nearest)."""
    h, w = mask.shape[-2:]
    return torch.nn.functional.interpolate(mask, size=(h // factor, w // factor))
