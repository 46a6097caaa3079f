"""Classical purifiers: what any photo passes through (JPEG, resizing) or any editor can apply.

A protection that survives only until someone saves the photo as JPEG is not a protection. Each
maps images (N, 3, H, W) on [0, 1] to images of the same shape; the registry (`builtin.py`) names
them with their settings.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


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


def tv_denoise(images: torch.Tensor, weight: float = 0.05) -> torch.Tensor:
    """Total-variation denoising (scikit-image's Chambolle solver, per image, colour channels jointly):
    the classical edge-preserving denoiser, which flattens high-frequency perturbations."""
    from skimage.restoration import denoise_tv_chambolle

    out = []
    for img in images:
        arr = img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float64)
        out.append(torch.from_numpy(denoise_tv_chambolle(arr, weight=weight, channel_axis=-1).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(images.device, images.dtype).clamp(0, 1)

