"""Targets: the one loading door for the tiny models, hub ids and local folders."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from spdbench.data import photos
from spdbench.errors import InputError, RegistryError, TargetLoadError, did_you_mean
from spdbench.registry import Registry
from spdbench.targets.base import Encoding, Target
from spdbench.targets.sd15 import SD15_HUB_ID, SD15_INPAINT_HUB_ID, load_sd15
from spdbench.targets.sd15_arch import build_sd15_random
from spdbench.targets.tiny import ASSETS, INPAINT_DIR, IP2P_DIR, TINY_B_DIR, TRAINED_DIR, V2_DIR, build_tiny
from spdbench.targets.instruct import load_tiny_ip2p

__all__ = ["Encoding", "Target", "TARGETS", "load_target", "load_sd15", "build_tiny", "SD15_HUB_ID", "SD15_INPAINT_HUB_ID", "parse_dtype",
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


def load_target(name: Union[str, Path] = "tiny", device: Union[str, torch.device, None] = None,
                dtype: Union[str, torch.dtype, None] = None) -> Target:
    """"tiny" (the trained offline model shipped in the package), "tiny-v3" (its retrained successor),
    "tiny-b" (v3's independently trained sibling, for transfer), "tiny-inpaint" (SD-inpainting on
    v3's VAE and text encoder), "tiny-ip2p" (InstructPix2Pix's 8-channel UNet on the same),
    "tiny-random[-SEED]"
    (random weights, plumbing only), "sd15-arch-random[-SEED]" (SD1.5's full architecture with random
    weights, for GPU timings), a diffusers folder, or a hub id such as SD15_HUB_ID."""
    target = _load(name, device, dtype)
    target.load_spec = str(name)  # how an attack worker loads its own copy (isolation.target_spec)
    return target


def _check_installed(folder: Path, name: str) -> None:
    if not folder.is_dir() or not any(folder.iterdir()):
        raise TargetLoadError(f"the {name!r} target is not installed ({folder} is missing); train it with "
                              "zoo (docs/zoo.md)")


def _check_loader(name: str, obj: object) -> None:
    if not callable(obj):
        raise RegistryError(f"target {name!r} must be registered as a loader fn(device=None, dtype=None) -> Target, "
                            f"got {obj!r}")


def _loader_from_entry_point(name: str, obj: object, where: str) -> Callable[..., Target]:
    """An entry point of `spdbench.targets` names a loader `fn(device=None, dtype=None) -> Target`."""
    _check_loader(name, obj)
    return obj


#: every named target: a loader `fn(device=None, dtype=None) -> Target` per name, built-in (below) and
#: plugin (entry-point group `spdbench.targets`); a `seeded=True` family NAME also answers NAME-SEED,
#: its loader then taking `seed=`. Anything else is a model folder or a hub id.
TARGETS: Registry[Callable[..., Target]] = Registry("target", check=_check_loader,
                                                    from_entry_point=_loader_from_entry_point)


@TARGETS.register("tiny")
def _tiny(device=None, dtype=None) -> Target:
    """The trained offline model shipped in the package."""
    if not (TRAINED_DIR / "model_index.json").is_file():
        raise TargetLoadError(
            f"the trained tiny target is not installed ({TRAINED_DIR} is missing); "
            "use 'tiny-random' or train it with `python -m zoo.train_tiny`"
        )
    return load_sd15(TRAINED_DIR, device=device, dtype=dtype, name="tiny")


TARGETS.add("tiny-v3", _tiny)  # its name before the switch-over: the same model, under its one name


@TARGETS.register("tiny-v2")
def _tiny_v2(device=None, dtype=None) -> Target:
    _check_installed(V2_DIR, "tiny-v2")
    return load_sd15(V2_DIR, device=device, dtype=dtype, name="tiny-v2")


@TARGETS.register("tiny-b")
def _tiny_b(device=None, dtype=None) -> Target:
    _check_installed(TINY_B_DIR, "tiny-b")
    return load_sd15(TINY_B_DIR, device=device, dtype=dtype, name="tiny-b")


@TARGETS.register("tiny-inpaint")
def _load_tiny_inpaint(device=None, dtype=None) -> Target:
    """tiny's VAE, text encoder and tokenizer with the shipped 9-channel UNet, after checking that
    tiny's weights are the ones the UNet was trained against (a retrained tiny would otherwise
    pair silently with a stale inpainting UNet)."""
    from diffusers import UNet2DConditionModel  # deferred: diffusers takes seconds to import; only this loader needs it

    _check_installed(INPAINT_DIR, "tiny-inpaint")
    record = json.loads((INPAINT_DIR / "training.json").read_text())
    parent = ASSETS / record["parent"]  # the zoo folder whose VAE and text encoder it was trained on
    for part, want in record["parent_weights_sha256"].items():
        if part.startswith(("vae/", "text_encoder/")) and (
                not (parent / part).is_file() or photos.sha256_file(parent / part) != want):
            raise TargetLoadError(f"tiny-inpaint was trained on another model: {part} of {parent} does not "
                                  "match its training record; retrain it (python -m zoo.train_inpaint)")
    base = load_sd15(parent, name=record["parent"])
    comps = base.components()
    comps["unet"] = UNet2DConditionModel.from_pretrained(str(INPAINT_DIR / "unet"))
    return Target(**comps, name="tiny-inpaint", source="spdbench:tiny-inpaint", device=device, dtype=dtype)


@TARGETS.register("tiny-ip2p")
def _load_tiny_ip2p(device=None, dtype=None) -> Target:
    """InstructPix2Pix's 8-channel UNet (zoo/train_ip2p.py) on tiny's VAE and text encoder."""
    return load_tiny_ip2p(IP2P_DIR, ASSETS, device=device, dtype=dtype)


@TARGETS.register("tiny-random", seeded=True)
def _tiny_random(device=None, dtype=None, seed: int = 0) -> Target:
    return build_tiny(seed, device=device, dtype=dtype)


@TARGETS.register("sd15-arch-random", seeded=True)
def _sd15_arch_random(device=None, dtype=None, seed: int = 0) -> Target:
    return build_sd15_random(seed, device=device, dtype=dtype)


def _registered(text: str) -> tuple[Optional[Callable[..., Target]], dict]:
    """The loader of a registered name and its keyword arguments (a seeded family's `seed`), or
    (None, {}) for a name that is not registered (a folder or a hub id)."""
    if text in TARGETS and not TARGETS.metadata(text).get("seeded"):
        return TARGETS[text], {}
    for family in (n for n in TARGETS.names() if TARGETS.metadata(n).get("seeded")):
        if text.startswith(family):
            seeded = re.fullmatch(rf"{re.escape(family)}(?:-(\d{{1,9}}))?", text)
            if not seeded:
                raise TargetLoadError(f"target {text!r}: expected {family!r} or {family + '-SEED'!r} with an "
                                      f"integer SEED (e.g. {family + '-3'!r})")
            return TARGETS[family], {"seed": int(seeded.group(1) or 0)}
    return None, {}


def _load(name: Union[str, Path], device, dtype) -> Target:
    dtype = parse_dtype(dtype)
    device = parse_device(device)
    if not isinstance(name, (str, Path)) or not str(name).strip():
        raise TargetLoadError(f"target must be a registered name ({', '.join(sorted(TARGETS))}, or "
                              f"'tiny-random-SEED'), a model folder or a hub id, got {name!r}")
    text = str(name)
    loader, kwargs = _registered(text)
    if loader is not None:
        return loader(device=device, dtype=dtype, **kwargs)
    if "/" not in text and not Path(text).expanduser().exists():  # neither a folder nor a hub id (org/name)
        raise TargetLoadError(f"unknown target {text!r}.{did_you_mean(text, TARGETS)} Available: "
                              f"{', '.join(sorted(TARGETS))}; or a model folder, or a hub id such as {SD15_HUB_ID!r}")
    return load_sd15(text, device=device, dtype=dtype)
