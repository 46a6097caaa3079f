"""The inpainting UNet's shape: SD-inpainting's 9 input channels from a 4-channel UNet.

Why here (the loading door) and not in the zoo: the zoo trains `tiny-inpaint` from this widening,
and the doctor's timings need an inpainting twin of a random-weight target; both must build the
same thing.
"""
from __future__ import annotations

import torch

from spdbench.targets.base import Target


def inpaint_unet_from(unet):
    """A 9-input-channel copy of `unet`: every weight copied, conv_in's 5 new input channels zero
    (so at step 0 it predicts exactly what `unet` does, whatever the mask and masked image)."""
    # deferred: diffusers takes seconds to import; only the widening needs it
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config["in_channels"] = 9
    new = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    w = state["conv_in.weight"]
    wide = torch.zeros(w.shape[0], 9, *w.shape[2:], dtype=w.dtype)
    wide[:, :4] = w
    state["conv_in.weight"] = wide
    new.load_state_dict(state)
    return new.to(device=unet.device, dtype=unet.dtype)


def inpainting_twin(target: Target, seed: int = 0) -> Target:
    """`target` with its UNet widened to take the inpainting condition: the cost of an inpainting
    model, for timings and plumbing of a random-weight target -- never for protection numbers.

    The 5 new conv_in channels get seeded random weights at the scale of the existing ones (zeros
    would make the condition, and so a mask-reading attack's gradient, vanish)."""
    if target.inpainting:
        return target
    comps = target.components()
    unet = inpaint_unet_from(comps["unet"])
    with torch.no_grad():
        w = unet.conv_in.weight
        g = torch.Generator().manual_seed(seed)
        extra = torch.randn(w[:, 4:].shape, generator=g) * float(w[:, :4].float().std())
        w[:, 4:] = extra.to(w.device, w.dtype)
    comps["unet"] = unet
    return Target(**comps, name=f"{target.name}-inpaint-twin", device=target.device, dtype=target.dtype)
