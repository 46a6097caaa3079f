"""Purifiers: counter-measures applied to protected photos before editing (a registry, like attacks)."""
from spdbench.purifiers.base import (ENTRY_POINT_GROUP, Purifier, base_name, describe, drawn, get_purifier, list_purifiers,
                   load_entry_points, register_purifier, unregister_purifier)
from spdbench.purifiers.classical import gaussian_blur, jpeg, resize, tv_denoise
from spdbench.purifiers.diffusion import consistency, diffpure, gridpure
from spdbench.purifiers.mismatched import img2img_round_trip, mismatched_editor, vae_round_trip
from spdbench.purifiers.sharing import noisy_upscale, noisy_upscale_diffusion, platform

__all__ = ["ENTRY_POINT_GROUP", "Purifier", "describe", "get_purifier", "list_purifiers", "load_entry_points",
           "register_purifier", "unregister_purifier", "gaussian_blur", "jpeg", "resize", "tv_denoise",
           "consistency", "diffpure", "gridpure", "base_name", "drawn", "img2img_round_trip", "mismatched_editor",
           "vae_round_trip", "noisy_upscale", "noisy_upscale_diffusion", "platform"]
