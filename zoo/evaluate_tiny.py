"""Held-out figures of a tiny target: VAE reconstruction PSNR and img2img SSIM vs strength.

Why: the trained tiny target stands in for SD1.5 only if (a) its VAE reconstructs unseen photos
about as well as a plain x8 bicubic down/up, and (b) img2img edits stay close to the input at low
strength and move away as strength grows. Two held-out sets, each photo centre-cropped, resized
to 256x256 and cut into 4 quadrants of 128x128:

- "bundled": the bundled *test* split (4 photos = 16 crops; what v1/v2 were measured on);
- "package": the data list's held-out package (photos.json, split "heldout"; never trained on,
  nor is any other file of that package) — needs the photos fetched (`--photos DIR`).

Metrics are the library's (`spdbench.scoring.metrics.ssim/psnr`: SSIM without downsampling, PSNR capped
at 100 dB), so these figures mean what the leaderboard's do.

Run: ``python -m zoo.evaluate_tiny [FOLDER] [--photos DIR] [--probe]`` (default: the
shipped "tiny"; ``--probe`` prints the per-timestep denoising probe instead).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from spdbench.scoring import metrics
from spdbench.data.photos import center_crop_resize, load_photos, read_image, to_tensor
from spdbench.scoring.stats import bootstrap_ci
from zoo import photos as photo_list

PROMPT = "add some snow"
STRENGTHS = (0.3, 0.5, 0.8)
PROBE_T = (20, 100, 200, 300, 500)
SIZE, CROP = 256, 128


def quadrants(photos: torch.Tensor) -> torch.Tensor:
    """(4 * N, 3, 128, 128): the four 128x128 quadrants of each 256x256 photo, photo by photo."""
    quads = [photos[:, :, i:i + CROP, j:j + CROP] for i in (0, CROP) for j in (0, CROP)]
    return torch.stack(quads, 1).reshape(-1, 3, CROP, CROP).contiguous()


def heldout_crops(n_photos: Optional[int] = None) -> torch.Tensor:
    """(4 * photos, 3, 128, 128): quadrants of the 256x256 bundled test-split photos."""
    photos = load_photos(size=SIZE, split="test")
    if n_photos is not None:
        photos = photos[:n_photos]
    return quadrants(photos)


def package_crops(photos_dir: Path, data_list: Path = photo_list.DATA_LIST,
                  whole: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Quadrants of the data list's held-out photos (hash-checked) and the photo name of each crop;
    `whole=True`: each photo centre-cropped and resized to 128x128 instead (the issue's protocol:
    a whole photo per 16x16 latent is denser, so harder for an x8 autoencoder)."""
    held = photo_list.photos("heldout", photos_dir, data_list)
    if whole:
        return to_tensor([center_crop_resize(read_image(p.path), CROP) for p in held]), [p.name for p in held]
    x = quadrants(to_tensor([center_crop_resize(read_image(p.path), SIZE) for p in held]))
    return x, [p.name for p in held for _ in range(4)]


def bicubic_x8(x: torch.Tensor) -> torch.Tensor:
    """The x8 down/up baseline a latent-x8 autoencoder should match."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(h // 8, w // 8), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0.0, 1.0)


@torch.no_grad()
def reconstruction(target, x: torch.Tensor) -> dict:
    rec = target.reconstruct(x).float().cpu().clamp(0.0, 1.0)
    bic = bicubic_x8(x)
    p_vae, p_bic = metrics.psnr(rec, x), metrics.psnr(bic, x)
    return dict(psnr_vae=float(p_vae.mean()), psnr_bicubic_x8=float(p_bic.mean()),
                psnr_gap_db=float((p_vae - p_bic).mean()),
                ssim_vae=float(metrics.ssim(rec, x).mean()), ssim_bicubic_x8=float(metrics.ssim(bic, x).mean()))


@torch.no_grad()
def img2img_ssim(target, x: torch.Tensor, strengths: Sequence[float] = STRENGTHS, prompt: str = PROMPT,
                 steps: int = 20, guidance: float = 7.5, seed: int = 0, batch: int = 16) -> dict:
    """Mean SSIM(edit(x), x) per strength (with a 95% bootstrap CI over images; crops of one photo
    are not independent, so read it as a lower bound on the uncertainty); image i uses
    torch.Generator seed `seed + i`."""
    pipe = target.img2img()
    out = {}
    for s in strengths:
        vals = []
        for lo in range(0, len(x), batch):
            xb = x[lo:lo + batch]
            gens = [torch.Generator().manual_seed(seed + lo + i) for i in range(len(xb))]
            edits = pipe(prompt=[prompt] * len(xb), image=xb, strength=s, num_inference_steps=steps,
                         guidance_scale=guidance, generator=gens, output_type="pt").images
            vals.append(metrics.ssim(edits.float().cpu().clamp(0.0, 1.0), xb))
        v = torch.cat(vals)
        ci = bootstrap_ci(v.tolist(), seed=0)
        out[f"{s:g}"] = dict(mean=float(v.mean()), std=float(v.std()), ci95=[ci.low, ci.high],
                             per_image=[round(float(a), 4) for a in v])
    return out


@torch.no_grad()
def denoise_probe(target, x: torch.Tensor, timesteps: Sequence[int] = PROBE_T, prompt: str = PROMPT,
                  seed: int = 1) -> dict:
    """Per timestep t: one UNet call on the clean latent noised to t, its x0 estimate, decoded.

    Why: tells whether img2img fidelity is limited by the denoiser (x0 error at the start of the
    edit) or by the later steps; at strength s the edit starts near t = 1000 s.
    """
    z0 = target.encode(x).latents  # scaled posterior means, on the target's device and dtype
    emb = target.encode_prompt([prompt] * len(x))
    abar = target.alphas_cumprod
    out = {}
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0.device, z0.dtype)
        a = float(abar[t])
        zt = target.add_noise(z0, noise, t)
        eps = target.predict_noise(zt, t, emb)
        x0 = (zt - (1 - a) ** 0.5 * eps) / a ** 0.5
        dec = target.decode(x0).float().cpu().clamp(0.0, 1.0)
        out[str(t)] = dict(alpha_bar=a, eps_mse=float((eps - noise).pow(2).mean()),
                           x0_mse=float((x0 - z0).pow(2).mean()), ssim=float(metrics.ssim(dec, x.cpu()).mean()))
    return out


def _set(target, x: torch.Tensor, description: str) -> dict:
    return dict(images=description, n=len(x), reconstruction=reconstruction(target, x),
                img2img=dict(prompt=PROMPT, steps=20, guidance=7.5, seeds="torch.Generator(i) per image",
                             ssim_to_input=img2img_ssim(target, x)))


def evaluate(target, n_photos: Optional[int] = None, photos_dir: Optional[Path] = None) -> dict:
    """All held-out figures as a JSON-able dict: the bundled test split, and the held-out package
    when `photos_dir` is given. The top-level keys of the bundled set stay where v1/v2 records had them."""
    x = heldout_crops(n_photos)
    out = _set(target, x, f"{len(x)} crops 128x128 (quadrants of the 256x256 bundled test-split photos)")
    if photos_dir is not None:
        xp, names = package_crops(photos_dir)
        pkg = sorted({e["package"] for e in photo_list.load_list()["photos"] if e["split"] == "heldout"})
        out["package"] = _set(target, xp, f"{len(xp)} crops 128x128 (quadrants of the {len(xp) // 4} held-out "
                                          f"photos of {', '.join(pkg)}, centre-cropped and resized to 256x256)")
        out["package"]["photo_of_crop"] = names
        xw, _ = package_crops(photos_dir, whole=True)
        out["package_whole128"] = _set(target, xw, f"{len(xw)} held-out photos of {', '.join(pkg)}, each "
                                                    "centre-cropped and resized to 128x128 (whole photo)")
    return out


def eval_parser(prog: str, doc: str, default_target: str) -> argparse.ArgumentParser:
    """The zoo evaluations' shared command line: TARGET [--photos DIR] [--threads N] [--out FILE]."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    ap.add_argument("target", nargs="?", default=default_target, help="target name or model folder")
    ap.add_argument("--photos", type=Path, default=None, metavar="DIR",
                    help="fetched photos (`python -m zoo.photos fetch DIR`): adds the held-out package")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return ap


def emit(result: dict, out: Optional[Path]) -> None:
    text = json.dumps(result, indent=1)
    if out:
        out.write_text(text + "\n")
    print(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from spdbench.targets import load_target

    ap = eval_parser("python -m zoo.evaluate_tiny", __doc__, "tiny")
    ap.add_argument("--probe", action="store_true", help="per-timestep denoising probe instead")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target)
    if args.probe:
        x = package_crops(args.photos)[0] if args.photos else heldout_crops()
        emit(denoise_probe(target, x), args.out)
    else:
        emit(evaluate(target, photos_dir=args.photos), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
