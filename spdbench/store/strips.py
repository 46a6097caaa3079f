"""Example images of a cell: what a reader needs to *see* a protection work or fail.

For the first few test photos of every cell the harness writes one PNG strip beside the records,
`examples/<cell id>__<image>.png`, panels left to right (PANELS): the photo, the protected photo,
the perturbation (grey = unchanged, amplified so its largest change is full scale), the edit of the
photo, the edit of the
protected photo, and the edit after the purifier that helped the editor most on that photo (the
per-image worst case; absent without purifiers). Illustrations only: no number is read from them
(`verify` checks them as PNGs and nothing else). Each panel is at most MAX_SIDE pixels a side, so
a strip stays small at 512 px.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from spdbench.store.records import atomic_write_bytes

#: test photos per cell that get a strip
PER_CELL = 2
#: the largest side of one panel in a strip (larger photos are downscaled, area-averaged)
MAX_SIDE = 256
PANELS = ("photo", "protected", "perturbation", "edit of photo", "edit of protected", "worst purified edit")
_GAP = 4


def example_rel(cell_id: str, image_name: str) -> str:
    """Where a strip lives inside a run folder (file names under the entry schema's rules)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in image_name)[:80] or "image"
    return f"examples/{cell_id}__{safe}.png"


def _panel(img: torch.Tensor) -> np.ndarray:
    img = img.detach().float().cpu().clamp(0, 1)
    if max(img.shape[-2:]) > MAX_SIDE:
        scale = MAX_SIDE / max(img.shape[-2:])
        size = (max(1, round(img.shape[-2] * scale)), max(1, round(img.shape[-1] * scale)))
        img = torch.nn.functional.interpolate(img[None], size=size, mode="area")[0]
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def strip_png(panels: Sequence[torch.Tensor]) -> bytes:
    """The panels (each (3, H, W) in [0, 1]) side by side on white, as PNG bytes."""
    arrays = [_panel(p) for p in panels]
    h = max(a.shape[0] for a in arrays)
    w = sum(a.shape[1] for a in arrays) + _GAP * (len(arrays) - 1)
    canvas = np.full((h, w, 3), 255, dtype=np.uint8)
    x = 0
    for a in arrays:
        canvas[:a.shape[0], x:x + a.shape[1]] = a
        x += a.shape[1] + _GAP
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def worst_purifier(ssim: dict[str, Sequence[float]], i: int) -> Optional[str]:
    """The purifier whose edit was closest to the clean edit on image i (highest protection SSIM:
    the editor's best choice), ties to the first by name; None without purifiers."""
    return max(sorted(ssim), key=lambda n: float(ssim[n][i])) if ssim else None


def write_cell_examples(out: Path, cell_id: str, names: Sequence[str], idx: Sequence[int], images: torch.Tensor,
                        adv: torch.Tensor, clean_edits: torch.Tensor, adv_edits: torch.Tensor,
                        purified_edits: dict[str, torch.Tensor],
                        purified_ssim: dict[str, torch.Tensor]) -> list[str]:
    """Strips for the first PER_CELL images of one cell (global indices `idx`); returns their paths
    relative to `out`. `purified_ssim[name]` holds every image's protection SSIM after that purifier:
    the highest is the editor's best purifier for that photo."""
    written = []
    for i in list(idx)[:PER_CELL]:
        delta = (adv[i] - images[i]).float()
        amplified = 0.5 + delta / (2 * max(float(delta.abs().max()), 1 / 255))
        panels = [images[i], adv[i], amplified, clean_edits[i], adv_edits[i]]
        worst = worst_purifier(purified_ssim, i)
        if worst is not None:
            panels.append(purified_edits[worst][i])
        rel = example_rel(cell_id, names[i])
        atomic_write_bytes(out / rel, strip_png(panels))
        written.append(rel)
    return written
