"""Model work in encoder-equivalent passes: the hardware-independent cost axis of the board (issue 35).

Why FLOPs: attacks are compared "at equal cost", and equal iterations are not equal work -- per
step PhotoGuard's encoder attack makes one VAE-encoder pass forward and backward, AdvDM adds a UNet
pass, PhotoGuard's diffusion attack four UNet passes and a decoder pass. The records count each
network's passes (`model_calls`); weighting them needs each pass's cost. Wall seconds depend on
the machine and the load (the board shows them too); the FLOPs of each pass, counted by torch's
own `FlopCounterMode` on the suite's model at the suite's resolution, are the same on every
machine, so the board's work column regenerates byte for byte. The unit is one VAE-encoder pass
forward *and* backward for one photo: a photoguard-encoder step is 1.0 by definition.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Mapping, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

#: the networks `model_calls` counts, in its key order ("<net>_fwd", "<net>_bwd")
NETWORKS = ("vae_encoder", "unet", "vae_decoder")
#: `pass_flops` of the models the offline suites use, keyed "<target fingerprint>@<size>" (written by
#: `python -m spdbench.doctor.flops NAME SIZE`; tests/test_work.py recounts them)
TABLE = "pass_flops.json"


@lru_cache(maxsize=None)
def _table() -> dict:
    return json.loads(resources.files("spdbench.scoring").joinpath(TABLE).read_text())


def known_weights(fingerprint: str, size: int) -> Optional[dict[str, float]]:
    """`pass_weights` of a model counted in the table, or None (its work is then shown as "–")."""
    flops = _table().get(f"{fingerprint}@{int(size)}")
    return pass_weights(flops["flops"]) if flops else None


def _count(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return float(counter.get_total_flops()), out


def _fwd_bwd(run, x: torch.Tensor) -> tuple[float, float]:
    """FLOPs of run(x) and of the backward pass to x (not to the weights: attacks differentiate
    with respect to the photo only)."""
    x = x.detach().requires_grad_(True)
    fwd, out = _count(lambda: run(x))
    bwd, _ = _count(lambda: out.float().sum().backward())
    return fwd, bwd


def pass_flops(target, size: int) -> dict[str, float]:
    """FLOPs of one forward and one backward pass of each network for one photo of `size` px on
    `target` (keys as in `model_calls`: "vae_encoder_fwd", ..., "vae_decoder_bwd"). The UNet pass
    is the conditioned one (no classifier-free guidance: `model_calls` counts a guided call as two)."""
    was = {p: p.requires_grad for p in target.vae.parameters()} | {p: p.requires_grad for p in target.unet.parameters()}
    for p in was:
        p.requires_grad_(False)
    try:
        photo = torch.rand(1, 3, size, size, device=target.device)
        latents = target.encode(photo).latents.detach()
        cond = target.encode_prompt([""])
        t = target.num_train_timesteps // 2
        # an inpainting UNet's condition is an encoder pass of its own (counted as one by `model_calls`)
        inpaint = target.inpaint_condition(photo).detach() if target.inpainting else None
        # an instruction editor's (InstructPix2Pix, 8 channels) image condition: the photo's unscaled latent
        image = (latents / target.scaling_factor) if int(target.unet.config.in_channels) == 8 else None
        out: dict[str, float] = {}
        out["vae_encoder_fwd"], out["vae_encoder_bwd"] = _fwd_bwd(lambda x: target.encode(x).latents, photo)
        out["unet_fwd"], out["unet_bwd"] = _fwd_bwd(
            lambda z: target.predict_noise(z, t, cond, inpaint=inpaint, image_latents=image), latents)
        out["vae_decoder_fwd"], out["vae_decoder_bwd"] = _fwd_bwd(target.decode, latents)
        return out
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)


def pass_weights(flops: Mapping[str, float]) -> dict[str, float]:
    """Each pass's FLOPs in encoder-equivalents (one encoder pass forward + backward = 1)."""
    unit = flops["vae_encoder_fwd"] + flops["vae_encoder_bwd"]
    if unit <= 0:
        raise ValueError(f"an encoder pass of {unit} FLOPs cannot be the unit of work")
    return {k: v / unit for k, v in flops.items()}


def encoder_equivalents(model_calls: Mapping[str, float], weights: Mapping[str, float]) -> Optional[float]:
    """The work of `model_calls` (passes per image) in encoder-equivalent passes; None where the
    record counted none (an attack that calls no network, or a record from before the counts)."""
    if not model_calls or not any(model_calls.values()):
        return None
    return float(sum(float(n) * weights.get(k, 0.0) for k, n in model_calls.items()))


def record_work(record) -> Optional[float]:
    """A record's model work per protected image in encoder-equivalent passes, where its model's
    pass FLOPs are in the table (TABLE); None otherwise (the board shows "–"), and for a record
    that counted no pass. The one reading the board, its work view and the cost card share."""
    target = getattr(record, "target", None)
    weights = known_weights(target.fingerprint, int(record.suite_config.get("image_size") or 0)) \
        if target is not None else None
    return encoder_equivalents(record.model_calls, weights) if weights else None
