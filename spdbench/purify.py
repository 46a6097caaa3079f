"""Purifiers: the simplest counter-measures an editor could apply before editing a protected photo.

A protection that survives only until someone saves the photo as JPEG is not a protection. Each
purifier maps protected images (N,3,H,W) in [0,1] to purified images of the same shape; the
harness then scores protection after purification ("protection after JPEG", ...).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import UnknownNameError, did_you_mean


def jpeg(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """Re-encode as JPEG (PIL, 4:2:0 subsampling as most software saves)."""
    out = []
    for img in images:
        arr = (img.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out.append(torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()))
    return (torch.stack(out).permute(0, 3, 1, 2).float() / 255).to(images.device)


def resize(images: torch.Tensor, factor: float = 0.5) -> torch.Tensor:
    """Downscale by `factor` (antialiased bicubic) and back up to the original size."""
    h, w = images.shape[-2:]
    small = F.interpolate(images, scale_factor=factor, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def gaussian_blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur, kernel radius 3 sigma, reflect padding."""
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    c = images.shape[1]
    pad = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(pad, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out.clamp(0, 1)


def diffpure(images: torch.Tensor, target, strength: float = 0.2, steps: int = 20, seed: int = 0) -> torch.Tensor:
    """DiffPure-style: noise the latents to `strength` of the schedule and denoise with the target's
    own img2img pipeline and an empty prompt (no edit intended, only purification)."""
    pipe = target.img2img()
    gens = [torch.Generator(device=target.device).manual_seed(seed + i) for i in range(len(images))]
    with torch.no_grad():
        out = pipe(prompt=[""] * len(images), image=images.to(target.device, target.dtype), strength=strength,
                   num_inference_steps=steps, guidance_scale=1.0, generator=gens, output_type="pt").images
    return out.float().clamp(0, 1)


@dataclass(frozen=True)
class Purifier:
    name: str
    label: str
    fn: Callable[..., torch.Tensor]
    needs_target: bool = False

    def __call__(self, images: torch.Tensor, target=None) -> torch.Tensor:
        return self.fn(images, target) if self.needs_target else self.fn(images)


PURIFIERS: dict[str, Purifier] = {
    "jpeg75": Purifier("jpeg75", "JPEG q75", lambda x: jpeg(x, 75)),
    "resize0.5": Purifier("resize0.5", "resize 0.5x", lambda x: resize(x, 0.5)),
    "blur1": Purifier("blur1", "Gaussian blur σ1", lambda x: gaussian_blur(x, 1.0)),
    "diffpure0.2": Purifier("diffpure0.2", "DiffPure t=0.2", lambda x, t: diffpure(x, t, 0.2), needs_target=True),
}


def get_purifier(name: str) -> Purifier:
    if name not in PURIFIERS:
        raise UnknownNameError(f"unknown purifier {name!r}.{did_you_mean(name, PURIFIERS)} "
                               f"Available: {', '.join(PURIFIERS)}")
    return PURIFIERS[name]
