"""The editing suite (img2img, inpainting on a target that inpaints, instruction editing on an InstructPix2Pix target): prompts, explicit settings, per-image seeds, batched edits, clean-edit cache.

Clean and immunized images are edited with the same prompt, settings and generator seed per image,
so the only difference between the two edits is the perturbation. Clean edits do not depend on the
attack, so they are computed once and cached on disk by content hash (image, prompt, settings,
model, dtype, device type), and every entry is checked when read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save

from spdbench.errors import InputError, UnknownNameError, did_you_mean
from spdbench.images import check_images
from spdbench.store.records import atomic_write_bytes
from spdbench.store.runfolder import DiskError
from spdbench.suites import EditSettings
from spdbench.targets.instruct import instruct_pipeline, is_instruct

log = logging.getLogger(__name__)

#: environment variable naming the cache root (overrides the user's cache folder)
CACHE_ENV = "SPDBENCH_CACHE_DIR"


def default_cache_root() -> Path:
    """$SPDBENCH_CACHE_DIR, else $XDG_CACHE_HOME/spdbench, else ~/.cache/spdbench.

    Why a user-level default: a clean edit depends only on (photo, mask, prompt, settings, model,
    dtype, device type) -- never on the attack or the run folder -- so every run on a machine can
    share it instead of each folder recomputing its own."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "spdbench"


def clean_edit_cache_dir(target, root: Union[str, Path, None] = None) -> Path:
    """The shared clean-edit folder of one model: ROOT/clean-edits/NAME-FINGERPRINT (one folder per
    model so a stale model's entries can be deleted as a whole; the keys name the settings)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(target.name))[-60:] or "model"
    return Path(root if root is not None else default_cache_root()) / "clean-edits" / f"{name}-{target.fingerprint}"

def prepare_cache_dir(folder: Union[str, Path]) -> Path:
    """Create the clean-edit cache folder and prove it writable; one InputError / DiskError line if not.

    Why up front: the first clean edit is written only after the first cell group's attack has run,
    so a cache path that is a file (or lies under one) or a read-only folder ended the run there, with
    a traceback and the attack's time lost. Permission bits do not tell (root, read-only mounts): a
    probe file is created and removed."""
    folder = Path(folder).expanduser()
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise InputError(f"cache_dir {str(folder)!r}: {str(blocker)!r} is a file, not a folder; expected a "
                         f"clean-edit cache folder (pass another --cache-dir or set ${CACHE_ENV})")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".spdbench-probe-", suffix=".tmp")
    except OSError as exc:
        err = DiskError(f"cache_dir {str(folder)!r} is not writable: {exc.strerror or exc}; expected a writable "
                        f"clean-edit cache folder (pass another --cache-dir or set ${CACHE_ENV})")
        err.errno = exc.errno  # type: ignore[misc]  # callers may branch on errno like any OSError
        raise err from None
    os.close(fd)
    os.unlink(probe)
    return folder


PROMPTS: dict[str, str] = {
    "P1": "make it like a watercolor painting",
    "P2": "apply sunset lighting",
    "P3": "add some snow",
    "P4": "",
    # instructions for instruction editors (InstructPix2Pix); each has an exact result
    # (spdbench.data.instructions.EDITS), which tiny-ip2p was trained on
    "I1": "make it black and white",
    "I2": "invert the colors",
    "I3": "make it brighter",
    "I4": "make it darker",
    "I5": "blur it",
}


def resolve_prompt(prompt: str) -> str:
    """A key P1..P4 or the prompt text itself; a near-miss key is an error, not a prompt."""
    if prompt in PROMPTS:
        return PROMPTS[prompt]
    if len(prompt) <= 3 and prompt.upper().startswith("P"):
        raise UnknownNameError(f"unknown prompt key {prompt!r}.{did_you_mean(prompt, PROMPTS)} "
                               f"Available: {', '.join(PROMPTS)}")
    return prompt


def image_seed(settings: EditSettings, image: torch.Tensor) -> int:
    """Per-image generator seed from the suite seed and the clean photo's 8-bit bytes: clean and
    protected edits of one photo share it whatever the order of the photos."""
    data = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy().tobytes()
    digest = hashlib.sha256(str(settings.seed).encode() + data).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def cache_entry_problem(entry: Optional[torch.Tensor], shape: Sequence[int]) -> Optional[str]:
    """Why a clean edit (read from the cache or about to be written to it) cannot be trusted, or None.

    A stored edit must be a float image of the clean image's shape, finite, in [0, 1] and not
    constant: a file of zeros of the right shape was once used silently (SSIM 0.0016).
    """
    if entry is None:
        return "no tensor named 'edit'"
    if not entry.is_floating_point():
        return f"dtype {entry.dtype}, expected a float tensor"
    if tuple(entry.shape) != tuple(shape):
        return f"shape {tuple(entry.shape)}, expected {tuple(shape)}"
    if not bool(torch.isfinite(entry).all()):
        return "non-finite values (NaN/Inf)"
    lo, hi = float(entry.min()), float(entry.max())
    if lo < 0 or hi > 1:
        return f"values in [{lo:.4g}, {hi:.4g}], expected [0, 1]"
    if hi == lo:
        return f"every value is {lo:.4g} (a constant image is not an edit)"
    return None


class Editor:
    """Batched edits through the target's diffusers pipeline (img2img, inpainting with a mask per
    image when the target's UNet inpaints, InstructPix2Pix with the settings' image guidance when it
    takes an image latent), with an on-disk clean cache."""

    def __init__(self, target, settings: EditSettings, cache_dir: Union[str, Path, None] = None,
                 batch_size: int = 8) -> None:
        self.target, self.settings = target, settings
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = max(1, int(batch_size))
        self.cache_hits = self.cache_misses = self.edits_run = 0
        #: hits on entries this editor wrote itself (another eps of the same run), counted apart so a
        #: new folder never reads as "from the cache" of some earlier run
        self.cache_hits_own = 0
        self._written: set[str] = set()
        #: file names of cache entries found bad on read (recomputed and overwritten), in order
        self.cache_rejected: list[str] = []
        self.oom_events: list[dict] = []

    def _generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        return [torch.Generator(device=self.target.device).manual_seed(int(s)) for s in seeds]

    @torch.no_grad()
    def _edit_batch(self, images: torch.Tensor, prompt: str, seeds: Sequence[int],
                    masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = self.settings
        x = images.to(self.target.device, self.target.dtype)
        common = dict(prompt=[prompt] * len(images), image=x, strength=s.strength, num_inference_steps=s.steps,
                      guidance_scale=s.guidance, eta=s.eta, generator=self._generators(seeds), output_type="pt")
        if is_instruct(self.target):  # InstructPix2Pix: no strength, an image guidance scale instead
            out = self._instruct_batch(x, prompt, seeds)
        elif s.image_guidance is not None:
            raise InputError(f"image_guidance={s.image_guidance!r} is set but target {self.target.name!r} is not an "
                             "instruction editor (InstructPix2Pix); leave it unset for img2img and inpainting")
        elif masks is None:
            out = self.target.img2img()(**common).images
        else:  # diffusers' inpainting pipeline: 1 = repaint; the size is the photo's, not the model's default
            out = self.target.inpaint()(**common, mask_image=masks.to(self.target.device, self.target.dtype),
                                        height=x.shape[-2], width=x.shape[-1]).images
        self.edits_run += len(images)
        return out.float().clamp(0, 1)

    def _instruct_batch(self, x: torch.Tensor, prompt: str, seeds: Sequence[int]) -> torch.Tensor:
        s = self.settings
        if s.image_guidance is None:
            raise InputError(f"target {self.target.name!r} is an instruction editor (InstructPix2Pix): the suite's "
                             "edit settings need image_guidance (e.g. 1.5)")
        return instruct_pipeline(self.target)(
            prompt=[prompt] * len(x), image=x, num_inference_steps=s.steps, guidance_scale=s.guidance,
            image_guidance_scale=s.image_guidance, eta=s.eta, generator=self._generators(seeds),
            output_type="pt").images

    def _check_masks(self, images: torch.Tensor, masks: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """An inpainting target needs one {0, 1} mask (N, 1, H, W) per image; img2img takes none."""
        inpainting = bool(getattr(self.target, "inpainting", False))
        if masks is None:
            if inpainting:
                raise InputError(f"target {self.target.name!r} inpaints: masks (N, 1, H, W), 1 = repaint, are required")
            return None
        if not inpainting:
            raise InputError(f"masks were given but target {self.target.name!r} is an img2img model, not inpainting")
        n, _, h, w = images.shape
        if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != (n, 1, h, w):
            got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise InputError(f"masks: expected shape {(n, 1, h, w)} (one per image, 1 = repaint), got {got}")
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise InputError("masks: expected values 0 (keep) and 1 (repaint) only")
        return masks.float()

    def edit(self, images: torch.Tensor, prompt: str, seeds: Sequence[int],
             masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Edit every image with its own seed (and, on an inpainting target, its mask); batches
        shrink by half on out-of-memory."""
        check_images(images, "images")
        if len(seeds) != len(images):
            raise InputError(f"got {len(images)} images but {len(seeds)} seeds")
        masks = self._check_masks(images, masks)
        text = resolve_prompt(prompt)
        outs, start, bs = [], 0, self.batch_size
        while start < len(images):
            try:
                chunk = (images[start:start + bs], text, seeds[start:start + bs])
                outs.append(self._edit_batch(*chunk) if masks is None
                            else self._edit_batch(*chunk, masks[start:start + bs]))
                start += bs
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if "out of memory" not in str(exc).lower() or bs == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.oom_events.append({"batch_size": bs, "retry_with": bs // 2})
                bs //= 2
        return torch.cat(outs)

    def _key(self, image: torch.Tensor, text: str, mask: Optional[torch.Tensor] = None) -> str:
        # the device type is part of the key: CPU and CUDA generators give different noise for one seed
        device_type = torch.device(self.target.device).type
        blob = json.dumps([self.settings.to_dict(), text, self.target.fingerprint, str(self.target.dtype),
                           device_type])
        data = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy().tobytes()
        if mask is not None:  # an inpainting edit is defined by its mask too
            data += b"mask" + mask.detach().cpu().to(torch.uint8).numpy().tobytes()
        return hashlib.sha256(blob.encode() + data).hexdigest()

    def edit_clean(self, images: torch.Tensor, prompt: str, seeds: Sequence[int],
                   masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Like `edit`, but each result is cached on disk by (image, mask, prompt, settings, model)."""
        if self.cache_dir is None:
            return self.edit(images, prompt, seeds, masks)
        masks = self._check_masks(images, masks)
        text = resolve_prompt(prompt)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        keys = [self._key(img, text, None if masks is None else masks[i]) for i, img in enumerate(images)]
        out: list[Optional[torch.Tensor]] = [None] * len(images)
        todo = []
        for i, k in enumerate(keys):
            path = self.cache_dir / f"{k}.safetensors"
            if path.is_file():
                entry = self._read_entry(path, images.shape[1:])
                if entry is not None:
                    out[i] = entry.to(images.device)
                    self.cache_hits += 1
                    self.cache_hits_own += k in self._written
                    continue
            todo.append(i)
        if todo:
            self.cache_misses += len(todo)
            edited = self.edit(images[todo], text, [seeds[i] for i in todo], None if masks is None else masks[todo])
            for j, i in enumerate(todo):
                out[i] = edited[j]
                name = f"{keys[i]}.safetensors"
                problem = cache_entry_problem(edited[j], images.shape[1:])
                if problem is not None:  # never store what would be rejected on every later read
                    log.warning("clean edit for cache entry %s not cached: %s", name, problem)
                    continue
                data = save({"edit": edited[j].detach().float().cpu().contiguous()})
                atomic_write_bytes(self.cache_dir / name, data)
                self._written.add(keys[i])
        return torch.stack(out).to(images.device)

    def _read_entry(self, path: Path, shape: Sequence[int]) -> Optional[torch.Tensor]:
        """The cached edit at `path`, or None (warned and counted in `cache_rejected`) when the file
        is unreadable or its content fails `cache_entry_problem`: it is then recomputed."""
        try:
            entry: Optional[torch.Tensor] = load_file(str(path)).get("edit")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one bad entry, not a failed run
            problem: Optional[str] = f"unreadable ({type(exc).__name__}: {str(exc)[:120]})"
        else:
            problem = cache_entry_problem(entry, shape)
        if problem is None:
            return entry.float()
        self.cache_rejected.append(path.name)
        log.warning("clean-edit cache entry %s rejected and recomputed: %s", path.name, problem)
        return None
