"""Targets: the one loading door for the tiny models, hub ids and local folders."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import TargetLoadError
from .base import Encoding, Target
from .sd15 import SD15_HUB_ID, load_sd15
from .tiny import TRAINED_DIR, build_tiny

__all__ = ["Encoding", "Target", "load_target", "load_sd15", "build_tiny", "SD15_HUB_ID", "parse_dtype"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise TargetLoadError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def load_target(name: Union[str, Path] = "tiny", device: Union[str, torch.device, None] = None,
                dtype: Union[str, torch.dtype, None] = None) -> Target:
    """"tiny" (the trained offline model shipped in the package), "tiny-random[-SEED]"
    (random weights, plumbing only), "sd15-arch-random[-SEED]" (SD1.5's full architecture with random
    weights, for GPU timings), a diffusers folder, or a hub id such as SD15_HUB_ID."""
    dtype = parse_dtype(dtype)
    text = str(name)
    if text == "tiny":
        if not (TRAINED_DIR / "model_index.json").is_file():
            raise TargetLoadError(
                f"the trained tiny target is not installed ({TRAINED_DIR} is missing); "
                "use 'tiny-random' or train it with `python -m spdbench.targets.train_tiny`"
            )
        return load_sd15(TRAINED_DIR, device=device, dtype=dtype, name="tiny")
    if text == "sd15-arch-random" or text.startswith("sd15-arch-random-"):
        from .sd15_arch import build_sd15_random

        seed = int(text.rsplit("-", 1)[1]) if text.count("-") == 3 else 0
        return build_sd15_random(seed, device=device, dtype=dtype)
    if text == "tiny-random" or text.startswith("tiny-random-"):
        seed = int(text.rsplit("-", 1)[1]) if text.count("-") == 2 else 0
        return build_tiny(seed, device=device, dtype=dtype)
    return load_sd15(text, device=device, dtype=dtype)
