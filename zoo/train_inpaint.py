"""Train `tiny-inpaint`: the SD-inpainting UNet (9 input channels) on top of the shipped `tiny`.

Why this shape: Stable Diffusion's inpainting model is SD1.5's UNet with 5 extra input channels
(the mask at latent resolution and the VAE latent of the masked photo), zero-initialised and
fine-tuned on random masks, with the VAE and text encoder unchanged; diffusers'
`StableDiffusionInpaintPipeline` drives it. `tiny-inpaint` is made the same way from `tiny`: its
UNet starts as tiny's (the extra conv_in channels at zero, so step 0 is tiny's denoiser), the VAE
and text encoder are tiny's and stay frozen, and only the UNet is trained, on the same photos,
crops and prompts as tiny's UNet stage, with box, free-form stroke and full masks
(`spdbench.data.masks`). The folder holds only the UNet and the record; `load_target("tiny-inpaint")`
pairs it with tiny's other components after checking tiny's weights are the ones it was trained on.

Usage::

    python -m zoo.train_inpaint --photos DIR --steps N [--out DIR] [--parent DIR] [--threads T]

One step: a batch of bank crops (latents cached, as in tiny's UNet stage), a mask per crop, the
masked crop (x * (mask < 0.5), the pipeline's rule) encoded with a posterior sample, then the
noise-prediction MSE of the 9-channel UNet. Deterministic from `--seed`; the record holds the
first losses, the schedule, the parent's weight hashes and the mask mix.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from spdbench.data.masks import latent_mask, random_masks
from spdbench.targets.inpaint import inpaint_unet_from  # noqa: F401 - the widening lives with the loaders
from spdbench.targets.tiny import INPAINT_DIR, SCHEDULER_CONFIG, V3_DIR
from zoo.train_tiny import (P_EMPTY, P_SUITE, SUITE_PROMPTS, TRAINING_JSON, CropSampler, LatentBank, LossTrack,
                         StepBudget, _command, caption_of, check_overwrite, folder_bytes, lr_at, package_weights,
                         prompt_table, record_photos, weight_hashes)

SCRIPT_VERSION = "1"


@dataclass
class InpaintSettings:
    seed: int = 0
    threads: int = 1
    batch: int = 32
    crop: int = 128
    lr: float = 5e-4
    warmup: int = 50
    bank_size: int = 4096
    gain: float = 0.10
    mask_kinds: tuple = ("box", "strokes", "full")
    mask_weights: tuple = (0.45, 0.45, 0.10)   # SD-inpainting repainted whole images part of the time too
    flip: bool = True
    # Truncated-SNR weighting (Salimans & Ho 2022): the noise-prediction loss times
    # max(1, min(1/SNR(t), snr_cap)), i.e. the x0-space error where noise dominates. Why: at the
    # noisiest steps, where a strength-1 inpainting starts, the noise MSE barely depends on the
    # photo (noisy ~ noise), so an unweighted loss never teaches the UNet to read the masked-image
    # latent there (measured: 800 unweighted steps left the kept region at 13 dB from t=999).
    # 1.0 = unweighted (script version 1).
    snr_cap: float = 1.0


def loss_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, cap: float) -> torch.Tensor:
    """max(1, min(1/SNR(t), cap)) per sample: x0-space weighting truncated at both ends."""
    a = alphas_cumprod[t]
    return ((1 - a) / a).clamp(min=1.0, max=max(1.0, cap))


def unet_input(noisy: torch.Tensor, mask: torch.Tensor, masked_latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's channel order: noisy latent, mask, masked-image latent."""
    return torch.cat([noisy, mask, masked_latents], dim=1)


def train(parent: Path, photos, st: InpaintSettings, steps: int, log=print, stop_after: Optional[int] = None,
          init: Optional[Path] = None) -> tuple:
    """Train the inpainting UNet; returns (target with the new UNet, stage record).

    `init`: a tiny-inpaint folder whose UNet to start from instead of the widened parent's
    (continued training; the record names it)."""
    from diffusers import DDPMScheduler

    from spdbench.targets.base import Target
    from spdbench.targets.sd15 import load_sd15

    comps = load_sd15(parent, name="tiny").components()
    vae, text_encoder = comps["vae"], comps["text_encoder"]
    for m in (vae, text_encoder, comps["unet"]):
        m.requires_grad_(False)
        m.eval()
    if init is None:
        unet = inpaint_unet_from(comps["unet"])
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(init / "unet")
    unet.requires_grad_(True)
    sf = float(vae.config.scaling_factor)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    prompts, emb = prompt_table(comps, photos)
    caption_row = [prompts.index(caption_of(p)) for p in photos]
    sampler = CropSampler(photos, st.crop, st.gain, torch.Generator().manual_seed(st.seed * 1000 + 7),
                          "short_side", package_weights(photos))
    bank = LatentBank(vae, sampler, st.bank_size)
    if stop_after is None:
        bank.get(range(len(bank)))
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                   if k not in ("set_alpha_to_one", "steps_offset")})
    g = torch.Generator().manual_seed(st.seed * 1000 + 8)
    gm = torch.Generator().manual_seed(st.seed * 1000 + 9)  # masks: their own stream
    opt = torch.optim.AdamW(unet.parameters(), lr=st.lr, weight_decay=1e-4)
    unet.train()
    budget = StepBudget(steps / 30.0, steps, 30)  # minutes only arm the safety net (>= 0.5 it/s)
    track, t0 = LossTrack(opt, unet.parameters()), time.perf_counter()
    n_suite = len(SUITE_PROMPTS)
    while not budget.done(track.step) and (stop_after is None or track.step < stop_after):
        for group in opt.param_groups:
            group["lr"] = lr_at(track.step, st.lr, st.warmup, budget.total)
        b = st.batch
        pick = torch.randint(len(bank), (b,), generator=g).tolist()
        mean, std = bank.get(pick)
        x = torch.stack([sampler.render(bank.params[i]) for i in pick]) * 2.0 - 1.0
        mask = random_masks(b, st.crop, gm, st.mask_kinds, st.mask_weights)
        flip = (torch.rand(b, generator=g) < 0.5) if st.flip else torch.zeros(b, dtype=torch.bool)
        fl = flip[:, None, None, None]
        x, mask = torch.where(fl, x.flip(-1), x), torch.where(fl, mask.flip(-1), mask)
        z = (mean + std * torch.randn(mean.shape, generator=g)) * sf
        z = torch.where(fl, z.flip(-1), z)
        with torch.no_grad():
            dist = vae.encode(x * (mask < 0.5)).latent_dist
            masked = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * sf
        u = torch.rand(b, generator=g)
        suite = torch.randint(n_suite, (b,), generator=g)
        rows = [0 if u[i] < P_EMPTY else (1 + int(suite[i]) if u[i] < P_EMPTY + P_SUITE
                                          else caption_row[bank.photo(pick[i])]) for i in range(b)]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=g)
        noisy = noise_sched.add_noise(z, noise, t)
        pred = unet(unet_input(noisy, latent_mask(mask, factor), masked), t, encoder_hidden_states=emb[rows]).sample
        w = loss_weight(noise_sched.alphas_cumprod, t, st.snr_cap)
        track.descend((w * ((pred - noise) ** 2).mean((1, 2, 3))).mean())
        budget.update(track.step)
        if track.step % 50 == 0:
            el = time.perf_counter() - t0
            log(f"inpaint unet step {track.step}/{budget.total} loss(ema) {track.ema:.5f} {el:.0f}s "
                f"{track.step / el:.2f} it/s")
    unet.eval()
    unet.requires_grad_(False)
    comps["unet"] = unet
    rec = dict(steps_run=track.step, schedule_steps=budget.total, first_losses=track.first,
               final_loss_ema=track.ema, seconds=time.perf_counter() - t0, stopped_by=budget.stopped_by)
    return Target(**comps, name="tiny-inpaint", source="spdbench:tiny-inpaint"), rec


def save(target, out: Path, record: dict, force: bool) -> None:
    """Write only the UNet and the record (tmp folder, then move): the rest is the parent's."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    target.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    record["weights_sha256"] = weight_hashes(tmp)
    record["folder_bytes"] = folder_bytes(tmp)
    (tmp / TRAINING_JSON).write_text(json.dumps(record, indent=1))
    if out.exists():
        check_overwrite(out, force)
        shutil.rmtree(out)
    os.replace(tmp, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.train_inpaint", description=__doc__.split("\n")[0])
    ap.add_argument("--parent", type=Path, default=V3_DIR, help="the tiny folder it builds on (a folder of "
                    "spdbench/targets/assets: the loader finds it there by name)")
    ap.add_argument("--out", type=Path, default=INPAINT_DIR)
    ap.add_argument("--photos", type=Path, default=None, metavar="DIR")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=InpaintSettings.lr)
    ap.add_argument("--snr-cap", type=float, default=InpaintSettings.snr_cap,
                    help="truncated-SNR loss weight cap (1 = unweighted noise MSE)")
    ap.add_argument("--init", type=Path, default=None, metavar="DIR",
                    help="start from this tiny-inpaint folder's UNet (continued training)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--no-eval", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    check_overwrite(args.out, args.force)
    st = InpaintSettings(seed=args.seed, threads=args.threads, lr=args.lr, snr_cap=args.snr_cap)
    torch.set_num_threads(st.threads)
    parent_record = json.loads((args.parent / TRAINING_JSON).read_text())
    photos = record_photos(parent_record, args.photos)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"inpainting UNet on {args.parent} ({len(photos)} photos), {args.steps} steps, threads {st.threads}")
    t0 = time.perf_counter()
    init_record = json.loads((args.init / TRAINING_JSON).read_text()) if args.init else None
    target, rec = train(args.parent, photos, st, args.steps, log=log, init=args.init)
    record = dict(script="zoo.train_inpaint", script_version=SCRIPT_VERSION, command=_command(argv, "zoo.train_inpaint"),
                  settings=asdict(st), unet=rec, torch=torch.__version__, python=platform.python_version(),
                  machine=platform.machine(), parent=str(args.parent.name),
                  parent_weights_sha256=weight_hashes(args.parent),
                  data=dict(photos=len(photos), same_as="the parent's training photos (its training.json)"),
                  frozen="vae + text_encoder (the parent's); trained: unet (conv_in widened to 9 channels, "
                         "new channels zero-initialised)",
                  init=None if init_record is None else dict(folder=str(args.init), record=init_record),
                  wall_seconds=time.perf_counter() - t0, cpu_seconds=time.process_time())
    if not args.no_eval:
        from zoo.evaluate_inpaint import evaluate

        record["heldout"] = evaluate(target, photos_dir=args.photos)
        log(json.dumps({k: v for k, v in record["heldout"].items() if k != "per_image"}, indent=1))
    save(target, args.out, record, args.force)
    log(f"saved {args.out} ({record['folder_bytes'] / 1e6:.1f} MB) in {record['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
