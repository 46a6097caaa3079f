"""Purifiers: counter-measures applied to protected photos before editing (a registry, like attacks)."""
from spdbench.purifiers.base import (ENTRY_POINT_GROUP, Purifier, describe, get_purifier, list_purifiers, load_entry_points,
                   register_purifier, unregister_purifier)
from spdbench.purifiers.classical import gaussian_blur, jpeg, resize, tv_denoise
from spdbench.purifiers.diffusion import consistency, diffpure, gridpure

__all__ = ["ENTRY_POINT_GROUP", "Purifier", "describe", "get_purifier", "list_purifiers", "load_entry_points",
           "register_purifier", "unregister_purifier", "gaussian_blur", "jpeg", "resize", "tv_denoise",
           "consistency", "diffpure", "gridpure"]
