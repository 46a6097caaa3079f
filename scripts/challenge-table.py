"""Each committed entry's worst case before and after the verified purifier challenges joined it.

Why a script: the four purifiers issue 38 added (a mismatched editor's VAE round trip and its
low-strength img2img, Noisy Upscaling, a platform's sharing chain) are not in the suites' ladders
(adding them would take every committed entry off the board); they reach the board as verified
challenges (`spdbench challenge ENTRY --purifier NAME`, then `spdbench verify`). This tabulates,
from the committed files only (so anyone can re-derive it), what they did to each entry's worst
case: per test photo and prompt, the worst case over the entry's own blocks, then over those and
the challenges' blocks; the paired difference with a 95% bootstrap interval; and which blocks are
now the worst. Used for docs/threat-model.md, never typed by hand.

With --adaptive: each verified LoRA challenge (the editor fine-tuned on the entry's protected train
photos) instead -- the entry's own SSIM of its test cells against the patched editor's, paired.

    python scripts/challenge-table.py [--eps 16/255] [--suite smoke] [--board leaderboard] [--adaptive]
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from spdbench.report.flags import current_challenges, with_challenges
from spdbench.scoring.stats import bootstrap_diff_ci
from spdbench.scoring.worst_case import worst_case
from spdbench.store.records import Status
from spdbench.verify.challenge import read_verified
from spdbench.verify.claims import load_checked_by_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--board", default="leaderboard")
    ap.add_argument("--suite", default="smoke")
    ap.add_argument("--eps", default="16/255")
    ap.add_argument("--adaptive", action="store_true", help="the verified LoRA challenges instead")
    args = ap.parse_args()
    board = Path(args.board)
    folders = sorted(p for p in (board / "entries").iterdir() if p.is_dir())
    by_folder, skipped = load_checked_by_folder(folders)[:2]
    records = [r for recs in by_folder.values() for r in recs if r.status == Status.ok]
    found, _ = read_verified(board / "challenges")
    if args.adaptive:
        return adaptive_table(args, [c for c in found if c.challenge_kind == "adaptive"], records)
    challenges, _ = current_challenges([c for c in found if c.challenge_kind == "purifier"], records,
                                       [str(f) for f in folders])
    joined = with_challenges(records, challenges)
    print(f"| entry | worst-case SSIM, suite ladder | + the challenges | new - old [95% CI] | worst block now "
          f"(test photo x prompt) |\n|---|---|---|---|---|")
    for folder in folders:
        old, new, chosen = [], [], Counter()
        for before, after in zip(records, joined):
            if (before.suite, before.eps_label, before.split.value) != (args.suite, args.eps, "test") \
                    or before.cell_id not in {r.cell_id for r in by_folder.get(str(folder), [])}:
                continue
            old += worst_case(before.protection, before.purified)[0]["ssim"]
            values, blocks = worst_case(after.protection, after.purified)
            new += values["ssim"]
            chosen.update(b.split(":", 1)[1].rsplit("-" + folder.name, 1)[0] if b.startswith("challenge:") else b
                          for b in blocks)
        if not old:
            continue
        ci = bootstrap_diff_ci(new, old, seed=0)
        top = ", ".join(f"{b} {n}" for b, n in chosen.most_common(3))
        print(f"| {folder.name} | {sum(old) / len(old):.4f} | {sum(new) / len(new):.4f} | "
              f"{ci.mean:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] | {top} |")


def adaptive_table(args, found, records) -> None:
    """Per verified adaptive challenge of the suite and budget: before (the entry's record) and after
    (the patched editor), per test photo and prompt, and the paired difference."""
    by_id = {r.cell_id: r for r in records}
    print("| entry | SSIM before | after editor fine-tuning | after - before [95% CI] |\n|---|---|---|---|")
    for ch in sorted(found, key=lambda c: c.entry):
        before, after = [], []
        for cell in ch.cells:
            rec = by_id.get(cell.cell_id)
            if rec is None or (rec.suite, cell.eps_label) != (args.suite, args.eps):
                continue
            before += rec.protection["ssim"]
            after += cell.values["ssim"]
        if not before:
            continue
        ci = bootstrap_diff_ci(after, before, seed=0)
        print(f"| {ch.entry} | {sum(before) / len(before):.4f} | {sum(after) / len(after):.4f} | "
              f"{ci.mean:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] |")


if __name__ == "__main__":
    main()
