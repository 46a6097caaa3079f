"""Instruction editing (InstructPix2Pix): the 8-channel UNet, its exact-edit instructions, its editor.

Why here (the loading door): InstructPix2Pix is Stable Diffusion 1.5 whose UNet takes 8 input
channels (the noisy latent, then the *unscaled* VAE-latent mode of the input image), driven by
diffusers' `StableDiffusionInstructPix2PixPipeline` with two guidance scales. The zoo trains
`tiny-ip2p` from the same widening, and the evaluation needs the same instructions and exact
transforms the model was trained on, so both live with the loader.

`EDITS` / `exact_edit` (re-exported from spdbench.data.instructions, where they live so that the
zoo's training and the harness's scoring share them): instruction -> the transform scikit-image
computes exactly. These are what makes edit success measurable against ground truth offline.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from spdbench.data.instructions import EDITS, exact_edit
from spdbench.errors import InputError, TargetLoadError
from spdbench.targets.base import Target

__all__ = ["IP2P_HUB_ID", "IP2P_REVISION", "EDITS", "exact_edit", "ip2p_unet_from", "is_instruct", "instruct_pipeline", "InstructSettings",
           "instruct_edit", "load_tiny_ip2p", "save_instruct_folder"]

#: InstructPix2Pix on the hub (Brooks et al., CVPR 2023): SD1.5 with an 8-channel UNet, the
#: layout `save_instruct_folder` writes; loaded at IP2P_REVISION (a branch: no commit hash confirmed offline)
IP2P_HUB_ID = "timbrooks/instruct-pix2pix"
IP2P_REVISION = "main"
#: image guidance and text guidance as diffusers' pipeline defaults them (recorded with every edit)
DEFAULT_IMAGE_GUIDANCE = 1.5
DEFAULT_TEXT_GUIDANCE = 7.5
IP2P_IN_CHANNELS = 8


def ip2p_unet_from(unet):
    """An 8-input-channel copy of `unet`: weights copied, conv_in's 4 image channels zero (so at
    step 0 it predicts exactly what `unet` does) -- how InstructPix2Pix was made from SD1.5."""
    # deferred: diffusers takes seconds to import; only the widening needs it
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config["in_channels"] = IP2P_IN_CHANNELS
    new = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    w = state["conv_in.weight"]
    wide = torch.zeros(w.shape[0], IP2P_IN_CHANNELS, *w.shape[2:], dtype=w.dtype)
    wide[:, :4] = w
    state["conv_in.weight"] = wide
    new.load_state_dict(state)
    return new.to(device=unet.device, dtype=unet.dtype)


def is_instruct(target: Target) -> bool:
    """An InstructPix2Pix UNet: 8 input channels (noisy latent, input-image latent)."""
    config = getattr(getattr(target, "unet", None), "config", None)
    return config is not None and int(config.in_channels) == IP2P_IN_CHANNELS


_PIPES: "weakref.WeakKeyDictionary[Target, object]" = weakref.WeakKeyDictionary()


def instruct_pipeline(target: Target):
    """diffusers' StableDiffusionInstructPix2PixPipeline over the target's components (built once
    per target): the editor a hub IP2P folder and tiny-ip2p share."""
    if not is_instruct(target):
        raise TargetLoadError(f"target {target.name!r} is not an instruction editor: its UNet takes "
                              f"{target.unet.config.in_channels} input channels, InstructPix2Pix needs 8")
    if target not in _PIPES:
        # deferred: diffusers takes seconds to import; only an edit needs its pipeline
        from diffusers import StableDiffusionInstructPix2PixPipeline

        pipe = StableDiffusionInstructPix2PixPipeline(**target.components(), safety_checker=None,
                                                      feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[target] = pipe
    return _PIPES[target]


@dataclass(frozen=True)
class InstructSettings:
    """The settings of one instruction edit, recorded with it (diffusers' defaults but fewer steps)."""

    steps: int = 20
    guidance: float = DEFAULT_TEXT_GUIDANCE
    image_guidance: float = DEFAULT_IMAGE_GUIDANCE
    eta: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"steps={self.steps!r}: expected a positive integer")
        for name in ("guidance", "image_guidance"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise InputError(f"{name}={v!r}: expected a finite number >= 0")


@torch.no_grad()
def instruct_edit(target: Target, images: torch.Tensor, instruction: str, seeds, settings: InstructSettings) -> torch.Tensor:
    """Edit (N, 3, H, W) images in [0, 1] by `instruction`, image i with generator seed seeds[i];
    returns (N, 3, H, W) in [0, 1]. Deterministic for given seeds on one device type."""
    if len(seeds) != len(images):
        raise InputError(f"got {len(images)} images but {len(seeds)} seeds")
    gens = [torch.Generator(device=target.device).manual_seed(int(s)) for s in seeds]
    out = instruct_pipeline(target)(
        prompt=[instruction] * len(images), image=images.to(target.device, target.dtype),
        num_inference_steps=settings.steps, guidance_scale=settings.guidance,
        image_guidance_scale=settings.image_guidance, eta=settings.eta, generator=gens, output_type="pt").images
    return out.float().clamp(0, 1)


def load_tiny_ip2p(folder: Path, assets: Path, device=None, dtype: Optional[torch.dtype] = None) -> Target:
    """tiny's VAE, text encoder, tokenizer and scheduler with the 8-channel UNet of `folder`, after
    checking that the parent's weights are the ones the UNet was trained against."""
    import json

    # deferred: diffusers takes seconds to import; only this loader needs it
    from diffusers import UNet2DConditionModel

    from spdbench.data.photos import sha256_file
    from spdbench.targets.sd15 import load_sd15

    if not (folder / "unet").is_dir() or not (folder / "training.json").is_file():
        raise TargetLoadError(f"the 'tiny-ip2p' target is not installed ({folder} lacks unet/ or training.json); "
                              "train it with `python -m zoo.train_ip2p` (docs/zoo.md)")
    record = json.loads((folder / "training.json").read_text())
    parent = assets / record["parent"]
    for part, want in record["parent_weights_sha256"].items():
        if part.startswith(("vae/", "text_encoder/")) and (
                not (parent / part).is_file() or sha256_file(parent / part) != want):
            raise TargetLoadError(f"tiny-ip2p was trained on another model: {part} of {parent} does not match "
                                  "its training record; retrain it (python -m zoo.train_ip2p)")
    comps = load_sd15(parent, name=record["parent"]).components()
    comps["unet"] = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    return Target(**comps, name="tiny-ip2p", source="spdbench:tiny-ip2p", device=device, dtype=dtype)


def save_instruct_folder(target: Target, folder: Union[str, Path]) -> Path:
    """Save as a diffusers StableDiffusionInstructPix2PixPipeline folder -- the layout of
    `timbrooks/instruct-pix2pix` -- which `load_target(folder)` reads back like a hub id."""
    folder = Path(folder)
    instruct_pipeline(target).save_pretrained(folder, safe_serialization=True)
    return folder
