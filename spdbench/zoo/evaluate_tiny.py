"""Held-out figures of a tiny target: VAE reconstruction PSNR and img2img SSIM vs strength.

Why: the trained tiny target stands in for SD1.5 only if (a) its VAE reconstructs unseen photos
about as well as a plain x8 bicubic down/up, and (b) img2img edits stay close to the input at low
strength and move away as strength grows. Held-out = the bundled *test* split (never trained on),
each photo centre-resized to 256x256 and cut into 4 quadrants of 128x128 = 16 images.

Run: ``python -m spdbench.targets.evaluate_tiny [FOLDER] [--probe]`` (default: the shipped
"tiny"; ``--probe`` prints the per-timestep denoising probe instead).
"""
from __future__ import annotations

import json
import math
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..data import load_photos

PROMPT = "add some snow"
STRENGTHS = (0.3, 0.5, 0.8)
PROBE_T = (20, 100, 200, 300, 500)


def heldout_crops(n_photos: Optional[int] = None) -> torch.Tensor:
    """(4 * photos, 3, 128, 128): quadrants of the 256x256 test-split photos."""
    photos = load_photos(size=256, split="test")
    if n_photos is not None:
        photos = photos[:n_photos]
    quads = [photos[:, :, i:i + 128, j:j + 128] for i in (0, 128) for j in (0, 128)]
    return torch.stack(quads, 1).reshape(-1, 3, 128, 128).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for [0, 1] images."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10.0 * torch.log10(1.0 / mse)


def bicubic_x8(x: torch.Tensor) -> torch.Tensor:
    """The x8 down/up baseline a latent-x8 autoencoder should match."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(h // 8, w // 8), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (piq, no downsampling: 128 px images would be halved otherwise)."""
    import piq

    return piq.ssim(a.clamp(0, 1), b.clamp(0, 1), data_range=1.0, downsample=False, reduction="none")


@torch.no_grad()
def reconstruction(target, x: torch.Tensor) -> dict:
    rec = target.reconstruct(x)
    bic = bicubic_x8(x)
    return dict(psnr_vae=float(psnr(rec, x).mean()), psnr_bicubic_x8=float(psnr(bic, x).mean()),
                ssim_vae=float(ssim(rec, x).mean()), ssim_bicubic_x8=float(ssim(bic, x).mean()))


@torch.no_grad()
def img2img_ssim(target, x: torch.Tensor, strengths: Sequence[float] = STRENGTHS, prompt: str = PROMPT,
                 steps: int = 20, guidance: float = 7.5, seed: int = 0) -> dict:
    """Mean SSIM(edit(x), x) per strength; image i uses torch.Generator seed `seed + i`."""
    pipe = target.img2img()
    out = {}
    for s in strengths:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(x))]
        edits = pipe(prompt=[prompt] * len(x), image=x, strength=s, num_inference_steps=steps,
                     guidance_scale=guidance, generator=gens, output_type="pt").images
        v = ssim(edits.float().cpu(), x)
        out[f"{s:g}"] = dict(mean=float(v.mean()), std=float(v.std()))
    return out


@torch.no_grad()
def denoise_probe(target, x: torch.Tensor, timesteps: Sequence[int] = PROBE_T, prompt: str = PROMPT,
                  seed: int = 1) -> dict:
    """Per timestep t: one UNet call on the clean latent noised to t, its x0 estimate, decoded.

    Why: tells whether img2img fidelity is limited by the denoiser (x0 error at the start of the
    edit) or by the later steps; at strength s the edit starts near t = 1000 s.
    """
    z0 = target.encode(x).latents  # scaled posterior means, on the target's device and dtype
    emb = target.encode_prompt([prompt] * len(x))
    abar = target.scheduler.alphas_cumprod
    out = {}
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0.device, z0.dtype)
        a = float(abar[t])
        zt = a ** 0.5 * z0 + (1 - a) ** 0.5 * noise
        eps = target.unet(zt, torch.full((len(x),), t, device=z0.device), encoder_hidden_states=emb).sample
        x0 = (zt - (1 - a) ** 0.5 * eps) / a ** 0.5
        dec = target.decode(x0).cpu()
        out[str(t)] = dict(alpha_bar=a, eps_mse=float((eps - noise).pow(2).mean()),
                           x0_mse=float((x0 - z0).pow(2).mean()), ssim=float(ssim(dec, x.cpu()).mean()))
    return out


def evaluate(target, n_photos: Optional[int] = None) -> dict:
    """All held-out figures as a JSON-able dict."""
    x = heldout_crops(n_photos)
    return dict(
        images=f"{len(x)} crops 128x128 (quadrants of the 256x256 bundled test-split photos)",
        reconstruction=reconstruction(target, x),
        img2img=dict(prompt=PROMPT, steps=20, guidance=7.5, seeds="torch.Generator(i) per image",
                     ssim_to_input=img2img_ssim(target, x)),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import load_target

    argv = list(sys.argv[1:] if argv is None else argv)
    probe = "--probe" in argv
    argv = [a for a in argv if a != "--probe"]
    target = load_target(argv[0] if argv else "tiny")
    if probe:
        print(json.dumps(denoise_probe(target, heldout_crops()), indent=1))
    else:
        print(json.dumps(evaluate(target), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
