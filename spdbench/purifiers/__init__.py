"""Purifiers: counter-measures applied to protected photos before editing (a registry, like attacks)."""
from .base import (ENTRY_POINT_GROUP, Purifier, describe, get_purifier, list_purifiers, load_entry_points,
                   register_purifier, unregister_purifier)
from .classical import gaussian_blur, jpeg, resize, tv_denoise
from .diffusion import consistency, diffpure, gridpure

__all__ = ["ENTRY_POINT_GROUP", "Purifier", "describe", "get_purifier", "list_purifiers", "load_entry_points",
           "register_purifier", "unregister_purifier", "gaussian_blur", "jpeg", "resize", "tv_denoise",
           "consistency", "diffpure", "gridpure"]
