"""The adaptive-attack table of docs/threat-model.md, measured on the current `tiny` target.

photoguard-encoder (64 px, 60 steps, seed 0), plain and with `robust_to` (EOT), on the first n
bundled photos; each protected batch is purified with the real purifier (PIL JPEG, the
purifiers' own resize and blur; `spdbench.attacks.eot.transform`, whose jpegQ forward *is* the
codec) and scored by the attack's own objective (the encoder's latent distance to its target;
lower = stronger). Paired 95% bootstrap CI (seed 0) of adaptive - plain, by photo.

    python scripts/adaptive-table.py [--threads N]
"""
from __future__ import annotations

import argparse

import torch

import spdbench
from spdbench import Budget
from spdbench.attacks import get_attack
from spdbench.attacks.eot import transform
from spdbench.scoring.stats import bootstrap_ci

#: (photos, eps, the purifier the editor applies, the adaptive attacks' robust_to)
SETTINGS = [
    (8, "16/255", "jpeg75", ["jpeg75", "djpeg75"]),
    (8, "8/255", "blur3", ["blur3"]),
    (8, "8/255", "resize0.25", ["resize0.25"]),
    (8, "8/255", "jpeg20", ["jpeg20", "djpeg20"]),
]
STEPS = 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = spdbench.load_target("tiny")
    scorer = get_attack("photoguard-encoder")
    print(f"target tiny {target.fingerprint}; photoguard-encoder, 64 px, {STEPS} steps, seed 0")
    print("| setting | clean | plain: raw -> after purifier | adaptive: after purifier, adaptive - plain [95% CI] |")
    print("|---|---|---|---|")
    for n, eps, purifier, adaptive in SETTINGS:
        x = spdbench.load_photos(n=n, size=64)
        budget = Budget("linf", eps)
        purify = transform(purifier)

        def protect(params: dict) -> torch.Tensor:
            attack = get_attack("photoguard-encoder", steps=STEPS, **params)
            return spdbench.apply_budget(x, attack(x, target, budget, torch.Generator().manual_seed(0)), budget)

        def objective(adv: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return scorer.objective(purify(adv, torch.Generator().manual_seed(0)), target, x)

        with torch.no_grad():
            clean = float(scorer.objective(x, target, x).mean())
        plain = protect({})
        raw = float(scorer.objective(plain, target, x).mean())
        plain_after = objective(plain)
        cells = []
        for name in adaptive:
            after = objective(protect({"robust_to": [name]}))
            ci = bootstrap_ci((after - plain_after).tolist(), seed=0)
            cells.append(f"`{name}` {float(after.mean()):.0f}, {float((after - plain_after).mean()):+.0f} "
                         f"[{ci.low:+.0f}, {ci.high:+.0f}]")
        print(f"| {n} photos, {eps}, {purifier} | {clean:.0f} | {raw:.0f} -> {float(plain_after.mean()):.0f} | "
              + "; ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
