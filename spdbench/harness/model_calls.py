"""Count the model work an attack actually does: VAE encoder, UNet and decoder passes, forward and backward.

Claimed steps say little about cost (one "step" of photoguard-diffusion is many UNet calls; an
attack may ignore `steps`). Counting image-passes through each network is the honest,
hardware-independent cost. Counted with module hooks in the attack's own process: a forward
pass of a batch of n adds n; a backward pass through that output adds n when its gradient is
computed. Gradient checkpointing recomputes forwards, and those count: they are real work.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch

NETWORKS = ("vae_encoder", "unet", "vae_decoder")
KEYS = tuple(f"{net}_{way}" for net in NETWORKS for way in ("fwd", "bwd"))


def _batch_size(args: tuple, kwargs: dict) -> int:
    first = args[0] if args else kwargs.get("sample", kwargs.get("x"))
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else 1


def _main_output(output: Any):
    if isinstance(output, torch.Tensor):
        return output
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


class ModelCallCounter:
    """Context manager: hooks on `target.vae.encoder`, `target.unet`, `target.vae.decoder`."""

    def __init__(self, target) -> None:
        self.target = target
        self.counts: Counter = Counter({k: 0 for k in KEYS})
        self._handles: list = []

    def _hook(self, net: str):
        def hook(module, args, kwargs, output):
            n = _batch_size(args, kwargs)
            self.counts[f"{net}_fwd"] += n
            out = _main_output(output)
            if out is not None and out.requires_grad:
                out.register_hook(lambda grad: self._backward(net, n))

        return hook

    def _backward(self, net: str, n: int) -> None:
        self.counts[f"{net}_bwd"] += n

    def __enter__(self) -> "ModelCallCounter":
        modules = {"vae_encoder": self.target.vae.encoder, "unet": self.target.unet,
                   "vae_decoder": self.target.vae.decoder}
        for net, module in modules.items():
            self._handles.append(module.register_forward_hook(self._hook(net), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def per_image(self, images: int) -> dict[str, float]:
        """Counts divided by the number of images protected (or fitted on)."""
        return {k: self.counts[k] / max(1, images) for k in KEYS}
