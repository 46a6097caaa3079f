"""What a photo meets when it is shared or cleaned by a stranger: Noisy Upscaling and platform transforms.

Why: Noisy Upscaling (Hönig et al. 2024, "Adversarial perturbations cannot reliably protect artists
from generative AI"; BlurGuard's `purify.sh`) drowns a pixel perturbation in Gaussian noise and lets
an upscaler redraw the detail; a sharing platform rescales to its display size and re-encodes with
4:2:0 chroma subsampling at its own JPEG quality (Sun et al. 2026: the ordinary sharing chain breaks
pixel perturbations). Both run offline (scikit-image, PIL); the diffusion upscaler (the published
Noisy Upscaling) takes a hub id and needs a GPU.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from spdbench.errors import InputError
from spdbench.purifiers.base import Purifier, register_purifier
from spdbench.purifiers.classical import jpeg

#: scikit-image's spline orders by name (skimage.transform.resize `order`)
_ORDERS = {"nearest": 0, "bilinear": 1, "biquadratic": 2, "bicubic": 3, "biquartic": 4, "biquintic": 5}


def _noisy_small(images: torch.Tensor, sigma: float, factor: float, seed: int) -> torch.Tensor:
    """Gaussian noise (std `sigma` on [0, 1], seeded per photo), clipped, then antialiased bicubic
    down by `factor`."""
    if not 0 < factor <= 1:
        raise InputError(f"noisy upscaling factor must be in (0, 1], got {factor!r}")
    x = images.detach().float().cpu().clamp(0, 1)
    noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seed + i))
                         for i in range(len(x))])
    noisy = (x + sigma * noise).clamp(0, 1)
    return F.interpolate(noisy, scale_factor=factor, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def noisy_upscale(images: torch.Tensor, sigma: float = 0.05, factor: float = 0.5, upscaler: str = "bicubic",
                  seed: int = 0) -> torch.Tensor:
    """Noisy Upscaling with a classical upscaler: noise, downscale, then scikit-image's spline
    resize (`upscaler` names the order, "bicubic" = 3, antialiasing off) back to the photo's size."""
    # deferred: skimage.transform pulls in scipy (seconds); only these purifiers need it
    from skimage.transform import resize as sk_resize

    if upscaler not in _ORDERS:
        raise InputError(f"noisy upscaling upscaler must be one of {', '.join(_ORDERS)}, got {upscaler!r}")
    small = _noisy_small(images, sigma, factor, seed)
    h, w = images.shape[-2:]
    out = [sk_resize(img.permute(1, 2, 0).numpy().astype(np.float64), (h, w), order=_ORDERS[upscaler],
                     anti_aliasing=False, mode="reflect") for img in small]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(images.device, images.dtype).clamp(0, 1)


def noisy_upscale_diffusion(images: torch.Tensor, sigma: float = 0.05, upscaler: str = "stabilityai/stable-diffusion-x4-upscaler",
                            steps: int = 20, noise_level: int = 20, seed: int = 0, prompt: str = "") -> torch.Tensor:
    """The published Noisy Upscaling: noise, downscale by 4, then the x4 Stable Diffusion upscaler
    (`upscaler`: a hub id or folder, loaded by diffusers like every hub model; a GPU)."""
    # deferred: diffusers (seconds) and a 3 GB download; only this purifier needs them
    from diffusers import StableDiffusionUpscalePipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionUpscalePipeline.from_pretrained(upscaler, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    small = _noisy_small(images, sigma, 0.25, seed)
    gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(len(small))]
    with torch.no_grad():
        out = pipe(prompt=[prompt] * len(small), image=small.to(device, dtype), num_inference_steps=steps,
                   noise_level=noise_level, generator=gens, output_type="pt").images.float()
    out = F.interpolate(out, size=images.shape[-2:], mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0, 1).to(images.device, images.dtype)


def platform(images: torch.Tensor, display: int = 96, quality: int = 80, subsampling: str = "4:2:0") -> torch.Tensor:
    """A sharing platform's chain: downscale so the long side is `display` px (antialiased bicubic,
    never up), JPEG at `quality` with `subsampling` chroma (PIL), then back to the photo's size for
    the editor (the recipient's viewer upsamples what it was served)."""
    if not isinstance(display, int) or display < 8:
        raise InputError(f"platform display size must be an integer >= 8 px, got {display!r}")
    h, w = images.shape[-2:]
    scale = min(1.0, display / max(h, w))
    small = images.detach().float().clamp(0, 1)
    if scale < 1.0:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        small = F.interpolate(small, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    served = jpeg(small, quality=quality, subsampling=subsampling)
    out = F.interpolate(served, size=(h, w), mode="bicubic", align_corners=False) if scale < 1.0 else served
    return out.clamp(0, 1).to(images.device, images.dtype)


# --- the built-ins: each called as fn(images, **settings), so its record states what ran ----------
register_purifier(Purifier("noisy-upscale", "Noisy Upscaling (bicubic)", noisy_upscale,
                           settings=dict(sigma=0.05, factor=0.5, upscaler="bicubic", seed=0),
                           description="Gaussian noise σ0.05, bicubic down 0.5x, scikit-image bicubic upscaler"))
register_purifier(Purifier("noisy-upscale-sd-x4", "Noisy Upscaling (SD x4)", noisy_upscale_diffusion,
                           settings=dict(sigma=0.05, upscaler="stabilityai/stable-diffusion-x4-upscaler", steps=20,
                                         noise_level=20, seed=0, prompt=""),
                           description="Gaussian noise σ0.05, down 4x, Stable Diffusion x4 upscaler (hub id; a GPU)"))
register_purifier(Purifier("platform", "platform share (96 px, 4:2:0, q80)", platform,
                           settings=dict(display=96, quality=80, subsampling="4:2:0"),
                           description="downscale to a 96 px display size, JPEG q80 with 4:2:0 chroma, back up"))
