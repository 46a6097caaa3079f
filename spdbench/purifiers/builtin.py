"""The built-in purifiers, each with the settings it runs at (recorded with every suite that names it)."""
from __future__ import annotations

from spdbench.purifiers.base import Purifier, register_purifier
from spdbench.purifiers.classical import gaussian_blur, jpeg, resize, tv_denoise
from spdbench.purifiers.diffusion import consistency, diffpure, gridpure


def _jpeg(q: int) -> Purifier:
    return Purifier(f"jpeg{q}", f"JPEG q{q}", lambda x: jpeg(x, q), settings=dict(quality=q, subsampling="4:2:0"),
                    description=f"re-encode as JPEG at quality {q} (PIL)")


for _q in (70, 75, 90):
    register_purifier(_jpeg(_q))
register_purifier(Purifier("resize0.5", "resize 0.5x", lambda x: resize(x, 0.5), settings=dict(factor=0.5),
                           description="bicubic down to half size (antialiased) and back"))
register_purifier(Purifier("blur1", "Gaussian blur σ1", lambda x: gaussian_blur(x, 1.0), settings=dict(sigma=1.0),
                           description="separable Gaussian blur, radius 3 sigma"))
register_purifier(Purifier("tv0.05", "TV denoise 0.05", lambda x: tv_denoise(x, 0.05), settings=dict(weight=0.05),
                           description="total-variation denoising, scikit-image denoise_tv_chambolle"))
register_purifier(Purifier("diffpure0.2", "DiffPure t=0.2", lambda x, t: diffpure(x, t, 0.2), needs_target=True,
                           settings=dict(strength=0.2, steps=20, prompt="", guidance=1.0, seed=0),
                           description="noise to t=0.2 and denoise with the target's img2img pipeline"))
register_purifier(Purifier("gridpure", "GrIDPure", lambda x, t: gridpure(x, t), needs_target=True,
                           settings=dict(steps=10, rounds=20, gamma=0.1, patch="half the side", stride="quarter",
                                         seed=0),
                           description="GrIDPure: 20 rounds of small DiffPure passes on overlapping patches"))
register_purifier(Purifier("impress-ssim", "IMPRESS (SSIM bound)", lambda x, t: consistency(x, t), needs_target=True,
                           settings=dict(steps=100, lr=0.01, bound=0.05, weight=1.0, closeness="1 - SSIM"),
                           description="IMPRESS-style VAE-consistency optimization, SSIM in place of LPIPS"))
