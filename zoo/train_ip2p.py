"""Train `tiny-ip2p`: InstructPix2Pix's 8-channel UNet on top of the shipped `tiny`.

Why this shape: InstructPix2Pix is SD1.5's UNet with 4 extra input channels (the VAE-latent mode
of the input image, unscaled, concatenated after the noisy latent), zero-initialised and
fine-tuned on (input, instruction, edited) triples, with the VAE and text encoder frozen;
diffusers' `StableDiffusionInstructPix2PixPipeline` drives it with an image and a text guidance
scale. `tiny-ip2p` is made the same way from `tiny`, on triples whose edited image is known
exactly: training crops of the offline training photos (never the bundled test photos) and the
scikit-image transforms of `spdbench.data.instructions.EDITS`. As IP2P does, 5% of samples drop
the instruction, 5% the image, 5% both (empty prompt / zero image latent: what the pipeline's
unconditional branches feed), so both guidances work. The folder holds only the UNet and the
record; `load_target("tiny-ip2p")` pairs it with tiny's other components.

Usage::

    python -m zoo.train_ip2p --minutes M [--out DIR] [--parent DIR] [--threads T] [--checkpoint-minutes C]

Wall-clock budget: the cosine schedule's length is fixed from the step rate of the first steps
(StepBudget), a hard wall limit stops it regardless, and the folder is written every
`--checkpoint-minutes`, so a stopped run still leaves a usable model and its record.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

import zoo.train_tiny as tt
from spdbench.data.instructions import EDITS, exact_edit
from spdbench.targets.instruct import ip2p_unet_from
from spdbench.targets.tiny import IP2P_DIR, SCHEDULER_CONFIG, V3_DIR
from zoo.train_inpaint import loss_weight
from zoo.train_tiny import (TRAINING_JSON, CropSampler, LossTrack, StepBudget, _command, check_overwrite, lr_at,
                            package_weights, record_photos, weight_hashes)

SCRIPT_VERSION = "1"


@dataclass
class IP2PSettings:
    seed: int = 0
    threads: int = 1
    batch: int = 32
    crop: int = 64
    lr: float = 5e-4
    warmup: int = 50
    bank_size: int = 2048
    gain: float = 0.10
    p_drop_text: float = 0.05    # IP2P's condition dropout: text only, image only, both
    p_drop_image: float = 0.05
    p_drop_both: float = 0.05
    snr_cap: float = 20.0        # truncated-SNR weight (see zoo.train_inpaint): the edit is decided at high noise
    encode_batch: int = 64


class TripleBank:
    """`size` fixed training crops, each with its VAE latent and the latents of its exact edits.

    Input latents keep the posterior mode (what the pipeline feeds as the image condition); targets
    keep mean and std so each step draws a fresh posterior sample, as the UNet stages of tiny do.
    """

    def __init__(self, vae, sampler: CropSampler, size: int, encode_batch: int) -> None:
        self.instructions = list(EDITS)
        params = [sampler.draw() for _ in range(size)]
        self.cond = torch.empty(size, 4, sampler.crop // 8, sampler.crop // 8)
        k = len(self.instructions)
        self.mean = torch.empty(size, k, *self.cond.shape[1:])
        self.std = torch.empty_like(self.mean)
        with torch.no_grad():
            for lo in range(0, size, encode_batch):
                x = torch.stack([sampler.render(p) for p in params[lo:lo + encode_batch]])
                self.cond[lo:lo + len(x)] = vae.encode(x * 2 - 1).latent_dist.mode()
                for j, ins in enumerate(self.instructions):
                    dist = vae.encode(exact_edit(ins, x) * 2 - 1).latent_dist
                    self.mean[lo:lo + len(x), j], self.std[lo:lo + len(x), j] = dist.mean, dist.std


def _conditions(b: int, st: IP2PSettings, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (drop_text, drop_image) masks with IP2P's 5/5/5 split."""
    u = torch.rand(b, generator=g)
    t_only = u < st.p_drop_text
    i_only = (u >= st.p_drop_text) & (u < st.p_drop_text + st.p_drop_image)
    both = (u >= st.p_drop_text + st.p_drop_image) & (u < st.p_drop_text + st.p_drop_image + st.p_drop_both)
    return t_only | both, i_only | both


def save(unet, out: Path, record: dict) -> None:
    """Write the UNet and the record (tmp folder, then swap): a checkpoint is a complete folder."""
    import os
    import shutil

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    record["weights_sha256"] = weight_hashes(tmp)
    record["folder_bytes"] = tt.folder_bytes(tmp)
    (tmp / TRAINING_JSON).write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def train(parent: Path, photos, st: IP2PSettings, minutes: float, wall_minutes: float, log=print,
          checkpoint=None, checkpoint_minutes: float = 5.0, stop_after: Optional[int] = None) -> tuple:
    """Train the 8-channel UNet; returns (unet, stage record). `checkpoint(unet, rec)` is called
    every `checkpoint_minutes` with the record so far."""
    from diffusers import DDPMScheduler

    from spdbench.targets.sd15 import load_sd15

    comps = load_sd15(parent, name="tiny").components()
    vae, text_encoder = comps["vae"], comps["text_encoder"]
    for m in (vae, text_encoder, comps["unet"]):
        m.requires_grad_(False)
        m.eval()
    unet = ip2p_unet_from(comps["unet"])
    unet.requires_grad_(True)
    sf = float(vae.config.scaling_factor)
    t_start = time.perf_counter()
    tt.WALL_DEADLINE = t_start + wall_minutes * 60.0
    sampler = CropSampler(photos, st.crop, st.gain, torch.Generator().manual_seed(st.seed * 1000 + 11),
                          "short_side", package_weights(photos))
    bank = TripleBank(vae, sampler, st.bank_size, st.encode_batch)
    log(f"bank: {st.bank_size} crops x {len(bank.instructions)} edits encoded in {time.perf_counter() - t_start:.0f}s")
    tok = comps["tokenizer"]
    with torch.no_grad():
        ids = tok([""] + bank.instructions, padding="max_length", truncation=True,
                  max_length=tok.model_max_length, return_tensors="pt").input_ids
        emb = text_encoder(ids)[0]
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                   if k not in ("set_alpha_to_one", "steps_offset")})
    g = torch.Generator().manual_seed(st.seed * 1000 + 12)
    opt = torch.optim.AdamW(unet.parameters(), lr=st.lr, weight_decay=1e-4)
    unet.train()
    remaining = max(1.0, minutes - (time.perf_counter() - t_start) / 60.0)
    budget = StepBudget(remaining, None, 30, "wall")
    track, t0, last_ckpt = LossTrack(opt, unet.parameters()), time.perf_counter(), time.perf_counter()
    curve: list = []
    n_ins = len(bank.instructions)

    def record() -> dict:
        return dict(steps_run=track.step, schedule_steps=budget.total, first_losses=track.first,
                    final_loss_ema=track.ema, loss_curve=curve, seconds=time.perf_counter() - t0,
                    bank_seconds=t0 - t_start, stopped_by=budget.stopped_by, instructions=bank.instructions)

    while not budget.done(track.step) and (stop_after is None or track.step < stop_after):
        for group in opt.param_groups:
            group["lr"] = lr_at(track.step, st.lr, st.warmup, budget.total)
        b = st.batch
        pick = torch.randint(len(bank.cond), (b,), generator=g)
        ins = torch.randint(n_ins, (b,), generator=g)
        mean, std = bank.mean[pick, ins], bank.std[pick, ins]
        z = (mean + std * torch.randn(mean.shape, generator=g)) * sf
        cond = bank.cond[pick]
        flip = (torch.rand(b, generator=g) < 0.5)[:, None, None, None]
        z, cond = torch.where(flip, z.flip(-1), z), torch.where(flip, cond.flip(-1), cond)
        drop_text, drop_image = _conditions(b, st, g)
        text = emb[torch.where(drop_text, torch.zeros_like(ins), ins + 1)]
        cond = cond * (~drop_image)[:, None, None, None]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=g)
        noisy = noise_sched.add_noise(z, noise, t)
        pred = unet(torch.cat([noisy, cond], dim=1), t, encoder_hidden_states=text).sample
        w = loss_weight(noise_sched.alphas_cumprod, t, st.snr_cap)
        track.descend((w * ((pred - noise) ** 2).mean((1, 2, 3))).mean())
        budget.update(track.step)
        if track.step % 25 == 0:
            el = time.perf_counter() - t0
            curve.append([track.step, round(track.ema, 5), round(el, 1)])
            log(f"ip2p unet step {track.step}/{budget.total} loss(ema) {track.ema:.5f} {el:.0f}s "
                f"{track.step / el:.2f} it/s")
        if checkpoint is not None and time.perf_counter() - last_ckpt > checkpoint_minutes * 60:
            checkpoint(unet, dict(record(), stopped_by="checkpoint (run still going)"))
            last_ckpt = time.perf_counter()
    unet.eval()
    unet.requires_grad_(False)
    return unet, record()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.train_ip2p", description=__doc__.split("\n")[0])
    ap.add_argument("--parent", type=Path, default=V3_DIR, help="the tiny folder it builds on")
    ap.add_argument("--out", type=Path, default=IP2P_DIR)
    ap.add_argument("--photos", type=Path, default=None, metavar="DIR",
                    help="the zoo photo folder, when the parent was trained on the data list")
    ap.add_argument("--minutes", type=float, required=True, help="schedule length in wall minutes")
    ap.add_argument("--wall-limit-minutes", type=float, default=None, help="hard stop (default minutes + 5)")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bank-size", type=int, default=IP2PSettings.bank_size)
    ap.add_argument("--crop", type=int, default=IP2PSettings.crop)
    ap.add_argument("--batch", type=int, default=IP2PSettings.batch)
    ap.add_argument("--force", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    check_overwrite(args.out, args.force)
    st = IP2PSettings(seed=args.seed, threads=args.threads, bank_size=args.bank_size, crop=args.crop,
                      batch=args.batch)
    torch.set_num_threads(st.threads)
    parent_record = json.loads((args.parent / TRAINING_JSON).read_text())
    if parent_record["settings"].get("data", "bundled") == "list" and args.photos is None:
        photos = tt.training_photos("bundled")  # the list's photos need a fetch: the offline set instead
        data = "bundled train split + extra photos (tt.training_photos('bundled')); no bundled test photo"
    else:
        photos = record_photos(parent_record, args.photos)
        data = "the parent's training photos (its training.json)"
    log = lambda msg: print(time.strftime("%H:%M:%S ") + msg, flush=True)  # noqa: E731
    log(f"ip2p UNet on {args.parent} ({len(photos)} photos), {args.minutes} min, threads {st.threads}")
    t0 = time.perf_counter()
    base = dict(script="zoo.train_ip2p", script_version=SCRIPT_VERSION, command=_command(argv, "zoo.train_ip2p"),
                settings=asdict(st), torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), parent=str(args.parent.name),
                parent_weights_sha256=weight_hashes(args.parent),
                data=dict(photos=len(photos), names=[p.name for p in photos], source=data),
                edits="spdbench.data.instructions.EDITS (scikit-image: rgb2gray, invert, adjust_gamma 0.5 / 2.0, "
                      "gaussian sigma 2)",
                frozen="vae + text_encoder (the parent's); trained: unet (conv_in widened to 8 channels, "
                       "new channels zero-initialised)")

    def checkpoint(unet, rec: dict) -> None:
        save(unet, args.out, dict(base, unet=rec, wall_seconds=time.perf_counter() - t0,
                                  cpu_seconds=time.process_time()))
        log(f"checkpoint at step {rec['steps_run']} -> {args.out}")

    wall = args.wall_limit_minutes if args.wall_limit_minutes is not None else args.minutes + 5
    unet, rec = train(args.parent, photos, st, args.minutes, wall, log=log, checkpoint=checkpoint,
                      checkpoint_minutes=args.checkpoint_minutes)
    checkpoint(unet, rec)
    log(f"done: {rec['steps_run']} steps, stopped by {rec['stopped_by']}, {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
