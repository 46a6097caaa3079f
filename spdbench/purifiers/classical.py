"""Classical purifiers: what any photo passes through (JPEG, resizing) or any editor can apply.

A protection that survives only until someone saves the photo as JPEG is not a protection. Each
maps images (N, 3, H, W) on [0, 1] to images of the same shape; the registrations at the end name
them with the settings they are called with (the keyword arguments a record states).
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spdbench.purifiers.base import Purifier, register_purifier


def jpeg(images: torch.Tensor, quality: int = 75, subsampling: str = "4:2:0") -> torch.Tensor:
    """Re-encode as JPEG (PIL; chroma `subsampling` "4:2:0" as most software saves, "4:2:2" or "4:4:4")."""
    out = []
    for img in images:
        arr = (img.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
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


def tv_denoise(images: torch.Tensor, weight: float = 0.05) -> torch.Tensor:
    """Total-variation denoising (scikit-image's Chambolle solver, per image, colour channels jointly):
    the classical edge-preserving denoiser, which flattens high-frequency perturbations."""
    # deferred: skimage.restoration pulls in scipy (seconds); only this purifier needs it
    from skimage.restoration import denoise_tv_chambolle

    out = []
    for img in images:
        arr = img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float64)
        out.append(torch.from_numpy(denoise_tv_chambolle(arr, weight=weight, channel_axis=-1).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(images.device, images.dtype).clamp(0, 1)



# --- the built-ins: each called as fn(images, **settings), so its record states what ran ----------
for _q in (70, 75, 90):
    register_purifier(Purifier(f"jpeg{_q}", f"JPEG q{_q}", jpeg, settings=dict(quality=_q, subsampling="4:2:0"),
                               description=f"re-encode as JPEG at quality {_q} (PIL)"))
register_purifier(Purifier("resize0.5", "resize 0.5x", resize, settings=dict(factor=0.5),
                           description="bicubic down to half size (antialiased) and back"))
register_purifier(Purifier("blur1", "Gaussian blur σ1", gaussian_blur, settings=dict(sigma=1.0),
                           description="separable Gaussian blur, radius 3 sigma"))
register_purifier(Purifier("tv0.05", "TV denoise 0.05", tv_denoise, settings=dict(weight=0.05),
                           description="total-variation denoising, scikit-image denoise_tv_chambolle"))
