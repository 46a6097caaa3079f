"""White box beside black box for every transfer entry, paired by image: the docs' table.

Why a script: docs/threat-model.md reports, for each attack, how much of its protection survives
on an editor it never saw (`smoke-transfer`: crafted on tiny, edited with tiny-b). A transfer
entry edits the very perturbations of its white-box entry (`--protections-from`), so the two are
paired image by image; and the black-box protection is paired with uniform noise's on the same
black-box editor, which says whether anything transferred at all. Numbers come from the committed
entries through `spdbench.scoring.compare.paired` (the code of `spdbench compare`), never typed:

    python scripts/transfer-table.py [--leaderboard leaderboard]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spdbench.scoring import compare
from spdbench.store.records import load_records


def _by_eps(a, b) -> dict:
    """Paired differences a - b by eps label; {} when the two share no budget (a preset's own eps).
    Any other mismatch (photos, prompts) is `compare.paired`'s error, not an empty cell."""
    if not {r.eps_label for r in a} & {r.eps_label for r in b}:
        return {}
    return {d.eps_label: d for d in compare.paired(a, b)}


def rows(leaderboard: Path) -> list[str]:
    entries = leaderboard / "entries"
    noise = load_records(entries / "smoke-transfer-uniform-noise")      # the black-box editor's noise row
    white_noise = load_records(entries / "smoke-uniform-noise")         # the white-box one, read once
    out = ["| attack | eps | SSIM white box (tiny edits) | SSIM black box (tiny-b edits) | black - white [95% CI] "
           "| black box - noise on tiny-b [95% CI] | kept on the black box |",
           "|---|---|---|---|---|---|---|"]
    for folder in sorted(entries.glob("smoke-transfer-*")):
        name = folder.name[len("smoke-transfer-"):]
        if name == "uniform-noise" or not (entries / f"smoke-{name}").is_dir():
            continue
        black = load_records(folder)
        white = load_records(entries / f"smoke-{name}")
        wb = compare.paired(black, white)
        vn, wn = _by_eps(black, noise), _by_eps(white, white_noise)
        for d in wb:
            n, w = vn.get(d.eps_label), wn.get(d.eps_label)
            if n is None or w is None:  # a preset's own budget (e.g. madry's 0.03): no noise row to pair with
                out.append(f"| {name} | {d.eps_label} | {d.b:.4f} | {d.a:.4f} | {d.diff.signed()} | – (no noise entry at "
                           "this eps) | – |")
                continue
            # the share of the white-box effect (distance below noise) that is left on the black box
            white_gap, black_gap = -w.diff.mean, -n.diff.mean
            kept = f"{black_gap / white_gap:.0%}" if white_gap > 1e-4 else "–"
            out.append(f"| {name} | {d.eps_label} | {d.b:.4f} | {d.a:.4f} | {d.diff.signed()} | {n.diff.signed()} "
                       f"({n.verdict.replace('a stronger', 'beats noise').replace('b stronger', 'noise stronger')}) "
                       f"| {kept} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--leaderboard", type=Path, default=Path("leaderboard"))
    a = ap.parse_args(argv)
    print("\n".join(rows(a.leaderboard)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
