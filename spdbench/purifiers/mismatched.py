"""Mismatched-editor purification: the photo passes through ANOTHER model before the suite's editor.

Why: the strongest published evidence against immunization is "purify once, edit freely" -- a
photo restored by a model the protection was not crafted against (a VAE round trip, VAE-Trans;
or low-strength img2img with another checkpoint, EditorClean) edits almost as the clean photo
does (+3-6 dB PSNR of the edit). The model is named by the purifier (`Purifier.model`), loaded by
the harness through the one loading door (`load_target`) and recorded with its fingerprint; on
the offline zoo it is `tiny-b` (trained apart from `tiny`: other seed, other half of the photos),
on a GPU any hub id or folder (`mismatched_editor("CompVis/stable-diffusion-v1-4")`).
"""
from __future__ import annotations

import torch

from spdbench.purifiers.base import Purifier, register_purifier
from spdbench.purifiers.diffusion import diffpure

#: the offline zoo's mismatched model
OFFLINE_MODEL = "tiny-b"


def vae_round_trip(images: torch.Tensor, target, model: str = OFFLINE_MODEL) -> torch.Tensor:
    """Encode with the other model's VAE (posterior mean, deterministic) and decode (VAE-Trans).
    `model` is recorded; the harness passes that model as `target` (Purifier checks it)."""
    with torch.no_grad():
        return target.reconstruct(images.detach().float().clamp(0, 1)).to(images.device, images.dtype)


def img2img_round_trip(images: torch.Tensor, target, model: str = OFFLINE_MODEL, strength: float = 0.2,
                       steps: int = 20, seed: int = 0, prompt: str = "", guidance: float = 1.0) -> torch.Tensor:
    """Low-strength img2img with the other model, empty prompt, no guidance (EditorClean's
    restoration pass): DiffPure with a model the protection never saw."""
    return diffpure(images, target, strength=strength, steps=steps, seed=seed, prompt=prompt, guidance=guidance)


def mismatched_editor(model: str, mode: str = "img2img", strength: float = 0.2, steps: int = 20,
                      seed: int = 0) -> Purifier:
    """A mismatched-editor purifier for any model (a hub id or folder on a GPU), named
    "swap-<mode>:<model>": register it (`register_purifier`) or ship it as a plugin to score with it."""
    if mode == "vae":
        return Purifier(f"swap-vae:{model}", f"VAE round trip ({model})", vae_round_trip, needs_target=True,
                        settings=dict(model=model), model=model,
                        description=f"round trip through {model}'s VAE before editing (VAE-Trans)")
    if mode == "img2img":
        return Purifier(f"swap-img2img:{model}", f"img2img t={strength} ({model})", img2img_round_trip,
                        needs_target=True, model=model,
                        settings=dict(model=model, strength=strength, steps=steps, seed=seed, prompt="", guidance=1.0),
                        description=f"low-strength img2img with {model} before editing (EditorClean)")
    raise ValueError(f"mismatched_editor mode must be 'vae' or 'img2img', got {mode!r}")


# --- the built-ins on the offline zoo ------------------------------------------------------------
register_purifier(Purifier("swap-vae-tiny-b", "VAE round trip (tiny-b)", vae_round_trip, needs_target=True,
                           settings=dict(model=OFFLINE_MODEL), model=OFFLINE_MODEL,
                           description="round trip through tiny-b's VAE (trained apart) before editing (VAE-Trans)"))
register_purifier(Purifier("swap-img2img-tiny-b", "img2img t=0.2 (tiny-b)", img2img_round_trip, needs_target=True,
                           settings=dict(model=OFFLINE_MODEL, strength=0.2, steps=20, seed=0, prompt="", guidance=1.0),
                           model=OFFLINE_MODEL,
                           description="img2img at strength 0.2 with tiny-b (trained apart) before editing (EditorClean)"))
