"""Mask-aware scores for inpainting: SSIM and PSNR over one region of each image.

Why a second scorer: on an inpainting edit the two regions answer different questions. The
*regenerated* region (mask 1) is where a protection must spoil the edit; the *kept* region (mask 0)
is the photo the owner keeps, where the perturbation must stay invisible. Whole-image numbers mix
them (a box over a quarter of the photo dilutes a destroyed hole by the untouched rest).

- PSNR: the MSE over the region's pixels (all channels), 10 log10(1 / MSE).
- SSIM: the local SSIM map (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03: piq's and Wang et
  al.'s constants) from kornia, computed without padding and averaged over the window centres
  that fall in the region. Over the whole image this equals piq's SSIM (tests/test_inpainting.py).
VIFp and FSIM pool over wavelet scales and phase-congruency maps of the whole image; they have no
per-pixel map to restrict, so the region scores are SSIM and PSNR only (the records say so).
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

REGION_METRICS = ("ssim", "psnr")
WINDOW = 11


def _check(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"region scores need two (N, C, H, W) batches of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if tuple(region.shape) != (x.shape[0], 1, *x.shape[2:]):
        raise ValueError(f"region: expected shape {(x.shape[0], 1, *x.shape[2:])}, got {tuple(region.shape)}")


def region_psnr(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(N,) PSNR in dB over the pixels where `region` is 1 (images on [0, 1]); NaN for an empty region."""
    _check(x, y, region)
    w = region.to(x.dtype).expand_as(x)
    count = w.flatten(1).sum(1)
    mse = ((x.float() - y.float()).pow(2) * w).flatten(1).sum(1) / count.clamp(min=1)
    out = 10 * torch.log10(1.0 / mse.clamp(min=1e-10))
    return torch.where(count > 0, out, torch.full_like(out, float("nan")))


def region_ssim(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(N,) mean of the SSIM map over the window centres inside `region`; NaN for an empty region."""
    import kornia  # deferred: kornia is slow to import; only region SSIM needs it

    _check(x, y, region)
    smap = kornia.metrics.ssim(x.float(), y.float(), WINDOW, max_val=1.0, padding="valid").mean(1)  # (N, H-10, W-10)
    r = WINDOW // 2
    w = region[:, 0, r:-r, r:-r].to(smap.dtype)
    count = w.flatten(1).sum(1)
    out = (smap * w).flatten(1).sum(1) / count.clamp(min=1)
    return torch.where(count > 0, out, torch.full_like(out, float("nan")))


@torch.no_grad()
def score_region(distorted: Mapping[str, torch.Tensor], reference: torch.Tensor,
                 region: torch.Tensor) -> Dict[str, Dict[str, torch.Tensor]]:
    """{key: {"ssim": (N,), "psnr": (N,)}} of each distorted batch against `reference` on `region`."""
    region = region.to(reference.device)
    fns = {"ssim": region_ssim, "psnr": region_psnr}
    return {k: {m: fns[m](v, reference, region).cpu() for m in REGION_METRICS} for k, v in distorted.items()}
