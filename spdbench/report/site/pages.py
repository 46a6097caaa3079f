"""What each page of the site shows, as plain data for the templates: the overview, one page per
suite, one per budget (suite, norm, eps), one per entry. No HTML here (templates/ holds it) and no
numbers of its own: the ranking is board.ranking's, the tables page.py's, the strips gallery.py's.

Pages live side by side in one folder and link each other by file name, so every link is relative.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from spdbench.errors import SpdbenchError
from spdbench.report.board import UNVERIFIED, row_label
from spdbench.report.export import per_image_frame
from spdbench.report.gallery import method_gallery
from spdbench.report.page import Cell, Table, budget_parts, section_note, section_tables
from spdbench.report.site.cost import HEAD as COST_HEAD, cost_row
from spdbench.report.site.protocol import protocol_card, submission_spec
from spdbench.report.text import TASKS, ci_text, eps_text, fmt
from spdbench.store.records import Record, Status
from spdbench.suites import get_suite
from spdbench.verify.challenge import Challenge

#: the per-image table's value columns on an entry page (the full set is in its CSV)
_SHOWN_VALUES = re.compile(r"^(protection\.|imperceptibility\.psnr$|purified\.[^.]+\.ssim$)")


def slug(text: str) -> str:
    """A file-name-safe form of a suite, norm or eps label ('8/255' -> '8o255', as cell ids write it)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text).replace("/", "o")).strip("-") or "x"


def suite_href(suite: str) -> str:
    return f"suite-{slug(suite)}.html"


def budget_href(suite: str, norm: str, eps_label: str) -> str:
    return f"budget-{slug(suite)}-{slug(norm)}-{slug(eps_label)}.html"


def entry_href(name: str) -> str:
    return f"entry-{slug(name)}.html"


@dataclass
class Budget:
    """One budget page: a suite at one norm and eps, its tables (page.py) and its cost card."""
    suite: str
    task: str
    norm: str
    eps: float
    eps_label: str
    title: str
    note: str
    tables: list[Table]
    cost: Table
    href: str


@dataclass
class Entry:
    """One entry (a folder of records): who it is, its rows, costs, strips and per-image values."""
    name: str
    folder: Path
    records: list[Record]
    verified: bool
    labels: dict[str, str] = field(default_factory=dict)  # suite -> ranking row label
    href: str = ""


def _protocol(suite: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(card rows, submission spec), or a single row saying the suite is not installed here."""
    try:
        s = get_suite(suite)
    except SpdbenchError:
        return [("suite", f"{suite}: not installed here (its definition is in the plugin that registers it)")], []
    return protocol_card(s), submission_spec(s)


def entries_of(by_folder: dict[str, list[Record]]) -> list[Entry]:
    """One Entry per folder, named by the folder, in name order."""
    out = []
    for folder, recs in by_folder.items():
        ok = [r for r in recs if r.status == Status.ok]
        if not ok:
            continue
        name = Path(folder).name
        labels = {r.suite: row_label(r) for r in ok}
        out.append(Entry(name, Path(folder), list(recs), not any(UNVERIFIED in r.flags for r in ok), labels,
                         entry_href(name)))
    return sorted(out, key=lambda e: e.name)


def entry_links(entries: Sequence[Entry]) -> dict[tuple[str, str], str]:
    """(suite, ranking row label) -> the entry page that row comes from."""
    return {(suite, label): e.href for e in entries for suite, label in e.labels.items()}


def _cost_table(part: pd.DataFrame, entries: Sequence[Entry], suite: str, norm: str, eps_label: str) -> Table:
    """The cost card of one budget: one row per method, the device named; never marked best."""
    by_label = {e.labels.get(suite): e for e in entries}
    table = Table("Cost card (shown, never ranked on)", ["method", *COST_HEAD])
    for method in part["method"]:
        entry = by_label.get(method)
        recs = [r for r in entry.records if r.status == Status.ok and r.suite == suite and r.norm == norm
                and r.eps_label == eps_label] if entry else []
        cells = cost_row(recs) if recs else ["–"] * len(COST_HEAD)
        table.rows.append([Cell(str(method), name=True)] + [Cell(c) for c in cells])
    return table


def budgets(rank: pd.DataFrame, entries: Sequence[Entry]) -> list[Budget]:
    """One Budget per (task, suite, norm, eps) in the ranking's order, as page.sections cuts them."""
    out: list[Budget] = []
    for task, suite, norm, eps, label, rows in budget_parts(rank):
        split = "" if "split" not in rows or rows["split"].isna().all() else \
            " · ranked on the " + "/".join(sorted(rows["split"].dropna().unique())) + " split"
        tables = [t for t in section_tables(rows, task) if t.title != "Cost"]
        out.append(Budget(suite, task, norm, float(eps), str(label),
                          f"{suite} · {norm} eps {eps_text(label, eps)}{split}",
                          section_note(rows, task), tables,
                          _cost_table(rows, entries, suite, norm, str(label)), budget_href(suite, norm, label)))
    return out


def _headline_row(row: pd.Series, links: dict) -> dict:
    worst = row.get("worst_ssim")
    return dict(rank=fmt(row.get("rank")), method=str(row["method"]), href=links.get((row["suite"], row["method"])),
                ssim=fmt(row.get("ssim")), ssim_ci=ci_text(row, "ssim"),
                worst=fmt(worst) if "worst_ssim" in row else None, worst_ci=ci_text(row, "worst_ssim"),
                imp=fmt(row.get("imp_psnr")), flags=row.get("flags") if isinstance(row.get("flags"), str) else "",
                seconds=fmt(row.get("seconds_per_image")), device=str(row.get("device") or "–"),
                adapted=fmt(row.get("adapted_ssim")) if "adapted_ssim" in row else None,
                adapted_ci=ci_text(row, "adapted_ssim"),
                adapted_by=row.get("adapted_by") if isinstance(row.get("adapted_by"), str) else "")


def headlines(all_budgets: Sequence[Budget], rank: pd.DataFrame, entries: Sequence[Entry]) -> list[dict]:
    """Per suite: its headline budget (the largest eps it has on the board), that budget's ranking in
    short, the suite's other budgets, and the strip of its strongest entry (the example at the top)."""
    links = entry_links(entries)
    out = []
    for suite in dict.fromkeys(b.suite for b in all_budgets):
        mine = [b for b in all_budgets if b.suite == suite]
        head = max(mine, key=lambda b: b.eps)
        rows = rank[(rank["suite"] == suite) & (rank["norm"] == head.norm) & (rank["eps"] == head.eps)]
        rows = rows.sort_values(["rank", "method"], kind="stable")
        table = [_headline_row(r, links) for _, r in rows.iterrows()]
        out.append(dict(suite=suite, task=TASKS[head.task].split(" (")[0], budget=head, others=mine,
                        rows=table, href=suite_href(suite), has_worst=any(r["worst"] not in (None, "–")
                                                                          for r in table),
                        has_adapted=any(r["adapted_by"] for r in table)))
    return out


def example(headline: dict, entries: Sequence[Entry], site_dir: Path) -> Optional[dict]:
    """The strongest entry of a headline (rank 1, `none` aside) at its budget: photo, its edit, the
    protected photo and its edit -- four panels of its example strip, linked where it lies."""
    by_href = {e.href: e for e in entries}
    for row in headline["rows"]:
        entry = by_href.get(row["href"])
        if entry is None or row["method"] == "none":
            continue
        recs = [r for r in entry.records if r.suite == headline["suite"]]
        g = method_gallery(entry.folder, recs, site_dir)
        cols = [c for c in (g or {}).get("columns", []) if c["eps"] == headline["budget"].eps_label]
        if g and cols and all((g["photo"], g["clean_edit"], cols[0]["protected"], cols[0]["edit"])):
            return dict(suite=headline["suite"], method=row["method"], href=row["href"], image=g["image"], prompt=g["prompt"],
                        eps=cols[0]["eps"], panels=[("photo", g["photo"]), ("its edit", g["clean_edit"]),
                                                    ("protected", cols[0]["protected"]),
                                                    ("edit of protected", cols[0]["edit"])])
    return None


def suite_pages(all_budgets: Sequence[Budget], entries: Sequence[Entry]) -> list[dict]:
    """One page per suite on the board: its protocol card, submission spec, budgets and entries."""
    out = []
    for suite in dict.fromkeys(b.suite for b in all_budgets):
        card, spec = _protocol(suite)
        out.append(dict(suite=suite, href=suite_href(suite), card=card, spec=spec,
                        budgets=[b for b in all_budgets if b.suite == suite],
                        entries=[e for e in entries if suite in e.labels]))
    return out


def _provenance(rec: Record) -> list[tuple[str, str]]:
    prov = rec.provenance or {}
    libs = prov.get("libraries") or {}
    rows = [("spdbench", str(libs.get("spdbench", "–"))), ("code commit", str(prov.get("git_commit") or "–")),
            ("libraries", ", ".join(f"{k} {v}" for k, v in sorted(libs.items()) if k != "spdbench") or "–"),
            ("python", str(prov.get("python", "–"))), ("platform", str(prov.get("platform", "–"))),
            ("model", f"{rec.target.name} (fingerprint {rec.target.fingerprint})"),
            ("created", str(prov.get("created", "–")))]
    return rows


def _entry_results(entry: Entry, rank: pd.DataFrame) -> list[dict]:
    rows = []
    for suite, label in entry.labels.items():
        part = rank[(rank["suite"] == suite) & (rank["method"] == label)].sort_values("eps")
        for _, r in part.iterrows():
            rows.append(dict(suite=suite, eps=eps_text(r["eps_label"], r["eps"]), norm=r["norm"],
                             href=budget_href(suite, r["norm"], r["eps_label"]), rank=fmt(r.get("rank")),
                             ssim=fmt(r.get("ssim")), ssim_ci=ci_text(r, "ssim"),
                             worst=fmt(r.get("worst_ssim")) if "worst_ssim" in r else "–",
                             imp=fmt(r.get("imp_psnr")),
                             adapted=fmt(r.get("adapted_ssim")) if "adapted_ssim" in r else None,
                             adapted_by=r.get("adapted_by") if isinstance(r.get("adapted_by"), str) else "",
                             challenged_by=r.get("challenged_by") if isinstance(r.get("challenged_by"), str) else "",
                             flags=r.get("flags") if isinstance(r.get("flags"), str) else ""))
    return rows


def _entry_costs(entry: Entry) -> list[list[str]]:
    groups: dict[tuple, list[Record]] = {}
    for r in entry.records:
        if r.status == Status.ok:
            groups.setdefault((r.suite, r.norm, r.eps, r.eps_label), []).append(r)
    return [[suite, f"{norm} eps {label}", *cost_row(recs)]
            for (suite, norm, _, label), recs in sorted(groups.items(), key=lambda kv: kv[0][:3])]


def per_image_table(entry: Entry) -> Table:
    """The entry's per-image values (protection, imperceptibility PSNR, SSIM after each purifier)."""
    df = per_image_frame({entry.name: entry.records})
    values = [c for c in df.columns if _SHOWN_VALUES.match(c)]
    ident = ["eps_label", "split", "prompt_key", "image_name"]
    table = Table("Per-image values", ["eps", "split", "prompt", "photo", *values])
    for _, row in df.iterrows():
        table.rows.append([Cell(str(row[c]), name=True) for c in ident] + [Cell(fmt(row[c])) for c in values])
    return table


def challenge_rows(challenges: Sequence[Challenge]) -> list[dict]:
    """The verified challenges filed against one entry, each as what it ran and, per budget, the
    mean SSIM of its cells (whether or not it lowered the entry: a challenge that did not is
    evidence too)."""
    out = []
    for ch in sorted(challenges, key=lambda c: c.name):
        if ch.challenge_kind == "purifier":
            model = f" with model {ch.purifier_model['name']}" if ch.purifier_model else ""
            what = f"purifier {ch.column}{model}"
        else:
            what = f"editor LoRA-fine-tuned ({(ch.adaptive or {}).get('steps', '?')} steps)"
        by_eps: dict[str, list[float]] = {}
        for cell in ch.cells:
            by_eps.setdefault(cell.eps_label, []).extend(cell.values.get("ssim", []))
        means = ", ".join(f"{eps}: {fmt(sum(v) / len(v))}" for eps, v in by_eps.items() if v)
        out.append(dict(name=ch.name, what=what, split=ch.cells[0].split if ch.cells else "", ssim=means))
    return out


def entry_page(entry: Entry, rank: pd.DataFrame, site_dir: Path, challenges: Sequence[Challenge] = ()) -> dict:
    """Everything an entry's page shows; `challenges`: the board's applied ones (the entry's are listed)."""
    first = next(r for r in entry.records if r.status == Status.ok)
    protocols = {suite: _protocol(suite)[0] for suite in entry.labels}
    return dict(entry=entry, first=first, results=_entry_results(entry, rank), costs=_entry_costs(entry),
                cost_head=["suite", "budget", *COST_HEAD], protocols=protocols,
                gallery=method_gallery(entry.folder, entry.records, site_dir), provenance=_provenance(first),
                per_image=per_image_table(entry), csv=f"entry-{slug(entry.name)}.csv",
                failed=[r.cell_id for r in entry.records if r.status != Status.ok],
                challenges=challenge_rows([c for c in challenges if c.entry == entry.name]))
