"""Differentiable stand-ins for purifiers: adaptive attacks by expectation over transformation.

Why: a protection crafted for the raw photo can be undone by the first JPEG save; an attacker who
expects that optimizes the objective *after* the transformation (EOT, Athalye et al. 2018). Any
`GradientAttack` takes `robust_to=[names]`; each step then averages its objective over these
differentiable versions of the named purifiers, applied to the protected image:

- `jpegQ`: the real codec (the `jpegQ` purifier, PIL) forward, identity backward (BPDA, Athalye et
  al. 2018): the attack sees exactly what the purifier will do and follows the gradient at its output;
- `djpegQ`: kornia's differentiable JPEG approximation (`jpeg_codec_differentiable`: YCbCr 4:2:0,
  DCT, quality-Q tables, a cubic rounding surrogate). Measured on the tiny target (photoguard-encoder,
  8 photos at 64 px, 16/255, 60 steps; objective after PIL JPEG q75, lower = stronger): plain 1719,
  `jpeg75` (BPDA) 1728, `djpeg75` 1891 -- the surrogate's gradient steers worse, so BPDA is the default;
- `resizeF`, `blurS`: the purifiers themselves (plain tensor ops, differentiable as they are);
- `noiseS`: Gaussian noise of std S (a transformation only: not a purifier), drawn from the
  attack's generator so a run is deterministic.

Purifiers without a differentiable version here (TV, the diffusion purifiers) are refused by name.
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import torch

from spdbench.errors import InputError
from spdbench.purifiers.classical import gaussian_blur, jpeg, resize

Transform = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]


def _jpeg(quality: float) -> Transform:
    def apply(x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
        # deferred: kornia is slow to import; only the JPEG stand-in needs it
        from kornia.enhance import jpeg_codec_differentiable

        q = torch.full((x.shape[0],), float(quality), device=x.device, dtype=x.dtype)
        return jpeg_codec_differentiable(x.clamp(0, 1), q)
    return apply


def _jpeg_bpda(quality: float) -> Transform:
    def apply(x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
        return x + (jpeg(x.detach(), int(quality)).to(x.dtype) - x).detach()
    return apply


def _noise(std: float) -> Transform:
    def apply(x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
        gen = g if g is not None and g.device == x.device else None
        n = torch.randn(x.shape, generator=gen, device=x.device if gen is not None else "cpu").to(x.device, x.dtype)
        return (x + std * n).clamp(0, 1)
    return apply


_PATTERNS: list[tuple[str, Callable[[float], Transform]]] = [
    (r"jpeg(\d+)", _jpeg_bpda),
    (r"djpeg(\d+)", _jpeg),
    (r"resize(\d*\.?\d+)", lambda f: (lambda x, g: resize(x, f))),
    (r"blur(\d*\.?\d+)", lambda s: (lambda x, g: gaussian_blur(x, s))),
    (r"noise(\d*\.?\d+)", _noise),
]
SUPPORTED = "jpegQ (e.g. jpeg75), djpegQ, resizeF (resize0.5), blurS (blur1), noiseS (noise0.03)"


def transform(name: str) -> Transform:
    """The differentiable transformation for `name`; an unsupported name is one clear error."""
    for pattern, make in _PATTERNS:
        m = re.fullmatch(pattern, str(name))
        if m:
            value = float(m.group(1))
            if "jpeg" in pattern and not 1 <= value <= 100:
                break
            return make(value)
    raise InputError(f"robust_to: {name!r} has no differentiable version; expected some of {SUPPORTED}")


def check_robust_to(names) -> tuple[str, ...]:
    """`robust_to` as a tuple of supported names (a bare string is one name)."""
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, (list, tuple)):
        raise InputError(f"robust_to must be a list of purifier names, got {names!r}")
    for n in names:
        transform(n)
    return tuple(names)


def expectation(loss: Callable[[torch.Tensor], torch.Tensor], adv: torch.Tensor, names: Sequence[str],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Mean over the named transformations T of loss(T(adv)) (per image, (N,))."""
    values = [loss(transform(n)(adv, generator)) for n in names]
    return torch.stack(values).mean(0)
