"""Load a real Stable Diffusion 1.5 img2img pipeline (hub id or local folder) as a `Target`.

This is exactly the call a GPU user makes; offline (as in CI) a hub id fails fast with a message
that says how to get the weights, and a folder with missing parts names what is missing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from spdbench.errors import TargetLoadError
from spdbench.targets.base import Target

#: the maintained mirror (the runwayml/ repositories were deleted from the hub in 2024)
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: the hub revision loaded for SD15_HUB_ID: a branch name, since no commit hash of the mirror could be
#: confirmed offline; replace it with the commit hash to pin the weights byte for byte
SD15_REVISION = "main"
#: SD1.5-inpainting (9-channel UNet), the model of PhotoGuard's inpainting demo and DiffusionGuard
SD15_INPAINT_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-inpainting"
SD15_INPAINT_REVISION = "main"
#: the revision each known hub id is loaded at (another hub id loads at "main" unless told)
HUB_REVISIONS = {SD15_HUB_ID: SD15_REVISION, SD15_INPAINT_HUB_ID: SD15_INPAINT_REVISION}
REQUIRED_PARTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


def _check_folder(folder: Path) -> None:
    if not (folder / "model_index.json").is_file():
        raise TargetLoadError(f"{folder} is not a diffusers pipeline folder: model_index.json is missing")
    missing = [p for p in REQUIRED_PARTS if not (folder / p).is_dir() or not any((folder / p).iterdir())]
    if missing:
        raise TargetLoadError(f"model folder {folder} is missing component(s): {', '.join(missing)}")


def hub_revision(hub_id: str, revision: Optional[str] = None) -> str:
    """The revision a hub id is loaded at: the one asked for, else its pinned one, else "main"."""
    return revision or HUB_REVISIONS.get(hub_id, "main")


def load_sd15(model_id_or_path: Union[str, Path] = SD15_HUB_ID, device: Union[str, torch.device, None] = None,
              dtype: Optional[torch.dtype] = None, name: Optional[str] = None,
              revision: Optional[str] = None) -> Target:
    """Load SD1.5 img2img components by hub id (at `revision`, default its pinned one) or from a
    `save_pretrained` folder (`revision` ignored: a folder has no hub history)."""
    # deferred: diffusers takes seconds to import; only this loader needs it
    from diffusers import StableDiffusionImg2ImgPipeline

    # deferred: diffusers takes seconds to import; only this loader needs it
    from diffusers.utils import logging as dlog

    # deferred: transformers is slow to import; only this loader needs it
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()  # loading bars are noise in a benchmark log; our own bars show progress
    tlog.disable_progress_bar()  # transformers' "Loading weights 36/36" bar of the text encoder
    source = str(model_id_or_path)
    path = Path(source).expanduser()
    kwargs = dict(safety_checker=None, requires_safety_checker=False, feature_extractor=None)
    if path.exists():
        _check_folder(path)
        try:
            pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(path), **kwargs)
        except Exception as exc:  # noqa: BLE001 - turn any loader failure into one clear line
            raise TargetLoadError(f"could not load the pipeline in {path}: {exc}") from exc
    else:
        # short network timeouts so an offline machine fails in seconds, not minutes
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "5")
        revision = hub_revision(source, revision)
        try:
            pipe = StableDiffusionImg2ImgPipeline.from_pretrained(source, revision=revision, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise TargetLoadError(
                f"could not load model {source!r} (revision {revision!r}): it is not a local folder and the "
                f"Hugging Face hub did not provide it ({type(exc).__name__}). On a machine with access run "
                f"`hf download {source} --revision {revision} --local-dir DIR` (huggingface_hub's CLI; or "
                f"pipe.save_pretrained(DIR)) "
                f"and pass DIR as the target (`--target DIR`, or load_target(DIR))."
            ) from None
    target = Target(pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                    name=name or path.name if path.exists() else (name or source), source=source,
                    device=device, dtype=dtype)
    target.revision = None if path.exists() else revision  # records name the hub revision beside the id
    return target
