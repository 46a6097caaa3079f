"""Where a run stands: its rows ranked among a board's verified entries of the same suite and budget,
with the `none` and `uniform-noise` baselines beside it.

Why: after a run, "is SSIM 0.9153 good?" had no answer on the terminal, and ranking one's own run
against the board needed an undocumented double `--records` (which then left the run out as a
duplicate of the entry of the same method). The run's rows are ranked with the entries' but are
their own rows, marked unverified (board.UNVERIFIED): a local run is never verified.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import pandas as pd

from spdbench.report.board import UNVERIFIED, load_board, mark_unverified, ranking
from spdbench.report.text import ci_text, eps_text, fmt
from spdbench.store.records import Record, Status

#: rows always shown beside the run: nothing done, and random noise of the same budget
BASELINES = ("none", "uniform-noise")
#: rows shown above and below the run's
NEIGHBOURS = 2


def entry_folders(board: Union[str, Path]) -> list[Path]:
    """The entry folders of a leaderboard folder (its entries/), or of an entries folder itself."""
    board = Path(board)
    root = board / "entries" if (board / "entries").is_dir() else board
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _suite_of(folder: Path) -> Optional[str]:
    """The suite an entry's records name (one record read), or None where it holds none readable."""
    for path in sorted((folder / "records").glob("*.json"))[:1]:
        try:
            return str(json.loads(path.read_text())["suite"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def _plain(name) -> str:
    """A name as one terminal table cell: no control characters, `|` escaped (read, not rendered)."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", str(name)).replace("|", "\\|")


def place(run: Sequence[Record], board: Union[str, Path]) -> str:
    """Markdown for the terminal: per budget of the run, its rank among the board's entries of the
    same suite and budget, the rows around it and the baselines; or one line saying why not."""
    ok = [r for r in run if r.status == Status.ok]
    if not ok:
        return "not placed on the board: the run has no finished cells"
    suites = {r.suite for r in ok}
    folders = [f for f in entry_folders(board) if _suite_of(f) in suites]
    by_folder, _, _ = load_board(folders)
    budgets = {(r.suite, r.norm, r.eps) for r in ok}
    entries = [r for recs in by_folder.values() for r in recs if (r.suite, r.norm, r.eps) in budgets]
    if not entries:
        return (f"not placed on the board: {board} holds no verified entry of suite "
                f"{', '.join(sorted(suites))} at this run's budgets")
    models = {r.target.fingerprint for r in entries}
    if {r.target.fingerprint for r in ok} - models:
        return (f"not placed on the board: this run's model ({ok[0].target.name} {ok[0].target.fingerprint}) is not "
                f"the one the board's {ok[0].suite} entries were measured on ({', '.join(sorted(models))})")
    rank = ranking(entries + [mark_unverified(r) for r in ok])
    return "\n\n".join(_budget_part(rank, key) for key in sorted(budgets, key=lambda k: (k[0], k[1], k[2])))


def _budget_part(rank: pd.DataFrame, key: tuple) -> str:
    """One budget: a heading with the run's rank, then the rows around it and the baselines."""
    suite, norm, eps = key
    rows = rank[(rank["suite"] == suite) & (rank["norm"] == norm) & (rank["eps"] == eps)]
    rows = rows.sort_values(["rank", "method"], kind="stable").reset_index(drop=True)
    mine = [i for i, m in enumerate(rows["method"]) if str(m).endswith(f"({UNVERIFIED})")]
    if not mine:
        return f"## {suite} · {norm} eps ?: no ranked row of this run (no test-split records)"
    shown = {i for j in mine for i in range(j - NEIGHBOURS, j + NEIGHBOURS + 1) if 0 <= i < len(rows)}
    shown |= {i for i, m in enumerate(rows["method"]) if m in BASELINES}
    n_entries = len(rows) - len(mine)
    head = (f"## {suite} · {norm} eps {eps_text(rows['eps_label'].iloc[0], eps)}: this run ranks "
            f"{', '.join(str(rows['rank'].iloc[j]) for j in mine)} of {len(rows)} "
            f"(the board's {n_entries} verified entries and this run; rank 1 = lowest SSIM = strongest)")
    lines = ["| rank | method | SSIM ↓ | imperceptibility PSNR ↑ |", "|---|---|---|---|"]
    previous = -1
    for i in sorted(shown):
        if previous >= 0 and i > previous + 1:
            lines.append(f"| … | ({i - previous - 1} more) | | |")
        row = rows.iloc[i]
        ssim = f"{fmt(row['ssim'])} {ci_text(row, 'ssim')}".strip()
        lines.append(f"| {row['rank']} | {_plain(row['method'])} | {ssim} | {fmt(row.get('imp_psnr'))} |")
        previous = i
    return head + "\n\n" + "\n".join(lines)
