"""Purifiers that use the editing model itself: DiffPure, GrIDPure and an IMPRESS-style consistency pass.

Why the target's own model: an editor who wants to strip a protection has the model at hand, and
a perturbation crafted against that model is what it would purify; these are the published
purifications the field's strongest negative results use (DESIGN.md, "Purifiers"), each run
through the target's diffusers pipeline or its VAE, deterministically from a seed.
"""
from __future__ import annotations

import torch

from spdbench.budget import quantize_8bit
from spdbench.errors import InputError
from spdbench.purifiers.base import Purifier, register_purifier


def diffpure(images: torch.Tensor, target, strength: float = 0.2, steps: int = 20, seed: int = 0,
             prompt: str = "", guidance: float = 1.0) -> torch.Tensor:
    """DiffPure-style: noise the latents to `strength` of the schedule and denoise with the target's
    own img2img pipeline, by default with an empty prompt and no guidance (no edit intended, only
    purification)."""
    pipe = target.img2img()
    gens = [torch.Generator(device=target.device).manual_seed(seed + i) for i in range(len(images))]
    with torch.no_grad():
        out = pipe(prompt=[prompt] * len(images), image=images.to(target.device, target.dtype), strength=strength,
                   num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt").images
    return out.float().clamp(0, 1).to(images.device)


def _grid_boxes(size: int, patch: int) -> list[int]:
    """Top-left corners along one side: every patch/2 stride, plus the last full patch (GrIDPure's rule)."""
    stride = patch // 2
    starts = list(range(0, size - patch + 1, stride))
    if size - patch not in starts:
        starts.append(size - patch)
    return starts


#: the one GrIDPure geometry implemented (the published one): its settings name it in words
GRID_PATCH, GRID_STRIDE = "half the side", "quarter"


def _require(name: str, value, supported) -> None:
    if value != supported:
        raise InputError(f"{name} must be {supported!r} (the only setting implemented), got {value!r}")


def gridpure(images: torch.Tensor, target, steps: int = 10, rounds: int = 20, gamma: float = 0.1,
             seed: int = 0, patch: str = GRID_PATCH, stride: str = GRID_STRIDE) -> torch.Tensor:
    """GrIDPure (Zhao et al. 2024; ZhengyueZhao/GrIDPure): `rounds` times, cut the image into
    overlapping patches of half its side (256 of 512, stride 128, as published; scaled to the image
    size here) plus one patch assembled from the four corners, purify each with a small DiffPure
    pass (`steps` of 1000 diffusion steps of noise, then denoised), average the overlaps, blend
    with the current image ((1 - gamma) purified + gamma current) and store it as 8 bits.

    Departure: the published code purifies with a pixel-space ImageNet diffusion model; this uses
    the target's latent pipeline (img2img at strength steps/1000 over a 1000-step DDIM schedule,
    i.e. `steps` denoising steps), the model the protection was crafted against.
    """
    _require("gridpure patch", patch, GRID_PATCH)
    _require("gridpure stride", stride, GRID_STRIDE)
    n, c, h, w = images.shape
    ph, pw = h // 2, w // 2
    tops, lefts = _grid_boxes(h, ph), _grid_boxes(w, pw)
    boxes = [(t, l) for t in tops for l in lefts]
    pipe = target.img2img()
    x = quantize_8bit(images.detach().float().cpu())
    for r in range(rounds):
        patches = [x[:, :, t:t + ph, l:l + pw] for t, l in boxes]
        corner = torch.cat([torch.cat([x[:, :, :ph // 2, :pw // 2], x[:, :, :ph // 2, w - pw // 2:]], 3),
                            torch.cat([x[:, :, h - ph // 2:, :pw // 2], x[:, :, h - ph // 2:, w - pw // 2:]], 3)], 2)
        batch = torch.cat(patches + [corner])                           # (len(boxes) + 1) * n patches
        gens = [torch.Generator(device=target.device).manual_seed(seed + 100_000 * r + i) for i in range(len(batch))]
        with torch.no_grad():
            pure = pipe(prompt=[""] * len(batch), image=batch.to(target.device, target.dtype),
                        strength=steps / 1000.0, num_inference_steps=1000, guidance_scale=1.0,
                        generator=gens, output_type="pt").images.float().cpu().clamp(0, 1)
        merged, count = torch.zeros_like(x), torch.zeros_like(x)
        for k, (t, l) in enumerate(boxes):
            merged[:, :, t:t + ph, l:l + pw] += pure[k * n:(k + 1) * n]
            count[:, :, t:t + ph, l:l + pw] += 1
        cp = pure[len(boxes) * n:]
        for (dt, dl), (st, sl) in zip(((0, 0), (0, w - pw // 2), (h - ph // 2, 0), (h - ph // 2, w - pw // 2)),
                                      ((0, 0), (0, pw // 2), (ph // 2, 0), (ph // 2, pw // 2))):
            merged[:, :, dt:dt + ph // 2, dl:dl + pw // 2] += cp[:, :, st:st + ph // 2, sl:sl + pw // 2]
            count[:, :, dt:dt + ph // 2, dl:dl + pw // 2] += 1
        x = quantize_8bit((1 - gamma) * merged / count + gamma * x)
    return x.to(images.device, images.dtype)


def consistency(images: torch.Tensor, target, steps: int = 100, lr: float = 0.01, bound: float = 0.05,
                weight: float = 1.0, closeness: str = "1 - SSIM") -> torch.Tensor:
    """IMPRESS-style consistency purification (Cao et al. 2023): optimize x' so that the VAE round
    trip D(E(x')) reproduces x' (a protected photo is inconsistent under it), while x' stays close to
    the protected photo x: loss = ||D(E(x')) - x'||^2 + weight * max(0, (1 - SSIM(x', x)) - bound),
    Adam, `steps` steps, x' kept on [0, 1]. Both terms are per photo and summed, so the bound holds
    for each photo (a batch mean would let one photo drift while the others stay close) and a
    photo's result does not depend on what else is in its batch.

    Departure: IMPRESS bounds LPIPS, whose network weights cannot be installed offline; SSIM
    (piq, differentiable) takes its place (`closeness` names it). Encoding uses the posterior mean
    (deterministic).
    """
    import piq  # deferred: piq (and torchvision) is slow to import; only this purifier needs it

    _require("consistency closeness", closeness, "1 - SSIM")

    x = images.detach().to(target.device, torch.float32).clamp(0, 1)
    xp = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([xp], lr=lr)
    vae = target.vae
    with torch.enable_grad():
        for _ in range(steps):
            z = vae.encode((xp * 2 - 1).to(target.dtype)).latent_dist.mean
            rec = ((vae.decode(z).sample.float() + 1) / 2)
            cons = (rec - xp).pow(2).flatten(1).mean(1)
            dist = 1 - piq.ssim(xp.clamp(0, 1), x, data_range=1.0, downsample=False, reduction="none")
            loss = (cons + weight * torch.relu(dist - bound)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                xp.clamp_(0, 1)
    return xp.detach().to(images.device, images.dtype)


# --- the built-ins: each called as fn(images, target, **settings), so its record states what ran ---
register_purifier(Purifier("diffpure0.2", "DiffPure t=0.2", diffpure, needs_target=True,
                           settings=dict(strength=0.2, steps=20, prompt="", guidance=1.0, seed=0),
                           description="noise to t=0.2 and denoise with the target's img2img pipeline"))
register_purifier(Purifier("gridpure", "GrIDPure", gridpure, needs_target=True,
                           settings=dict(steps=10, rounds=20, gamma=0.1, patch=GRID_PATCH, stride=GRID_STRIDE, seed=0),
                           description="GrIDPure: 20 rounds of small DiffPure passes on overlapping patches"))
register_purifier(Purifier("impress-ssim", "IMPRESS (SSIM bound)", consistency, needs_target=True,
                           settings=dict(steps=100, lr=0.01, bound=0.05, weight=1.0, closeness="1 - SSIM"),
                           description="IMPRESS-style VAE-consistency optimization, SSIM in place of LPIPS"))
