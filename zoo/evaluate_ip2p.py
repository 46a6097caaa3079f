"""Held-out figures of an instruction editor: does it do what it is told, against ground truth?

Why these numbers: every instruction `tiny-ip2p` is trained on has an exact result
(`spdbench.data.instructions.EDITS`, scikit-image), so edit success needs no learned judge. On
held-out 128x128 crops (the quadrants of the bundled test-split photos `evaluate_tiny` uses;
never trained on), diffusers' `StableDiffusionInstructPix2PixPipeline` edits each crop with each
instruction (20 DDIM steps, text guidance 7.5, image guidance 1.5, seed i per crop), and per
instruction:

- PSNR and SSIM of the edit against the exact transform of the input;
- the same for the baseline "return the input unchanged" (identity) -- the edit must beat it;
  the paired difference per crop has a bootstrap CI;
- the ceiling: the VAE round trip of the exact result against itself (the model decodes through
  the VAE, so it cannot beat that);
- instruction accuracy: the share of crops whose edit is nearer (PSNR) to its own instruction's
  exact result than to every other instruction's and to the unchanged input.

Run: ``python -m zoo.evaluate_ip2p [TARGET] [--threads N] [--out FILE] [--image-guidance G] [--guidance G]``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

from spdbench.scoring.metrics import psnr, ssim
from spdbench.scoring.stats import bootstrap_ci
from spdbench.data.instructions import EDITS, exact_edit
from spdbench.targets.instruct import InstructSettings, instruct_edit
from zoo.evaluate_tiny import emit, eval_parser, heldout_crops


def _summary(v: torch.Tensor, digits: int = 3) -> dict:
    ci = bootstrap_ci([float(a) for a in v], seed=0)
    return dict(mean=round(float(v.mean()), digits), ci95=[round(ci.low, digits), round(ci.high, digits)])


def edit_all(target, x: torch.Tensor, instruction: str, settings: InstructSettings, batch: int = 8) -> torch.Tensor:
    out = [instruct_edit(target, x[lo:lo + batch], instruction, list(range(lo, lo + len(x[lo:lo + batch]))), settings)
           for lo in range(0, len(x), batch)]
    return torch.cat(out).cpu()


@torch.no_grad()
def figures(target, x: torch.Tensor, description: str, settings: InstructSettings) -> dict:
    """Per instruction: edit vs exact result, identity vs exact result, their paired difference,
    the VAE ceiling and the instruction accuracy; then the means over instructions."""
    instructions = list(EDITS)
    truth = {ins: exact_edit(ins, x) for ins in instructions}
    out = dict(images=description, n=len(x), settings=dict(steps=settings.steps, guidance=settings.guidance,
                                                           image_guidance=settings.image_guidance, eta=settings.eta),
               seeds="torch.Generator(i) for crop i", per_instruction={})
    wins_psnr, wins_ssim, correct = [], [], []
    for ins in instructions:
        y = edit_all(target, x, ins, settings)
        t = truth[ins]
        p_edit, p_id = psnr(y, t), psnr(x, t)
        s_edit, s_id = ssim(y, t), ssim(x, t)
        ceiling = target.reconstruct(t).float().cpu().clamp(0, 1)
        others = torch.stack([psnr(y, truth[o]) for o in instructions if o != ins] + [psnr(y, x)])  # vs 'did nothing'
        hit = p_edit > others.max(0).values
        correct.append(hit)
        wins_psnr.append(p_edit - p_id)
        wins_ssim.append(s_edit - s_id)
        out["per_instruction"][ins] = dict(
            psnr_edit=_summary(p_edit), psnr_identity=_summary(p_id), psnr_gain_db=_summary(p_edit - p_id),
            ssim_edit=_summary(s_edit), ssim_identity=_summary(s_id), ssim_gain=_summary(s_edit - s_id),
            psnr_vae_ceiling=_summary(psnr(ceiling, t)), crops_beating_identity_psnr=int((p_edit > p_id).sum()),
            instruction_accuracy=round(float(hit.float().mean()), 3))
    allp, alls, allc = torch.cat(wins_psnr), torch.cat(wins_ssim), torch.cat(correct).float()
    out["all_instructions"] = dict(n=len(allp), psnr_gain_db=_summary(allp), ssim_gain=_summary(alls),
                                   instruction_accuracy=_summary(allc),
                                   chance_accuracy=round(1 / (len(instructions) + 1), 3))
    return out


def evaluate(target, settings: Optional[InstructSettings] = None, n_photos: Optional[int] = None) -> dict:
    x = heldout_crops(n_photos)
    return dict(bundled=figures(target, x, f"{len(x)} quadrants of the bundled test-split photos",
                                settings or InstructSettings()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from spdbench.targets import load_target

    ap = eval_parser("python -m zoo.evaluate_ip2p", __doc__, "tiny-ip2p")
    ap.add_argument("--guidance", type=float, default=InstructSettings.guidance)
    ap.add_argument("--image-guidance", type=float, default=InstructSettings.image_guidance)
    ap.add_argument("--steps", type=int, default=InstructSettings.steps)
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target)
    settings = InstructSettings(steps=args.steps, guidance=args.guidance, image_guidance=args.image_guidance)
    emit(dict(target=args.target, target_fingerprint=target.fingerprint, **evaluate(target, settings)), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
