"""Write the site: every page of pages.py rendered through the Jinja2 templates in
spdbench/report/templates/ (autoescaped: every name is text, never markup), plus each entry's
per-image CSV. Returns the files written, so a caller (and the browser test) knows every page.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import jinja2
import pandas as pd

from spdbench.report import board
from spdbench.report import flags as board_flags
from spdbench.report.export import write_per_image
from spdbench.report.site import pages
from spdbench.report.text import SHOWN_PX, inline_html
from spdbench.store.records import Record
from spdbench.verify import holdout
from spdbench.verify.challenge import Challenge, read_verified

#: the site's folder under the leaderboard's output folder
SITE_DIR = "site"


def environment() -> jinja2.Environment:
    """The templates shipped as package data, autoescaping on, a missing variable an error."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("spdbench.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["suite_href"] = pages.suite_href
    env.filters["md"] = inline_html  # the spec's own `code` sentences, escaped first
    return env


def _ranking(records: Sequence[Record], board_dir: Optional[Path],
             folders: Sequence[str]) -> tuple[pd.DataFrame, list[tuple[str, str]], list[Challenge]]:
    """The board's ranking as board.build makes it: the verified challenges that still fit applied,
    the hold-out numbers joined; the challenges left out, as (name, reason); the ones applied."""
    if board_dir is None:
        return board.ranking(records), [], []
    challenges, unverified = read_verified(board_dir / board.CHALLENGES)
    challenges, stale = board_flags.current_challenges(challenges, records, list(folders))
    rank = board.with_holdout(board.ranking(records, challenges=challenges), holdout.read_all(board_dir))
    return rank, [*((f"challenge {name}", reason) for name, reason in unverified), *stale], challenges


def write_site(by_folder: dict[str, list[Record]], out_dir: Union[str, Path], skipped: Sequence[tuple[str, str]] = (),
               verified: bool = True, title: str = "spdbench leaderboard",
               board_dir: Union[str, Path, None] = None) -> list[Path]:
    """Build the site into `out_dir` (created; files of the same names replaced) from the checked
    records of each folder; `board_dir`: the leaderboard folder whose holdout/ and pending.json the
    board reads (None: neither). Returns every file written, pages first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    board_path = Path(board_dir) if board_dir is not None else None
    records = [r for recs in by_folder.values() for r in recs]
    rank, left_out, challenges = _ranking(records, board_path, list(by_folder))
    skipped = [*skipped, *left_out]
    entries = pages.entries_of(by_folder)
    all_budgets = pages.budgets(rank, entries)
    heads = pages.headlines(all_budgets, rank, entries)
    suites = pages.suite_pages(all_budgets, entries)
    env = environment()
    common = dict(title=title, suites=[s["suite"] for s in suites], shown=SHOWN_PX,
                  links=pages.entry_links(entries))
    written: list[Path] = []

    def page(name: str, template: str, **context) -> None:
        path = out / name
        path.write_text(env.get_template(template).render(**common, **context), encoding="utf-8")
        written.append(path)

    pending = board.read_pending(board_path) if board_path is not None else []
    intro = board.intro_text(verified, any(board.UNVERIFIED in r.flags for r in records))
    page("index.html", "overview.html", page_title=title, intro=inline_html(intro), headlines=heads,
         examples=[pages.example(h, entries, out) for h in heads], skipped=list(skipped), pending=pending,
         failed=[r.cell_id for r in records if r.status.value != "ok"])
    page("entries.html", "entries.html", page_title="Entries", entries=entries)
    for s in suites:
        page(s["href"], "suite.html", page_title=f"Suite {s['suite']}", s=s)
    for b in all_budgets:
        page(b.href, "budget.html", page_title=b.title, b=b, siblings=[o for o in all_budgets if o.suite == b.suite])
    for e in entries:
        page(e.href, "entry.html", page_title=f"Entry {e.name}", **pages.entry_page(e, rank, out, challenges))
        write_per_image({e.name: e.records}, out, stem=Path(e.href).stem, challenges=challenges)
        written.append(out / f"{Path(e.href).stem}.csv")
    return written
