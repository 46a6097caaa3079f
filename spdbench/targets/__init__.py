"""Targets: the one loading door for the tiny models, hub ids and local folders."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import torch

from spdbench.errors import InputError, TargetLoadError
from spdbench.targets.base import Encoding, Target
from spdbench.targets.sd15 import SD15_HUB_ID, SD15_INPAINT_HUB_ID, load_sd15
from spdbench.targets.tiny import ASSETS, INPAINT_DIR, TINY_B_DIR, TRAINED_DIR, V2_DIR, build_tiny

__all__ = ["Encoding", "Target", "load_target", "load_sd15", "build_tiny", "SD15_HUB_ID", "SD15_INPAINT_HUB_ID", "parse_dtype",
           "parse_device"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """A model dtype by name or torch.dtype; only float32, float16 and bfloat16 run the pipeline."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise TargetLoadError(f"dtype {dtype} is not a model dtype; expected torch.float32, torch.float16 "
                                  "or torch.bfloat16")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise TargetLoadError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


_DEVICE_TYPES = ("cpu", "cuda", "mps")
_DEVICE_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "cuda0": "cuda:0", "apple": "mps", "metal": "mps"}


def parse_device(device: Union[str, torch.device, None]) -> Optional[torch.device]:
    """A device that exists on this machine, checked before any model is built: 'cpu', 'cuda',
    'cuda:N' (N below the GPU count) or 'mps'. None keeps the default (CPU)."""
    if device is None:
        return None
    if isinstance(device, torch.device):
        text = str(device)
    elif isinstance(device, str):
        text = device.strip()
    else:
        raise InputError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__} "
                         f"{device!r}")
    expected = "expected 'cpu', 'cuda', 'cuda:N' or 'mps'"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        alias = _DEVICE_ALIASES.get(text.lower()) or (text.lower() if text.lower() != text else None)
        hint = f"; did you mean {alias!r}?" if alias else ""
        raise InputError(f"device {device!r} is not a device: {expected}{hint}") from None
    if dev.type not in _DEVICE_TYPES:
        raise InputError(f"device {device!r} is not supported: {expected}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"device {device!r}: this machine cannot use CUDA ({why}); use device 'cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(f"device {device!r} does not exist: this machine has {count} CUDA GPU(s), "
                             f"cuda:0..cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r}: MPS (Apple GPU) is not available on this machine; use device 'cpu'")
    return dev


_SEEDED = re.compile(r"^(tiny-random|sd15-arch-random)(?:-(\d{1,9}))?$")


def load_target(name: Union[str, Path] = "tiny", device: Union[str, torch.device, None] = None,
                dtype: Union[str, torch.dtype, None] = None) -> Target:
    """"tiny" (the trained offline model shipped in the package), "tiny-v3" (its retrained successor),
    "tiny-b" (v3's independently trained sibling, for transfer), "tiny-inpaint" (SD-inpainting on
    v3's VAE and text encoder), "tiny-random[-SEED]"
    (random weights, plumbing only), "sd15-arch-random[-SEED]" (SD1.5's full architecture with random
    weights, for GPU timings), a diffusers folder, or a hub id such as SD15_HUB_ID."""
    target = _load(name, device, dtype)
    target.load_spec = str(name)  # how an attack worker loads its own copy (isolation.target_spec)
    return target


def _check_installed(folder: Path, name: str) -> None:
    if not folder.is_dir() or not any(folder.iterdir()):
        raise TargetLoadError(f"the {name!r} target is not installed ({folder} is missing); train it with "
                              "zoo (docs/zoo.md)")


def _load_tiny_inpaint(device, dtype) -> Target:
    """tiny's VAE, text encoder and tokenizer with the shipped 9-channel UNet, after checking that
    tiny's weights are the ones the UNet was trained against (a retrained tiny would otherwise
    pair silently with a stale inpainting UNet)."""
    import json

    from diffusers import UNet2DConditionModel

    from spdbench.data.photos import sha256_file

    _check_installed(INPAINT_DIR, "tiny-inpaint")
    record = json.loads((INPAINT_DIR / "training.json").read_text())
    parent = ASSETS / record["parent"]  # the zoo folder whose VAE and text encoder it was trained on
    for part, want in record["parent_weights_sha256"].items():
        if part.startswith(("vae/", "text_encoder/")) and (
                not (parent / part).is_file() or sha256_file(parent / part) != want):
            raise TargetLoadError(f"tiny-inpaint was trained on another model: {part} of {parent} does not "
                                  "match its training record; retrain it (python -m zoo.train_inpaint)")
    base = load_sd15(parent, name=record["parent"])
    comps = base.components()
    comps["unet"] = UNet2DConditionModel.from_pretrained(str(INPAINT_DIR / "unet"))
    return Target(**comps, name="tiny-inpaint", source="spdbench:tiny-inpaint", device=device, dtype=dtype)


def _load(name: Union[str, Path], device, dtype) -> Target:
    dtype = parse_dtype(dtype)
    device = parse_device(device)
    if not isinstance(name, (str, Path)) or not str(name).strip():
        raise TargetLoadError(f"target must be 'tiny', 'tiny-random[-SEED]', 'sd15-arch-random[-SEED]', a model "
                              f"folder or a hub id, got {name!r}")
    text = str(name)
    seeded = _SEEDED.match(text)
    if (text.startswith("tiny-random") or text.startswith("sd15-arch-random")) and not seeded:
        base = "sd15-arch-random" if text.startswith("sd15") else "tiny-random"
        raise TargetLoadError(f"target {text!r}: expected {base!r} or {base + '-SEED'!r} with an integer SEED "
                              f"(e.g. {base + '-3'!r})")
    if text == "tiny":
        if not (TRAINED_DIR / "model_index.json").is_file():
            raise TargetLoadError(
                f"the trained tiny target is not installed ({TRAINED_DIR} is missing); "
                "use 'tiny-random' or train it with `python -m zoo.train_tiny`"
            )
        return load_sd15(TRAINED_DIR, device=device, dtype=dtype, name="tiny")
    if text == "tiny-v3":  # its name before the switch-over: the same model, under its one name
        return _load("tiny", device, dtype)
    if text == "tiny-v2":
        _check_installed(V2_DIR, text)
        return load_sd15(V2_DIR, device=device, dtype=dtype, name="tiny-v2")
    if text == "tiny-b":
        _check_installed(TINY_B_DIR, text)
        return load_sd15(TINY_B_DIR, device=device, dtype=dtype, name="tiny-b")
    if text == "tiny-inpaint":
        return _load_tiny_inpaint(device, dtype)
    if seeded:
        seed = int(seeded.group(2) or 0)
        if seeded.group(1) == "sd15-arch-random":
            from spdbench.targets.sd15_arch import build_sd15_random

            return build_sd15_random(seed, device=device, dtype=dtype)
        return build_tiny(seed, device=device, dtype=dtype)
    return load_sd15(text, device=device, dtype=dtype)
