"""Each attack under the expensive purifiers (GrIDPure, IMPRESS-style consistency): the docs' table.

Why a script: GrIDPure and `impress-ssim` are not in the suites' ladders (each costs about a minute
per 11 photos on 2 cores, for every entry and every verification), so their effect on each attack
is measured on demand -- `spdbench run --suite smoke --attack A --purifiers gridpure,impress-ssim
--protections-from leaderboard/entries/smoke-A` edits the entry's own protected photos after each
purifier -- and tabulated here from those runs, never typed (docs/threat-model.md):

    python scripts/purifier-study.py STUDY_RUN ...    (each run folder named after its source entry,
                                                      e.g. runs/smoke-advdm for entries/smoke-advdm)

Per attack and eps, on the test split, per image averaged over prompts: SSIM of the edit without
purification and after each study purifier, the paired difference (purified - unpurified; above
0 = the purifier gave the editor back some of the edit), and the per-image worst case over the
entry's ladder before and after the study purifiers join it (spdbench.scoring.worst_case).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from spdbench.store.records import Status, load_records, method_label
from spdbench.scoring.stats import bootstrap_diff_ci
from spdbench.scoring.worst_case import worst_case


def _ci(x: np.ndarray, y: np.ndarray) -> str:
    return bootstrap_diff_ci(x, y, paired=True, seed=0).signed()


def _cells(records, split: str) -> dict:
    return {(r.eps_label, r.prompt_key): r for r in records if r.status == Status.ok and r.split.value == split}


def rows(study_dirs: list[Path], leaderboard: Path, split: str = "test") -> list[str]:
    out = ["| attack | eps | SSIM no purifier | after gridpure | gridpure - none [95% CI] | after impress-ssim "
           "| impress - none [95% CI] | worst case, ladder | worst case, ladder + both | change [95% CI] "
           "| chosen by the worst case (ladder + both) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for folder in study_dirs:
        study = load_records(folder)
        if not study:
            out.append(f"| {folder.name} | – | no records | | | | | | | | |")
            continue
        label = method_label(study[0])
        entry = leaderboard / "entries" / folder.name
        if not entry.is_dir():
            raise SystemExit(f"{folder}: name the study run after its source entry; {entry} does not exist")
        source = _cells(load_records(entry), split)
        mine = _cells(study, split)
        for _, eps in sorted({(r.eps, r.eps_label) for r in mine.values()}):
            keys = sorted(k for k in mine if k[0] == eps)
            per = {"none": [], "gridpure": [], "impress-ssim": [], "wc_old": [], "wc_new": []}
            chosen: dict[str, int] = {}
            for k in keys:
                r, s = mine[k], source.get(k)
                if s is None or s.image_sha256 != r.image_sha256:
                    raise SystemExit(f"{folder}: cell {k} has no matching cell in {entry}")
                if not np.allclose(s.protection["ssim"], r.protection["ssim"], atol=1e-6):
                    raise SystemExit(f"{folder}: cell {k} was not edited from {entry}'s protections")
                per["none"].append(r.protection["ssim"])
                for p in ("gridpure", "impress-ssim"):
                    per[p].append(r.purified[p]["ssim"])
                old, _ = worst_case(s.protection, s.purified)
                new, pick = worst_case(s.protection, {**s.purified, **r.purified})
                per["wc_old"].append(old["ssim"])
                per["wc_new"].append(new["ssim"])
                for c in pick:
                    chosen[c] = chosen.get(c, 0) + 1
            v = {k2: np.mean(np.asarray(x, dtype=np.float64), axis=0) for k2, x in per.items()}
            picks = ", ".join(f"{c} {n}" for c, n in sorted(chosen.items(), key=lambda t: -t[1]))
            out.append(f"| {label} | {eps} | {v['none'].mean():.4f} | {v['gridpure'].mean():.4f} "
                       f"| {_ci(v['gridpure'], v['none'])} | {v['impress-ssim'].mean():.4f} "
                       f"| {_ci(v['impress-ssim'], v['none'])} | {v['wc_old'].mean():.4f} | {v['wc_new'].mean():.4f} "
                       f"| {_ci(v['wc_new'], v['wc_old'])} | {picks} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="study run folders (--purifiers gridpure,impress-ssim)")
    ap.add_argument("--leaderboard", type=Path, default=Path("leaderboard"))
    ap.add_argument("--split", default="test", choices=("train", "test"))
    a = ap.parse_args(argv)
    print("\n".join(rows(a.runs, a.leaderboard, a.split)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
