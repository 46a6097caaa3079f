"""The instructions with an exact result: instruction -> the scikit-image transform that computes it.

Why in the wheel (data/): tiny-ip2p is trained on these transforms (zoo/train_ip2p.py imports them
from here), and the harness scores an instruction edit against the same transform of the clean
photo (scoring/ground_truth.py), so training and scoring cannot drift apart. Each transform maps a
float RGB photo in [0, 1] (HWC, numpy) to its exact result in [0, 1].
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from spdbench.errors import InputError


def _gray(x: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2gray  # deferred: scikit-image imports in seconds; only edits need it

    return np.repeat(rgb2gray(x)[..., None], 3, axis=-1)


def _invert(x: np.ndarray) -> np.ndarray:
    from skimage.util import invert  # deferred: scikit-image imports in seconds; only edits need it

    return invert(x)


def _gamma(gamma: float) -> Callable[[np.ndarray], np.ndarray]:
    def edit(x: np.ndarray) -> np.ndarray:
        from skimage.exposure import adjust_gamma  # deferred: scikit-image imports in seconds

        return adjust_gamma(x, gamma)
    return edit


def _blur(x: np.ndarray) -> np.ndarray:
    from skimage.filters import gaussian  # deferred: scikit-image imports in seconds; only edits need it

    return gaussian(x, sigma=2.0, channel_axis=-1, preserve_range=True)


#: the instructions tiny-ip2p is trained on, each with its exact result (float HWC in [0, 1])
EDITS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "make it black and white": _gray,
    "invert the colors": _invert,
    "make it brighter": _gamma(0.5),
    "make it darker": _gamma(2.0),
    "blur it": _blur,
}


def has_exact_edit(instruction: str) -> bool:
    """True when `instruction` has an exact result (one of `EDITS`)."""
    return instruction in EDITS


def exact_edit(instruction: str, images: torch.Tensor) -> torch.Tensor:
    """The ground-truth result of `instruction` on (N, 3, H, W) images in [0, 1]."""
    if instruction not in EDITS:
        raise InputError(f"instruction {instruction!r} has no exact transform; expected one of {sorted(EDITS)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"images: expected (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    arr = images.detach().cpu().permute(0, 2, 3, 1).double().numpy()
    out = np.stack([EDITS[instruction](a) for a in arr])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(images.dtype).clamp(0.0, 1.0).to(images.device)
