"""Held-out figures of an inpainting target: does it really inpaint?

Why these numbers: an inpainting model earns its place in the benchmark only if what it paints
in the hole is closer to the truth than a trivial fill, and if it keeps the rest of the photo.
On held-out 128x128 crops (the quadrants `evaluate_tiny` uses), each with one box mask and one
free-form stroke mask (`spdbench.data.masks`, seeded per crop), diffusers' `StableDiffusionInpaintPipeline`
runs with prompt "", strength 1 (the hole starts from pure noise), 20 DDIM steps, seed i per crop:

- hole PSNR: PSNR over the masked pixels only, model output vs the true photo;
- mean-colour fill: the same, for the hole filled with the kept region's mean colour (per
  channel) -- the baseline the model must beat; the paired difference has a bootstrap CI;
- kept PSNR: PSNR over the unmasked pixels, model output vs the photo (the 9-channel pipeline
  does not paste the photo back: this is the VAE round trip plus what the model changes), next to
  the VAE reconstruction's own kept PSNR, which is the most it can be.

``--samples K`` (K > 1) also paints each crop K times (other seeds) and scores the *average* of the
K paintings. Why: the pipeline draws a sample, and a sample s independent of the truth x given the
context pays E|x - s|^2 = |x - E[x]|^2 + Var(x) + Var(s) -- the conditional variance twice, where a
flat fill pays it once plus its bias. In a large box far from the context the variance dominates,
so a good painter can tie a flat fill on PSNR; the K-sample mean cuts the Var(s) term K-fold and
shows whether the model's *belief* about the hole beats the fill (docs/zoo.md).

Run: ``python -m zoo.evaluate_inpaint [--photos DIR] [--samples K] [--out FILE]``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from spdbench.data.masks import random_masks
from spdbench.scoring.regions import region_psnr
from spdbench.scoring.stats import bootstrap_ci
from zoo.evaluate_tiny import emit, eval_parser, heldout_crops, package_crops

STEPS, GUIDANCE, MASK_SEED = 20, 7.5, 4242
SAMPLE_SEED_STRIDE = 100_000  # sample k of crop i is drawn with seed k * stride + i


def mean_fill(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hole filled with the kept region's mean colour (per image and channel)."""
    keep = 1 - mask
    mean = (x * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp(min=1)
    return x * keep + mean * mask


def masks_for(n: int, kind: str, size: int, seed: int = MASK_SEED) -> torch.Tensor:
    """One mask of `kind` per crop, crop i from its own generator (stable when crops are added)."""
    return torch.cat([random_masks(1, size, torch.Generator().manual_seed(seed + i), (kind,)) for i in range(n)])


@torch.no_grad()
def inpaint(target, x: torch.Tensor, mask: torch.Tensor, prompt: str = "", seed: int = 0,
            batch: int = 16) -> torch.Tensor:
    pipe = target.inpaint()
    out = []
    for lo in range(0, len(x), batch):
        xb, mb = x[lo:lo + batch], mask[lo:lo + batch]
        gens = [torch.Generator().manual_seed(seed + lo + i) for i in range(len(xb))]
        out.append(pipe(prompt=[prompt] * len(xb), image=xb, mask_image=mb, strength=1.0,
                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=gens,
                        height=xb.shape[-2], width=xb.shape[-1], output_type="pt").images.float().cpu().clamp(0, 1))
    return torch.cat(out)


def _summary(v: torch.Tensor) -> dict:
    ci = bootstrap_ci(v.tolist(), seed=0)
    return dict(mean=round(float(v.mean()), 3), ci95=[round(ci.low, 3), round(ci.high, 3)])


def figures(target, x: torch.Tensor, description: str, kinds: Sequence[str] = ("box", "strokes"),
            samples: int = 1) -> dict:
    """Hole and kept PSNR for each mask kind on crops `x`; with `samples` > 1 also the hole PSNR of
    the mean of that many paintings per crop (the first of them is the single-sample figure)."""
    if samples < 1:
        raise ValueError(f"samples={samples!r}: expected an integer >= 1")
    rec = target.reconstruct(x).float().cpu().clamp(0, 1)
    out = dict(images=description, n=len(x), prompt="", strength=1.0, steps=STEPS, guidance=GUIDANCE,
               seeds="torch.Generator(i) per crop; masks torch.Generator(4242 + i)")
    for kind in kinds:
        m = masks_for(len(x), kind, x.shape[-1])
        y = inpaint(target, x, m)
        hole, fill = region_psnr(y, x, m), region_psnr(mean_fill(x, m), x, m)
        kept, kept_vae = region_psnr(y, x, 1 - m), region_psnr(rec, x, 1 - m)
        out[kind] = dict(mask_fraction=round(float(m.mean()), 3), hole_psnr=_summary(hole),
                         mean_fill_psnr=_summary(fill), hole_minus_fill_db=_summary(hole - fill),
                         images_beating_fill=int((hole > fill).sum()),
                         kept_psnr=_summary(kept), kept_psnr_vae_reconstruction=_summary(kept_vae),
                         per_image=dict(hole=[round(float(v), 2) for v in hole],
                                        fill=[round(float(v), 2) for v in fill]))
        if samples > 1:
            out[kind]["sample_mean"] = sample_mean_figures(target, x, m, y, fill, samples)
    return out


def sample_mean_figures(target, x: torch.Tensor, m: torch.Tensor, first: torch.Tensor,
                        fill: torch.Tensor, samples: int) -> dict:
    """The hole PSNR of the mean of `samples` paintings per crop (`first` is painting 0), against
    the fill, and the single paintings' mean hole PSNR for the same crops."""
    ys = [first] + [inpaint(target, x, m, seed=k * SAMPLE_SEED_STRIDE) for k in range(1, samples)]
    singles = torch.stack([region_psnr(y, x, m) for y in ys])  # (samples, crops)
    hole = region_psnr(torch.stack(ys).mean(0), x, m)
    return dict(samples=samples, seeds=f"sample k of crop i: torch.Generator(k * {SAMPLE_SEED_STRIDE} + i)",
                hole_psnr=_summary(hole), hole_minus_fill_db=_summary(hole - fill),
                images_beating_fill=int((hole > fill).sum()),
                single_sample_hole_psnr=_summary(singles.mean(0)),
                per_image=dict(hole=[round(float(v), 2) for v in hole]))


def evaluate(target, photos_dir: Optional[Path] = None, n_photos: Optional[int] = None,
             samples: int = 1) -> dict:
    x = heldout_crops(n_photos)
    res = dict(bundled=figures(target, x, f"{len(x)} quadrants of the bundled test-split photos", samples=samples))
    if photos_dir is not None:
        xp, _names = package_crops(photos_dir)
        res["package"] = figures(target, xp, f"{len(xp)} quadrants of the held-out package's photos",
                                 samples=samples)
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    from spdbench.targets import load_target

    ap = eval_parser("python -m zoo.evaluate_inpaint", __doc__, "tiny-inpaint")
    ap.add_argument("--samples", type=int, default=1, metavar="K",
                    help="also score the mean of K paintings per crop (default 1: the single painting only)")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.samples < 1:
        ap.error(f"--samples {args.samples}: expected an integer >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target)
    # the record names the weights it measured (a docs record is checked against the shipped model)
    emit(dict(target=args.target, target_fingerprint=target.fingerprint,
              **evaluate(target, photos_dir=args.photos, samples=args.samples)), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
