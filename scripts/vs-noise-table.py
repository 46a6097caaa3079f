"""Every attack against uniform noise of the same budget, paired by image: the docs' table.

Why a script: docs/inpainting.md reports each attack's protection minus uniform noise's on the
same photos and seeds, whole image and repainted region, with paired bootstrap intervals. The
numbers come from run folders through `spdbench.scoring.compare.paired` (the same code as
`spdbench compare`), so the table is regenerated from runs, never typed.

    python scripts/vs-noise-table.py --noise RUNS/noise RUNS/attack1 RUNS/attack2 ...

Prints one Markdown row per attack and eps. A run that is not on the noise run's suite and
photos is refused by `compare.paired` with its one-line reason.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from spdbench.scoring import compare
from spdbench.errors import SpdbenchError
from spdbench.store.records import Status, load_records


def _kept(records, eps_label: str, split: str = "test") -> float:
    """Mean kept-region imperceptibility PSNR (dB) over the split's images at one eps."""
    cells = [r for r in records if r.status == Status.ok and r.split.value == split and r.eps_label == eps_label]
    return float(np.mean([r.imperceptibility_kept["psnr"] for r in cells]))


def rows(noise_dir: Path, attack_dirs: list[Path]) -> list[str]:
    noise = load_records(noise_dir)
    out = ["| attack | eps | whole SSIM (attack / noise) | attack - noise [95% CI] | repainted SSIM (attack / noise) "
           "| attack - noise [95% CI] | repainted PSNR attack - noise [95% CI] | kept PSNR (attack / noise) "
           "| train: repainted SSIM attack - noise [95% CI] | beats noise (test, repainted SSIM) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for folder in attack_dirs:
        recs = load_records(folder)
        name = recs[0].attack if recs else folder.name
        try:
            whole = compare.paired(recs, noise)
            region = compare.paired(recs, noise, region="repainted")
            rpsnr = compare.paired(recs, noise, metric="psnr", region="repainted")
            train = compare.paired(recs, noise, region="repainted", split="train")
        except SpdbenchError as exc:
            out.append(f"| {name} | – | {exc} | | | | | | | |")
            continue
        for w, r, p, t in zip(whole, region, rpsnr, train):
            verdict = {"a stronger": "yes", "b stronger": "no: noise stronger"}.get(r.verdict, "no difference shown")
            out.append(f"| {name} | {w.eps_label} | {w.a:.4f} / {w.b:.4f} | {w.diff.signed()} | {r.a:.4f} / {r.b:.4f} | {r.diff.signed()} "
                       f"| {p.diff.signed(2)} dB "
                       f"| {_kept(recs, w.eps_label):.1f} / {_kept(noise, w.eps_label):.1f} dB | {t.diff.signed()} | {verdict} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--noise", type=Path, required=True, help="the uniform-noise run folder of the same suite")
    ap.add_argument("runs", type=Path, nargs="+", help="attack run folders")
    args = ap.parse_args(argv)
    print("\n".join(rows(args.noise, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
