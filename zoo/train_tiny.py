"""Train the shipped tiny SD1.5-architecture target ("tiny") on CPU, deterministically.

Why: a random-weight pipeline's edits are noise, so immunization cannot be measured on it. This
script trains the same narrow components as `tiny.py` (AutoencoderKL x8 / 4 latent channels,
UNet2DConditionModel with cross-attention, 2-layer CLIPTextModel, DDIM scaled-linear schedule) on
the bundled *training* photos only, so the held-out (test-split) photos stay unseen.

Usage::

    python -m zoo.train_tiny [--out DIR] [--force] [--vae-minutes M]
        [--unet-minutes M] [--seed S] [--threads T] [--check-steps K]
        [--data list --photos DIR [--refine-minutes M --refine-latent-noise S]]   # v3, docs/zoo.md
        [--data list --photo-half a|b ...]   # a sibling on one half of the train split (tiny-b)
    python -m zoo.train_tiny --refine-decoder-steps N [--refine-latent-noise S] --from-shipped --force
    python -m zoo.train_tiny --continue-unet-steps N [--continue-unet-t-focus P] --from-shipped --force

Budgets are wall clock (or, with `--clock cpu`, this process's CPU time: on a shared, niced
machine the schedule then depends on what a step costs, not on the neighbours), but every run
records the step counts and the cosine schedule lengths, so `--vae-steps/--unet-steps` reproduce
a run by steps. `--check-steps K` reruns only the first K
optimizer steps of each stage from the seed (the UNet stage on the shipped VAE) and prints the
losses, which `tests/test_tiny_target.py` compares with `training.json`.

Stage 3, decoder refinement (`--refine-decoder-steps N --from-shipped`): the encoder (and
quant_conv) stay frozen, so the latent space -- and with it the trained UNet, the scaling factor
and every attack that targets the encoder -- is unchanged; only post_quant_conv + decoder are
trained further to reconstruct training crops from posterior samples (plus latent noise of std
U(0, S) with --refine-latent-noise S, as the shipped model was: an edit decodes the denoiser's
estimate, not a clean posterior sample). It runs a fixed number of steps on the shipped folder
and writes it back (tmp folder, then move; needs --force). Stage 2b (--continue-unet-steps)
trains the UNet further on the same frozen VAE in the same way.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spdbench.data.photos import BUNDLED, Photo, bundled_split, read_image, sha256_file
from spdbench.errors import InputError
from spdbench.targets.tiny import SCHEDULER_CONFIG, TRAINED_DIR, VAE_CONFIG, build_tiny_components
from zoo import photos as photo_list

SCRIPT_VERSION = "3"
TRAINING_JSON = "training.json"

# Extra permissively licensed photos shipped by installed packages; none is in the test split.
# The grey ones (scikit-image's CC0 textures and camera) are used as grey RGB: they teach the VAE
# fine texture, which the few colour photos lack.
EXTRA_PHOTOS: tuple[Photo, ...] = (
    Photo("motorcycle_right", "skimage", "data/motorcycle_right.png", "Middlebury stereo data set, free for research"),
    Photo("brick", "skimage", "data/brick.png", "CC0 (scikit-image)"),
    Photo("grass", "skimage", "data/grass.png", "CC0 (scikit-image)"),
    Photo("gravel", "skimage", "data/gravel.png", "CC0 (scikit-image)"),
    Photo("camera", "skimage", "data/camera.png", "CC0 (Lav Varshney)"),
)
FORBIDDEN = ("chelsea", "retina", "ihc", "flower")  # the bundled test split: never trained on

CAPTIONS = {
    "astronaut": "a photo of an astronaut",
    "coffee": "a photo of a cup of coffee",
    "rocket": "a photo of a rocket launch",
    "motorcycle": "a photo of a motorcycle",
    "motorcycle_right": "a photo of a motorcycle",
    "hubble": "a photo of galaxies in deep space",
    "china": "a photo of a chinese temple",
    "grace_hopper": "a portrait photo of a woman in uniform",
    "brick": "a photo of a brick wall",
    "grass": "a photo of grass",
    "gravel": "a photo of gravel",
    "camera": "a photo of a man with a camera",
}
SUITE_PROMPTS = ("make it like a watercolor painting", "apply sunset lighting", "add some snow",
                 "make it look like a pencil sketch")
P_EMPTY, P_SUITE = 0.15, 0.15


@dataclass
class Settings:
    seed: int = 0
    threads: int = 1
    # VAE
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 2e-3
    vae_warmup: int = 50
    vae_kl: float = 1e-5          # per-pixel weight of the KL term
    # UNet
    unet_batch: int = 32
    unet_crop: int = 128
    unet_lr: float = 1e-3
    unet_warmup: int = 50
    bank_size: int = 2048         # encoded 128x128 crops the UNet samples from
    unet_t_focus: float = 0.0     # share of UNet samples drawn from t < unet_t_max (the edit range)
    unet_t_max: int = 500
    scale_min: float = 0.25
    scale_max: float = 1.0
    gain: float = 0.10
    calib_steps: int = 30         # steps timed before the cosine length is fixed from the budget
    # data: "bundled" = the 12 scikit-image/sklearn/matplotlib photos of v2; "list" = the train
    # split of zoo/photos.json (v3). Scales: "fraction" of full resolution (v2) or
    # "short_side" in pixels (v3: wallpapers are 1000-5000 px, the held-out crops sit at 256 px)
    data: str = "bundled"
    scale_mode: str = "fraction"
    clock: str = "wall"           # what --vae-minutes/--unet-minutes measure: "wall" or "cpu" time
    # "a"/"b": only that half of the list's train split (photos.half_of, by each photo's sha256);
    # None: all of it. Sibling models on disjoint halves show how much a figure owes the photos.
    photo_half: Optional[str] = None


@dataclass
class DecoderSettings:
    """Stage 3 (decoder refinement); steps, not minutes, so a run is reproducible by itself."""
    seed: int = 0
    threads: int = 1
    batch: int = 16
    crop: int = 64
    lr: float = 1e-3
    warmup: int = 50
    ssim_weight: float = 0.05     # weight of (1 - SSIM) on [0, 1] next to MSE on [-1, 1]
    gain: float = 0.10
    latent_noise: float = 0.0     # max std (scaled-latent units) of noise added before decoding
    scale_mode: str = "fraction"  # as the model's Settings.scale_mode
    clock: str = "wall"           # as the model's Settings.clock (used with a minutes budget)


# --- data -----------------------------------------------------------------------------------
def caption_of(photo) -> str:
    """A data-list photo carries its caption; v2's bundled photos take it from CAPTIONS."""
    return getattr(photo, "caption", "") or CAPTIONS[photo.name]


def training_photos(data: str = "bundled", photos_dir: Optional[Path] = None,
                    data_list: Path = photo_list.DATA_LIST, half: Optional[str] = None) -> list:
    """The training photos: v2's bundled set, or the data list's train split (hash-checked),
    optionally only one half of it (`half`, see photos.half_of).

    Either way no bundled test photo can slip in (asserted here, and by photos._check_disjoint).
    """
    if half is not None and data != "list":
        raise InputError(f"--photo-half {half!r} needs --data list (the bundled set is not split)")
    if data == "list":
        photos = photo_list.select_half(photo_list.photos("train", photos_dir, data_list), half)
        test = {p.path.resolve() for p in BUNDLED if p.name in FORBIDDEN}
        assert not [p.name for p in photos if p.path.resolve() in test], "bundled test photos in the data list"
        return photos
    if data != "bundled":
        raise InputError(f"--data {data!r}: expected 'bundled' or 'list'")
    split = bundled_split()
    by_name = {p.name: p for p in BUNDLED}
    photos = [by_name[n] for n in split["train"]] + list(EXTRA_PHOTOS)
    bad = [p.name for p in photos if p.name in split["test"] or p.name in FORBIDDEN]
    assert not bad, f"test photos in the training set: {bad}"
    return photos


class CropSampler:
    """Random multi-scale crops with flips and colour gain, driven only by a torch.Generator.

    Each photo is pre-resized to a few scales, so crops show both detail and whole-object
    structure: `scale_mode="fraction"` (v2) uses 0.25x-1x of full resolution, `"short_side"` (v3)
    resizes the short side to SHORT_SIDES pixels (plus the native size if below the largest), so a
    5120 px wallpaper and a 360 px photo are seen at the same scales as the 256 px held-out crops.
    `weights` (optional, per photo) makes the photo draw weighted; None keeps v2's uniform draw.
    Levels are cached as uint8, shared by every sampler of the process (one decode per photo
    and scale for all stages; a few hundred photos at 7 scales stay around a GB).
    """

    _CACHE: dict[tuple[str, int, int], torch.Tensor] = {}

    SCALES = (0.25, 0.33, 0.42, 0.5, 0.6, 0.72, 0.85, 1.0)
    SHORT_SIDES = (128, 192, 256, 320, 384, 512, 768)

    def __init__(self, photos: Sequence, crop: int, gain: float, generator: torch.Generator,
                 scale_mode: str = "fraction", weights: Optional[Sequence[float]] = None) -> None:
        if scale_mode not in ("fraction", "short_side"):
            raise ValueError(f"scale_mode {scale_mode!r}: expected 'fraction' or 'short_side'")
        self.crop, self.gain, self.g, self.scale_mode = crop, gain, generator, scale_mode
        self.photos = list(photos)
        self.weights = None if weights is None else torch.tensor(list(weights), dtype=torch.float64)
        self.sizes: list[list[tuple[int, int]]] = []  # (w, h) of each usable scale level
        self._full: dict[int, Image.Image] = {}
        for p in self.photos:
            with Image.open(p.path) as im:
                fw, fh = im.size
            if scale_mode == "fraction":
                sizes = [(max(1, round(fw * s)), max(1, round(fh * s))) for s in self.SCALES]
            else:
                short = min(fw, fh)
                sides = [s for s in self.SHORT_SIDES if s < short]
                if short <= self.SHORT_SIDES[-1]:
                    sides.append(short)
                sizes = [(fw, fh) if s == short else (round(fw * s / short), round(fh * s / short)) for s in sides]
            sizes = [(w, h) for w, h in sizes if min(w, h) >= crop]
            if not sizes:  # photo smaller than the crop: upsample it once to fit
                s = crop / min(fw, fh)
                sizes = [(math.ceil(fw * s), math.ceil(fh * s))]
            self.sizes.append(sizes)

    def _key(self, k: int, level: int) -> tuple[str, int, int]:
        return (str(self.photos[k].path), *self.sizes[k][level])

    def level(self, k: int, level: int) -> torch.Tensor:
        """Photo k at scale level `level` as (3, H, W) uint8, bicubic from full res (resized lazily:
        a fast --check-steps touches only the photos its first steps draw)."""
        key = self._key(k, level)
        if key not in self._CACHE:
            if k not in self._full:
                self._full[k] = Image.fromarray(read_image(self.photos[k].path))
            full = self._full[k]
            w, h = self.sizes[k][level]
            im = full if (w, h) == full.size else full.resize((w, h), Image.BICUBIC)
            self._CACHE[key] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
            if all(self._key(k, j) in self._CACHE for j in range(len(self.sizes[k]))):
                del self._full[k]  # every level is cached: the full-res photo is no longer needed
        return self._CACHE[key]

    def prefill(self) -> None:
        """Resize every photo to every level now, so a stage's step-cost calibration does not
        time photo decoding (hundreds of multi-megapixel files)."""
        for k in range(len(self.photos)):
            for j in range(len(self.sizes[k])):
                self.level(k, j)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.g))

    def draw(self) -> tuple:
        """One crop's parameters (photo, level, top, left, flip, gain); all randomness is here."""
        if self.weights is None:
            k = self._randint(len(self.sizes))
        else:
            k = int(torch.multinomial(self.weights, 1, generator=self.g))
        level = self._randint(len(self.sizes[k]))
        w, h = self.sizes[k][level]
        top, left = self._randint(h - self.crop + 1), self._randint(w - self.crop + 1)
        flip = bool(self._randint(2))
        gain = 1.0 + self.gain * (2.0 * torch.rand(3, 1, 1, generator=self.g) - 1.0)
        return k, level, top, left, flip, gain

    def render(self, params: tuple) -> torch.Tensor:
        """(3, crop, crop) in [0, 1] for parameters from draw()."""
        k, level, top, left, flip, gain = params
        x = self.level(k, level)[:, top:top + self.crop, left:left + self.crop].float() / 255.0
        if flip:
            x = x.flip(-1)
        return (x * gain).clamp(0.0, 1.0)

    def batch(self, n: int) -> torch.Tensor:
        """(n, 3, crop, crop) in [0, 1]."""
        return torch.stack([self.render(self.draw()) for _ in range(n)])


def package_weights(photos: Sequence) -> Optional[list[float]]:
    """Per-photo draw weights giving each source package a share proportional to sqrt(its count).

    Why: 270 of the ~310 v3 photos are landscapes from one package; uniform draws would make the
    few close-ups (flowers, objects, people) rare, and the held-out package is mostly close-ups.
    None for v2's bundled photos (uniform, as recorded).
    """
    pkgs = [getattr(p, "package", None) for p in photos]
    if not all(isinstance(p, str) for p in pkgs) or not hasattr(photos[0], "caption"):
        return None
    count = {k: pkgs.count(k) for k in set(pkgs)}
    return [math.sqrt(count[k]) / count[k] for k in pkgs]


class LatentBank:
    """`size` fixed random training crops, VAE-encoded lazily one at a time and cached.

    Lazy, one image per encode, so that `--check-steps` can reproduce the first UNet steps by
    encoding only the ~100 crops they touch, with the same numerics as the full run.
    """

    def __init__(self, vae, sampler: CropSampler, size: int) -> None:
        self.vae, self.sampler = vae, sampler
        self.params = [sampler.draw() for _ in range(size)]
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.params)

    def photo(self, i: int) -> int:
        return self.params[i][0]

    @torch.no_grad()
    def get(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        for i in idx:
            if i not in self.cache:
                dist = self.vae.encode(self.sampler.render(self.params[i])[None] * 2.0 - 1.0).latent_dist
                self.cache[i] = (dist.mean[0], dist.std[0])
        return (torch.stack([self.cache[i][0] for i in idx]), torch.stack([self.cache[i][1] for i in idx]))


# --- schedule -------------------------------------------------------------------------------
def lr_at(step: int, base: float, warmup: int, total: Optional[int]) -> float:
    """Linear warmup, then cosine decay to 5% over `total` steps (None = still calibrating)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if total is None:
        return base
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac)))


#: optional wall-clock deadline (time.perf_counter() value) for every stage: --wall-limit-minutes
WALL_DEADLINE: Optional[float] = None


class StepBudget:
    """Fixes the schedule length from the measured step cost after `calib` steps (or takes it).

    clock="wall" measures wall time (v1/v2); clock="cpu" measures this process's CPU time, so on a
    shared, niced machine the schedule length depends on what a step costs, not on how much CPU
    the neighbours left over (the wall time then stretches instead). Either way the record holds
    the schedule length, and `--vae-steps/--unet-steps` replay it exactly. `stopped_by` says why a
    stage ended ("schedule", or a safety net: "budget x1.5" or "wall limit").
    """

    def __init__(self, minutes: float, steps: Optional[int], calib: int, clock: str = "wall") -> None:
        if clock not in ("wall", "cpu"):
            raise ValueError(f"clock {clock!r}: expected 'wall' or 'cpu'")
        self.seconds, self.total, self.calib, self.clock = minutes * 60.0, steps, calib, clock
        self.start = self._now()
        self.stopped_by: Optional[str] = None

    def _now(self) -> float:
        return time.process_time() if self.clock == "cpu" else time.perf_counter()

    def update(self, step: int) -> None:
        if self.total is None and step == self.calib:
            rate = step / (self._now() - self.start)
            self.total = max(step + 1, int(self.seconds * rate))

    def done(self, step: int) -> bool:
        if self.total is not None and step >= self.total:
            self.stopped_by = "schedule"
            return True
        # safety nets: much slower than calibrated, or past the run's wall limit -> stop; the
        # record says where (steps_run < schedule_steps, stopped_by)
        if self._now() - self.start > 1.5 * self.seconds + 60:
            self.stopped_by = "budget x1.5"
        elif WALL_DEADLINE is not None and time.perf_counter() > WALL_DEADLINE:
            self.stopped_by = "wall limit"
        return self.stopped_by is not None


class LossTrack:
    """Clipped optimizer step plus the loss bookkeeping every stage records (first 5, EMA).

    Why one class: the first losses are what the determinism test replays, so every stage must
    record them the same way.
    """

    def __init__(self, opt: torch.optim.Optimizer, params) -> None:
        self.opt, self.params = opt, list(params)
        self.first: list[float] = []
        self.ema: Optional[float] = None
        self.step = 0

    def descend(self, loss: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        v = float(loss.detach())  # one sync a step: CPU training, the log needs it anyway
        if self.step < 5:
            self.first.append(v)
        self.ema = v if self.ema is None else 0.99 * self.ema + 0.01 * v
        self.step += 1
        return v


# --- VAE stage ------------------------------------------------------------------------------
def vae_loss(vae, x: torch.Tensor, g: torch.Generator, kl_weight: float) -> torch.Tensor:
    """MSE on [-1,1] + per-pixel KL; posterior sampled from the generator."""
    xm = x * 2.0 - 1.0
    dist = vae.encode(xm).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
    rec = vae.decode(z).sample
    mse = F.mse_loss(rec, xm)
    kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).sum() / xm.numel()
    return mse + kl_weight * kl


def train_vae(vae, photos, st: Settings, minutes: float, steps: Optional[int], stop_after: Optional[int] = None,
              log=print) -> dict:
    g = torch.Generator().manual_seed(st.seed * 1000 + 1)
    sampler = CropSampler(photos, st.vae_crop, st.gain, g, st.scale_mode, package_weights(photos))
    if st.data == "list" and stop_after is None:
        sampler.prefill()
    opt = torch.optim.Adam(vae.parameters(), lr=st.vae_lr)
    vae.train()
    budget = StepBudget(minutes, steps, st.calib_steps, st.clock)
    track, t0 = LossTrack(opt, vae.parameters()), time.perf_counter()
    while not budget.done(track.step) and (stop_after is None or track.step < stop_after):
        for group in opt.param_groups:
            group["lr"] = lr_at(track.step, st.vae_lr, st.vae_warmup, budget.total)
        x = sampler.batch(st.vae_batch)
        track.descend(vae_loss(vae, x, g, st.vae_kl))
        step, ema = track.step, track.ema
        budget.update(step)
        if step % 200 == 0:
            psnr = 10 * math.log10(4.0 / max(ema, 1e-12))
            el = time.perf_counter() - t0
            log(f"vae step {step}/{budget.total} loss(ema) {ema:.5f} (~{psnr:.1f} dB) {el:.0f}s {step / el:.2f} it/s")
    vae.eval()
    return dict(steps_run=track.step, schedule_steps=budget.total, first_losses=track.first,
                final_loss_ema=track.ema, seconds=time.perf_counter() - t0, stopped_by=budget.stopped_by)


@torch.no_grad()
def latent_std(vae, photos, st: Settings, n: int = 256) -> float:
    """Std of the posterior means of training crops (the scaling factor makes it 1)."""
    g = torch.Generator().manual_seed(st.seed * 1000 + 2)
    sampler = CropSampler(photos, st.unet_crop, st.gain, g, st.scale_mode, package_weights(photos))
    zs = [vae.encode(sampler.batch(32) * 2.0 - 1.0).latent_dist.mean for _ in range(n // 32)]
    return float(torch.cat(zs).std())


# --- decoder refinement (stage 3) ---------------------------------------------------------
def decoder_parameters(vae) -> list:
    return list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())


def refine_decoder(vae, photos, ds: DecoderSettings, steps: Optional[int], stop_after: Optional[int] = None,
                   log=print, minutes: float = math.inf) -> dict:
    """Train only post_quant_conv + decoder; the encoder and quant_conv are frozen.

    Loss: MSE on [-1, 1] + ds.ssim_weight * (1 - SSIM) on [0, 1] (piq, no downsampling), decoding
    a posterior *sample* (drawn from an explicit generator), as img2img's encode does.
    Adam, linear warm-up, then cosine to 5% over exactly `steps` steps (or, with steps=None, the
    steps that fit in `minutes` at the rate of the first 30); grad clip 1.
    """
    import piq

    g = torch.Generator().manual_seed(ds.seed * 1000 + 5)
    sampler = CropSampler(photos, ds.crop, ds.gain, g, ds.scale_mode, package_weights(photos))
    if ds.scale_mode == "short_side" and stop_after is None:
        sampler.prefill()
    vae.requires_grad_(False)
    params = decoder_parameters(vae)
    for prm in params:
        prm.requires_grad_(True)
    vae.eval()
    vae.decoder.train()
    opt = torch.optim.Adam(params, lr=ds.lr)
    track, t0, ema_mse = LossTrack(opt, params), time.perf_counter(), None
    budget = StepBudget(minutes, steps, 30, ds.clock)
    while not budget.done(track.step) and (stop_after is None or track.step < stop_after):
        for group in opt.param_groups:
            group["lr"] = lr_at(track.step, ds.lr, ds.warmup, budget.total)
        x = sampler.batch(ds.batch)
        xm = x * 2.0 - 1.0
        with torch.no_grad():
            dist = vae.encode(xm).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
            if ds.latent_noise > 0:  # decode what a denoiser hands over: latents with some error left
                sigma = torch.rand(len(z), 1, 1, 1, generator=g) * ds.latent_noise
                z = z + sigma / float(vae.config.scaling_factor) * torch.randn(z.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, xm)
        loss = mse
        if ds.ssim_weight:
            s = piq.ssim(((rec + 1.0) / 2.0).clamp(0, 1), x, data_range=1.0, downsample=False)
            loss = mse + ds.ssim_weight * (1.0 - s)
        track.descend(loss)
        m = float(mse.detach())
        ema_mse = m if ema_mse is None else 0.99 * ema_mse + 0.01 * m
        step, ema = track.step, track.ema
        budget.update(step)
        if step % 100 == 0:
            el = time.perf_counter() - t0
            psnr = 10 * math.log10(4.0 / max(ema_mse, 1e-12))
            log(f"decoder step {step}/{budget.total} loss(ema) {ema:.5f} mse(ema) {ema_mse:.5f} (~{psnr:.1f} dB) "
                f"{el:.0f}s {step / el:.2f} it/s")
    vae.eval()
    vae.requires_grad_(False)
    return dict(steps_run=track.step, schedule_steps=budget.total, first_losses=track.first, final_loss_ema=track.ema,
                final_mse_ema=ema_mse, seconds=time.perf_counter() - t0, stopped_by=budget.stopped_by)


def _command(argv: Optional[Sequence[str]], module: str = "zoo.train_tiny") -> str:
    """The command line a record stores, so the stage can be rerun from it."""
    return " ".join([f"python -m {module}"] + list(argv or []))


def _snapshot(module: torch.nn.Module, prefixes: tuple = ("",)) -> dict:
    """Copies of the parameters/buffers whose names start with `prefixes` (all by default)."""
    return {k: v.clone() for k, v in module.state_dict().items() if k.startswith(prefixes)}


def _assert_unchanged(module: torch.nn.Module, before: dict, what: str) -> None:
    """A later stage promises to leave `what` bitwise as it was; hold it to that before saving."""
    after = module.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), f"{what} changed"


def scrub_saved(saved: Path, source: Path) -> None:
    """Keep a re-saved folder free of this machine's paths: components loaded from `source`
    record `_name_or_path`, and a reloaded tokenizer writes runtime keys; both are dropped (the
    tokenizer is frozen, so its files are copied back unchanged)."""
    for cfg in saved.glob("*/config.json"):
        data = json.loads(cfg.read_text())
        if data.pop("_name_or_path", None) is not None:
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if (source / "tokenizer").is_dir() and saved.resolve() != source.resolve():
        shutil.rmtree(saved / "tokenizer", ignore_errors=True)
        shutil.copytree(source / "tokenizer", saved / "tokenizer")


def _write_back(folder: Path, comps: dict, record: dict, force: bool, evaluate_after: bool, log=print,
                reloaded: bool = True) -> None:
    """Save a model to `<folder>.tmp`, evaluate it, record hashes, then move it into place.

    `reloaded`: the components were loaded from `folder` (a later stage), so the saved configs
    are scrubbed of load-time keys.
    """
    from spdbench.targets.base import Target

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    target = Target(**comps, name="tiny", source="spdbench:tiny-trained")
    target.save_pretrained(tmp)
    if reloaded:
        scrub_saved(tmp, folder)
    record["script_version"] = SCRIPT_VERSION
    if evaluate_after:
        from zoo.evaluate_tiny import evaluate

        log("evaluating on held-out photos ...")
        record["heldout"] = evaluate(target)
        log(json.dumps(record["heldout"], indent=1))
    record["weights_sha256"] = weight_hashes(tmp)
    record["folder_bytes"] = folder_bytes(tmp)
    (tmp / TRAINING_JSON).write_text(json.dumps(record, indent=1))
    if folder.exists():
        check_overwrite(folder, force)
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def record_photos(record: dict, photos_dir: Optional[Path]) -> list:
    """The training photos a record was trained on (v2 records predate the data list)."""
    return training_photos(record["settings"].get("data", "bundled"), photos_dir,
                           half=record["settings"].get("photo_half"))


def run_refinement(folder: Path, steps: int, force: bool, threads: int = 1, evaluate_after: bool = True,
                   argv: Optional[Sequence[str]] = None, log=print, latent_noise: float = 0.0,
                   photos_dir: Optional[Path] = None) -> dict:
    """Stage 3 on a shipped folder: refine its decoder, re-evaluate, write the folder back."""
    from spdbench.targets.sd15 import load_sd15

    check_overwrite(folder, force)
    record = json.loads((folder / TRAINING_JSON).read_text())
    if "decoder_refinement" in record:
        raise SystemExit(f"{folder} already holds a refined decoder; refusing to refine twice")
    ds = DecoderSettings(seed=record["settings"]["seed"], threads=threads,
                         gain=record["settings"]["gain"], latent_noise=latent_noise,
                         scale_mode=record["settings"].get("scale_mode", "fraction"))
    torch.set_num_threads(ds.threads)
    photos = record_photos(record, photos_dir)
    shipped = load_sd15(folder, name="tiny")
    comps = shipped.components()
    vae = comps["vae"]
    enc_before = _snapshot(vae, ("encoder.", "quant_conv."))
    t0 = time.perf_counter()
    log(f"decoder refinement: {steps} steps, threads {ds.threads}, settings {ds.__dict__}")
    rec = refine_decoder(vae, photos, ds, steps, log=log)
    _assert_unchanged(vae, enc_before, "encoder")
    for m in comps.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
            m.eval()
    rec["settings"] = ds.__dict__
    rec["threads"] = ds.threads
    rec["frozen"] = "vae.encoder + vae.quant_conv (latent space, scaling factor, UNet unchanged)"
    rec["trained"] = "vae.post_quant_conv + vae.decoder"
    rec["command"] = _command(argv)
    rec["script_version"] = SCRIPT_VERSION
    rec["heldout_before"] = record.get("heldout")
    record["weights_sha256_before_refinement"] = record.get("weights_sha256")
    record["decoder_refinement"] = rec
    rec["wall_seconds"] = time.perf_counter() - t0  # training; evaluation is recorded apart
    _write_back(folder, comps, record, force, evaluate_after, log)
    log(f"saved {folder} ({record['folder_bytes'] / 1e6:.1f} MB); refinement {rec['seconds'] / 60:.1f} min")
    return record


def run_unet_continuation(folder: Path, steps: int, lr: float, force: bool, threads: int = 2,
                          t_focus: float = 0.0, t_max: int = 500, evaluate_after: bool = True,
                          argv: Optional[Sequence[str]] = None, log=print, photos_dir: Optional[Path] = None) -> dict:
    """Stage 2b on a shipped folder: train its UNet `steps` more steps (VAE and text encoder frozen).

    Why: with a good VAE the img2img fidelity is limited by the UNet's denoising, which is
    step-limited; continuing (fresh warm-up + cosine at a lower lr, same data pipeline and seeds
    offset by the stage) is cheaper than retraining. `t_focus` puts that share of the samples at
    t < `t_max`, where every suite's edits (strength <= 0.5) do their denoising. The VAE, hence
    the latent space and every encoder attack's numbers, stays bitwise as it was.
    """
    from dataclasses import replace

    from spdbench.targets.sd15 import load_sd15

    check_overwrite(folder, force)
    record = json.loads((folder / TRAINING_JSON).read_text())
    st = replace(Settings(**record["settings"]), threads=threads, unet_lr=lr, unet_t_focus=t_focus, unet_t_max=t_max,
                 seed=record["settings"]["seed"] + 100 * (1 + len(record.get("unet_continuations", []))))
    torch.set_num_threads(st.threads)
    photos = record_photos(record, photos_dir)
    comps = load_sd15(folder, name="tiny").components()
    vae_before = _snapshot(comps["vae"])
    for m in comps.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
    comps["unet"].requires_grad_(True)
    t0 = time.perf_counter()
    log(f"UNet continuation: {steps} steps, lr {lr}, t-focus {t_focus} below {t_max}, threads {st.threads}, "
        f"data seed {st.seed}")
    # minutes only arms the safety net (stop past 1.5x + 60 s); at >= 1 it/s it never fires
    rec = train_unet(comps, photos, st, minutes=steps / 60.0, steps=steps, log=log)
    comps["unet"].requires_grad_(False)
    comps["unet"].eval()
    _assert_unchanged(comps["vae"], vae_before, "VAE")
    rec.update(settings=dict(st.__dict__), command=_command(argv),
               script_version=SCRIPT_VERSION, heldout_before=record.get("heldout"),
               weights_sha256_before=record.get("weights_sha256"))
    rec["wall_seconds"] = time.perf_counter() - t0
    record.setdefault("unet_continuations", []).append(rec)
    _write_back(folder, comps, record, force, evaluate_after, log)
    log(f"saved {folder} ({record['folder_bytes'] / 1e6:.1f} MB); continuation {rec['wall_seconds'] / 60:.1f} min")
    return record


# --- UNet stage -----------------------------------------------------------------------------
@torch.no_grad()
def prompt_table(components: dict, photos: Sequence[Photo]) -> tuple[list[str], torch.Tensor]:
    """All prompts (empty, suite prompts, captions) and their frozen text embeddings."""
    prompts = [""] + list(SUITE_PROMPTS) + sorted({caption_of(p) for p in photos})
    tok = components["tokenizer"]
    ids = tok(prompts, padding="max_length", truncation=True, max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    return prompts, components["text_encoder"](ids)[0]


def train_unet(components: dict, photos, st: Settings, minutes: float, steps: Optional[int],
               stop_after: Optional[int] = None, log=print, prefill: bool = True) -> dict:
    from diffusers import DDPMScheduler

    vae, unet = components["vae"], components["unet"]
    sf = float(vae.config.scaling_factor)
    prompts, emb = prompt_table(components, photos)
    caption_row = [prompts.index(caption_of(p)) for p in photos]
    bank = LatentBank(vae, CropSampler(photos, st.unet_crop, st.gain,
                                       torch.Generator().manual_seed(st.seed * 1000 + 3), st.scale_mode,
                                       package_weights(photos)), st.bank_size)
    if prefill:  # encode the whole bank before timing, so the step-rate calibration is honest
        bank.get(range(len(bank)))
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                   if k not in ("set_alpha_to_one", "steps_offset")})
    g = torch.Generator().manual_seed(st.seed * 1000 + 4)
    opt = torch.optim.AdamW(unet.parameters(), lr=st.unet_lr, weight_decay=1e-4)
    unet.train()
    budget = StepBudget(minutes, steps, st.calib_steps, st.clock)
    track, t0 = LossTrack(opt, unet.parameters()), time.perf_counter()
    n_suite = len(SUITE_PROMPTS)
    while not budget.done(track.step) and (stop_after is None or track.step < stop_after):
        for group in opt.param_groups:
            group["lr"] = lr_at(track.step, st.unet_lr, st.unet_warmup, budget.total)
        b = st.unet_batch
        pick = torch.randint(len(bank), (b,), generator=g).tolist()
        mean, std = bank.get(pick)
        z = (mean + std * torch.randn(mean.shape, generator=g)) * sf
        flip = torch.rand(b, generator=g) < 0.5  # latent flips: cheap extra augmentation
        z = torch.where(flip[:, None, None, None], z.flip(-1), z)
        u = torch.rand(b, generator=g)
        suite = torch.randint(n_suite, (b,), generator=g)
        rows = [0 if u[i] < P_EMPTY else (1 + int(suite[i]) if u[i] < P_EMPTY + P_SUITE
                                          else caption_row[bank.photo(pick[i])]) for i in range(b)]
        cond = emb[rows]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=g)
        if st.unet_t_focus > 0:  # extra draws only when asked: the default stream stays as recorded
            low = torch.rand(b, generator=g) < st.unet_t_focus
            t = torch.where(low, torch.randint(0, st.unet_t_max, (b,), generator=g), t)
        noisy = noise_sched.add_noise(z, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        track.descend(F.mse_loss(pred, noise))
        step, ema = track.step, track.ema
        budget.update(step)
        if step % 100 == 0:
            el = time.perf_counter() - t0
            log(f"unet step {step}/{budget.total} loss(ema) {ema:.5f} {el:.0f}s {step / el:.2f} it/s")
    unet.eval()
    return dict(steps_run=track.step, schedule_steps=budget.total, first_losses=track.first,
                final_loss_ema=track.ema, seconds=time.perf_counter() - t0, prompts=prompts,
                stopped_by=budget.stopped_by)


# --- saving / guard -------------------------------------------------------------------------
def check_overwrite(out: Path, force: bool) -> None:
    """Refuse to replace a shipped model folder unless --force (the weights are the record)."""
    if out.exists() and any(out.iterdir()) and not force:
        raise SystemExit(f"{out} already holds a model; pass --force to overwrite it")


def weight_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _settings_from(args) -> Settings:
    st = Settings(seed=args.seed, threads=args.threads, data=args.data,
                  scale_mode="short_side" if args.data == "list" else "fraction", clock=args.clock,
                  photo_half=args.photo_half)
    if args.bank_size is not None:
        st.bank_size = args.bank_size
    return st


def data_record(photos: Sequence, st: Settings, data_list: Path) -> dict:
    """What the record says about the data: every file with package, licence, sha256, caption."""
    rows = []
    for p in photos:
        if hasattr(p, "caption"):  # a data-list photo (hash already verified on load)
            rows.append(dict(name=p.name, file=p.file, package=p.package, license=p.license,
                             sha256=p.sha256, caption=p.caption))
        else:
            rows.append(dict(name=p.name, file=p.relpath, package=p.package, license=p.license,
                             sha256=sha256_file(p.path), caption=CAPTIONS[p.name]))
    out = dict(photos=rows)
    if st.data == "list":
        out.update(data_list=data_list.name, data_list_sha256=sha256_file(data_list),
                   draw_weights="per package, share proportional to sqrt(photos in the package)")
        if st.photo_half is not None:
            out.update(photo_half=st.photo_half, photos_in_half=len(rows),
                       photo_half_rule="half a: the photo's sha256 starts with 0-7; b: with 8-f (photos.half_of)")
    return out


def check_steps(k: int, folder: Path = TRAINED_DIR, threads: Optional[int] = None,
                photos_dir: Optional[Path] = None) -> dict:
    """Rerun the first k optimizer steps of both stages from the recorded seed; no saving.

    The UNet stage runs on the shipped VAE (its weights and scaling factor), exactly as training
    did after the VAE stage, so its first losses are comparable too.
    """
    from spdbench.targets.sd15 import load_sd15

    record = json.loads((folder / TRAINING_JSON).read_text())
    st = Settings(**record["settings"])
    torch.set_num_threads(threads or st.threads)
    photos = record_photos(record, photos_dir)
    comps = build_tiny_components(st.seed)
    vae_rec = record["vae"]
    # minutes=inf: no wall-clock safety net here, a loaded machine must not cut the replay short
    vae_out = train_vae(comps["vae"], photos, st, math.inf, vae_rec["schedule_steps"], stop_after=k,
                        log=lambda *_: None)
    shipped = load_sd15(folder)
    comps["vae"] = shipped.vae
    comps["vae"].requires_grad_(False)
    comps["unet"].requires_grad_(True)
    unet_out = train_unet(comps, photos, st, math.inf, record["unet"]["schedule_steps"], stop_after=k,
                          log=lambda *_: None, prefill=False)
    return dict(vae=vae_out["first_losses"], unet=unet_out["first_losses"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=TRAINED_DIR)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--vae-minutes", type=float, default=20.0)
    ap.add_argument("--unet-minutes", type=float, default=25.0)
    ap.add_argument("--vae-steps", type=int, default=None, help="schedule length; overrides the budget")
    ap.add_argument("--unet-steps", type=int, default=None, help="schedule length; overrides the budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check-steps", type=int, default=None, metavar="K")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out figures")
    ap.add_argument("--refine-latent-noise", type=float, default=0.0, metavar="S",
                    help="stage 3: decode latents with noise of std U(0, S) (scaled units) added")
    ap.add_argument("--refine-decoder-steps", type=int, default=None, metavar="N",
                    help="stage 3 only: refine the decoder of --out for N steps (needs --from-shipped)")
    ap.add_argument("--continue-unet-steps", type=int, default=None, metavar="N",
                    help="stage 2b only: train the UNet of --out N more steps (needs --from-shipped)")
    ap.add_argument("--continue-unet-lr", type=float, default=5e-4)
    ap.add_argument("--continue-unet-t-focus", type=float, default=0.0, metavar="P",
                    help="stage 2b: share of samples drawn at t < --continue-unet-t-max")
    ap.add_argument("--continue-unet-t-max", type=int, default=500)
    ap.add_argument("--from-shipped", action="store_true", help="start from the model already in --out")
    ap.add_argument("--data", choices=("bundled", "list"), default="bundled",
                    help="bundled: v2's 12 photos; list: the train split of --data-list (v3)")
    ap.add_argument("--data-list", type=Path, default=photo_list.DATA_LIST)
    ap.add_argument("--photos", type=Path, default=None, metavar="DIR",
                    help="where `python -m zoo.photos fetch DIR` put the Debian photos")
    ap.add_argument("--photo-half", choices=photo_list.HALVES, default=None,
                    help="with --data list: train on that half of the train split only (by sha256; a sibling model)")
    ap.add_argument("--bank-size", type=int, default=None, help="UNet latent bank size (default 2048)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="what the --*-minutes budgets measure (cpu: this process's CPU time; for shared machines)")
    ap.add_argument("--wall-limit-minutes", type=float, default=None, metavar="W",
                    help="stop any stage past W wall minutes from the start (recorded as stopped_by)")
    ap.add_argument("--refine-minutes", type=float, default=None, metavar="M",
                    help="after the UNet, stage 5 (decoder on noisy latents, --refine-latent-noise) for M minutes")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    if args.continue_unet_steps is not None:
        if not args.from_shipped:
            raise SystemExit("--continue-unet-steps works on an existing model: pass --from-shipped")
        run_unet_continuation(args.out, args.continue_unet_steps, args.continue_unet_lr, args.force,
                              threads=args.threads, t_focus=args.continue_unet_t_focus,
                              t_max=args.continue_unet_t_max, evaluate_after=not args.no_eval,
                              argv=argv, log=log, photos_dir=args.photos)
        return 0

    if args.refine_decoder_steps is not None:
        if not args.from_shipped:
            raise SystemExit("--refine-decoder-steps works on an existing model: pass --from-shipped")
        run_refinement(args.out, args.refine_decoder_steps, args.force, threads=args.threads,
                       evaluate_after=not args.no_eval, latent_noise=args.refine_latent_noise,
                       argv=argv, log=log, photos_dir=args.photos)
        return 0

    if args.check_steps is not None:
        out = check_steps(args.check_steps, args.out, threads=args.threads, photos_dir=args.photos)
        print(json.dumps(out))
        return 0

    check_overwrite(args.out, args.force)
    global WALL_DEADLINE
    if args.wall_limit_minutes is not None:
        WALL_DEADLINE = time.perf_counter() + 60.0 * args.wall_limit_minutes
    st = _settings_from(args)
    torch.set_num_threads(st.threads)
    torch.manual_seed(st.seed)  # belt and braces; every random draw below uses explicit generators
    photos = training_photos(st.data, args.photos, args.data_list, st.photo_half)
    t_start = time.perf_counter()
    comps = build_tiny_components(st.seed)
    for m in ("unet", "text_encoder"):
        comps[m].requires_grad_(False)
    log(f"training photos ({len(photos)}): {[p.name for p in photos][:20]}{' ...' if len(photos) > 20 else ''}; "
        f"threads {st.threads}")
    vae_rec = train_vae(comps["vae"], photos, st, args.vae_minutes, args.vae_steps, log=log)
    comps["vae"].requires_grad_(False)
    std = latent_std(comps["vae"], photos, st)
    comps["vae"].register_to_config(scaling_factor=1.0 / std)
    log(f"vae done: {vae_rec['steps_run']} steps; latent std {std:.4f} -> scaling_factor {1.0 / std:.5f}")

    comps["unet"].requires_grad_(True)
    unet_rec = train_unet(comps, photos, st, args.unet_minutes, args.unet_steps, log=log)
    comps["unet"].requires_grad_(False)
    log(f"unet done: {unet_rec['steps_run']} steps")
    refine_rec = None
    if args.refine_minutes:
        ds = DecoderSettings(seed=st.seed, threads=st.threads, gain=st.gain, latent_noise=args.refine_latent_noise,
                             scale_mode=st.scale_mode, clock=st.clock)
        enc_before = _snapshot(comps["vae"], ("encoder.", "quant_conv."))
        log(f"decoder refinement: {args.refine_minutes} min, settings {ds.__dict__}")
        refine_rec = refine_decoder(comps["vae"], photos, ds, None, log=log, minutes=args.refine_minutes)
        _assert_unchanged(comps["vae"], enc_before, "encoder")
        refine_rec.update(settings=ds.__dict__, threads=ds.threads, trained="vae.post_quant_conv + vae.decoder",
                          frozen="vae.encoder + vae.quant_conv (latent space, scaling factor, UNet unchanged)")
        log(f"decoder refinement done: {refine_rec['steps_run']} steps")

    record = dict(
        script="zoo.train_tiny", script_version=SCRIPT_VERSION,
        command=_command(argv),
        settings=st.__dict__, threads=st.threads,
        text_encoder="frozen at its seeded random init (build_tiny_components(seed)); prompts embedded once",
        torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
        data=data_record(photos, st, args.data_list) if st.data == "list" else
        [dict(name=p.name, file=p.relpath, package=p.package, license=p.license,
              sha256=sha256_file(p.path), caption=CAPTIONS[p.name]) for p in photos],
        vae=vae_rec, latent_std=std, scaling_factor=1.0 / std,
        unet=unet_rec, wall_seconds=time.perf_counter() - t_start, cpu_seconds=time.process_time(),
        wall_limit_minutes=args.wall_limit_minutes,
    )
    if refine_rec is not None:
        record["decoder_refinement"] = refine_rec
    _write_back(args.out, comps, record, args.force, not args.no_eval, log, reloaded=False)
    log(f"saved {args.out} ({record['folder_bytes'] / 1e6:.1f} MB) in {record['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
