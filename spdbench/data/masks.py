"""Inpainting masks: boxes and free-form brush strokes, drawn only from a torch.Generator.

Why one module: the inpainting target is trained on these masks and the inpainting suites edit
with them; a second copy would let the two drift. A mask is (N, 1, H, W) float32 with 1 where
the editor repaints and 0 where it keeps the photo (diffusers' convention: white = repaint).
Strokes are drawn with scikit-image (`skimage.draw`), not by hand.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from skimage.draw import disk, ellipse, line, polygon

from spdbench.errors import InputError

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


# --- masks as data: one per photo, named like it ------------------------------------------------
#: the deterministic mask sets every photo has (issue 20): a centre box, and free-form strokes
#: seeded by the photo's name (so a photo keeps its mask when others are added)
MASK_SETS = ("centre-box", "strokes", "subject")
#: the subject-keeping set: one hand-drawn PNG per bundled photo (white = repaint the surroundings,
#: black = keep the subject), drawn from shapes.json beside them (`draw_subject_masks`)
SUBJECT_DIR = Path(__file__).parent / "mask_assets" / "subject"


def _name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") & 0x7FFFFFFF


def centre_box(size: int, frac: float = 0.5) -> torch.Tensor:
    """(1, size, size): the centred square of side `frac` * size to repaint."""
    side = round(size * frac)
    lo = (size - side) // 2
    m = torch.zeros(1, size, size)
    m[:, lo:lo + side, lo:lo + side] = 1.0
    return m


def draw_subject_mask(shape: dict, size: int) -> torch.Tensor:
    """(1, size, size) from one hand-drawn outline of shapes.json: 0 inside (the kept subject), 1 outside."""
    keep = np.zeros((size, size), dtype=bool)
    if "polygon" in shape:
        pts = np.asarray(shape["polygon"], dtype=np.float64) * size
        rr, cc = polygon(pts[:, 1], pts[:, 0], shape=keep.shape)
    else:
        cx, cy, rx, ry = (v * size for v in shape["ellipse"])
        rr, cc = ellipse(cy, cx, ry, rx, shape=keep.shape)
    keep[rr, cc] = True
    return torch.from_numpy(~keep).float()[None]


def subject_masks(names: Sequence[str], size: int) -> torch.Tensor:
    """The shipped subject-keeping PNGs of the named bundled photos, at `size` (nearest: still {0, 1})."""
    missing = [n for n in names if not (SUBJECT_DIR / f"{n}.png").is_file()]
    if missing:
        raise ValueError(f"the subject mask set covers the bundled photos only; no mask for {missing[:5]} "
                         "(pass your own with --masks DIR)")
    out = []
    for n in names:
        with Image.open(SUBJECT_DIR / f"{n}.png") as im:
            arr = np.asarray(im.convert("L").resize((size, size), Image.NEAREST))
        out.append(torch.from_numpy((arr >= 128).astype(np.float32))[None])
    return torch.stack(out)


def draw_subject_pngs(folder: Path = SUBJECT_DIR) -> list:
    """Write NAME.png for every outline of folder/shapes.json, at the file's size (how the shipped
    PNGs were made; a test checks they still match)."""
    spec = json.loads((folder / "shapes.json").read_text())
    names = sorted(spec["shapes"])
    masks = torch.stack([draw_subject_mask(spec["shapes"][n], spec["size"]) for n in names])
    return save_masks(masks, names, folder)


def mask_set(kind: str, names: Sequence[str], size: int) -> torch.Tensor:
    """(N, 1, size, size): the `kind` mask of each named photo (see MASK_SETS)."""
    if kind == "centre-box":
        return torch.stack([centre_box(size) for _ in names])
    if kind == "strokes":
        return torch.stack([stroke_mask(size, torch.Generator().manual_seed(_name_seed(n))) for n in names])
    if kind == "subject":
        return subject_masks(names, size)
    raise ValueError(f"mask set {kind!r}: expected one of {list(MASK_SETS)} or a folder of PNGs (--masks DIR)")


def save_masks(masks: torch.Tensor, names: Sequence[str], folder) -> list:
    """One 8-bit greyscale PNG per photo, `NAME.png`, white (255) = repaint, black (0) = keep."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for m, n in zip(masks, names):
        arr = (m[0].detach().cpu().numpy() >= 0.5).astype(np.uint8) * 255
        Image.fromarray(arr, mode="L").save(folder / f"{n}.png")
        paths.append(folder / f"{n}.png")
    return paths


def load_masks(folder, names: Sequence[str], size: int) -> torch.Tensor:
    """(N, 1, size, size) from `folder/NAME.png` for each photo name; white (>= 128) = repaint.

    A mask must exist for every photo, be exactly size x size (masks are data: they are not resized
    behind the user's back) and contain both values; any problem is one line naming the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--masks {str(folder)!r}: not a folder (expected one PNG per photo, NAME.png)")
    missing = [n for n in names if not (folder / f"{n}.png").is_file()]
    if missing:
        have = sorted(p.stem for p in folder.glob("*.png"))[:5]
        raise InputError(f"--masks {str(folder)!r}: no mask for photo(s) {missing[:5]} (expected NAME.png per photo; "
                         f"found {have or 'none'})")
    out = []
    for n in names:
        path = folder / f"{n}.png"
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L"))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear line
            raise InputError(f"--masks: {path} is not a readable image ({type(exc).__name__})") from None
        if arr.shape != (size, size):
            raise InputError(f"--masks: {path} is {arr.shape[1]}x{arr.shape[0]}, the suite's photos are {size}x{size}")
        m = torch.from_numpy((arr >= 128).astype(np.float32))[None]
        if float(m.sum()) == 0 or float(m.sum()) == m.numel():
            what = "nothing" if float(m.sum()) == 0 else "everything"
            raise InputError(f"--masks: {path} repaints {what}; a mask needs white (repaint) and black (keep) pixels")
        out.append(m)
    return torch.stack(out)


def mask_sha256(mask: torch.Tensor) -> str:
    """The hash that names one mask in records: sha256 of its {0, 1} bytes."""
    return hashlib.sha256((mask.detach().cpu() >= 0.5).to(torch.uint8).numpy().tobytes()).hexdigest()
