"""The one image contract of spdbench, checked in one place.

Images are float tensors in [0, 1] with shape (N, 3, H, W), RGB. Errors name the argument, what was
expected and what was received, so nobody has to read a traceback from inside torch.
"""
from __future__ import annotations

import hashlib

import torch

from spdbench.errors import InputError


def check_images(images, name: str = "images", *, allow_batchless: bool = False) -> torch.Tensor:
    """Validate the image contract and return the tensor unchanged (raises InputError)."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape (N, 3, H, W), got {type(images).__name__}")
    if images.dim() == 3 and allow_batchless:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise InputError(f"{name} must have shape (N, 3, H, W), got shape {tuple(images.shape)}")
    channels = images.shape[1]
    if channels != 3:
        hint = {1: " (greyscale: repeat it to 3 channels)", 4: " (RGBA: drop the alpha channel)"}.get(channels, "")
        if images.shape[-1] in (1, 3, 4) and channels not in (1, 4):
            hint = " (channels-last HWC layout? use images.permute(0, 3, 1, 2))"
        raise InputError(f"{name} must have 3 RGB channels in dim 1, got shape {tuple(images.shape)}{hint}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise InputError(f"{name} is empty: shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InputError(
            f"{name} must be a float tensor in [0, 1], got dtype {images.dtype}"
            f" (for uint8 photos use images.float() / 255)"
        )
    if not bool(torch.isfinite(images).all()):
        raise InputError(f"{name} contains NaN or Inf values")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        hint = " (looks like 0..255: divide by 255)" if hi > 1.5 else ""
        hint = " (looks like [-1, 1]: use (images + 1) / 2)" if lo < -0.01 and hi <= 1.0 else hint
        raise InputError(f"{name} must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")
    return images


def image_sha256(image: torch.Tensor) -> str:
    """The hash that names one clean image in records: sha256 of its 8-bit bytes (the photos are
    8-bit, so this is exact; the harness and the submission checks share it)."""
    data = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()
