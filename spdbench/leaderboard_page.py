"""The leaderboard page: the ranking cut into one section per (task, suite, norm, eps), each as
three narrow tables (protection, after purification, cost), with the best value per column marked.

Why cut it up: one row per method and eps with ~27 columns wrapped every cell onto three lines and
put methods measured at different budgets side by side; a reader compares methods at one budget,
so each budget gets its own tables, and no number is averaged over eps unless its label says so.
The same cells feed the Markdown (README.md) and the HTML page (Jinja2, autoescaped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

#: rows never marked best: the no-protection baseline wins imperceptibility and cost trivially
UNMARKED = {"none"}


@dataclass
class Cell:
    """One table cell: its value, the interval under it (if any), whether it is its column's best."""
    text: str
    ci: str = ""
    best: bool = False
    name: bool = False  # a name (left-aligned), not a number

    def md(self) -> str:
        from .leaderboard import md_escape

        core = md_escape(self.text)
        if self.best and self.text not in ("–", ""):
            core = f"**{core}**"
        return f"{core} {md_escape(self.ci)}" if self.ci else core


@dataclass
class Table:
    """A titled table: `head` labels, `rows` of Cells."""
    title: str
    head: list[str]
    rows: list[list[Cell]] = field(default_factory=list)


@dataclass
class Section:
    """One budget of one suite: its heading, an optional note and its tables."""
    title: str
    note: str
    tables: list[Table]


def _isnum(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def _value(row, col: str) -> Optional[float]:
    v = row.get(col) if col in row else None
    return float(v) if _isnum(v) else None


def _mark_best(rows: list[list[Cell]], values: list[list[Optional[float]]], directions: list[Optional[str]],
               methods: list[str]) -> None:
    """Mark, per column with a direction ('min' or 'max'), every row holding the best value (ties
    all marked); rows of UNMARKED methods take no part."""
    for j, d in enumerate(directions):
        if d is None:
            continue
        cand = [values[i][j] for i in range(len(rows)) if methods[i] not in UNMARKED and values[i][j] is not None]
        if len(cand) < 2:  # a column with one contender has no "best"
            continue
        best = min(cand) if d == "min" else max(cand)
        for i in range(len(rows)):
            if methods[i] not in UNMARKED and values[i][j] is not None and math.isclose(values[i][j], best,
                                                                                           rel_tol=1e-12):
                rows[i][j].best = True


def _seconds(row) -> Cell:
    """Seconds per image: the median over the method's cells at this budget, and their range."""
    from .leaderboard import _fmt

    med = row.get("seconds_per_image")
    lo, hi = row.get("seconds_per_image_lo"), row.get("seconds_per_image_hi")
    spread = f"({_fmt(lo)}–{_fmt(hi)})" if _isnum(lo) and _isnum(hi) and hi > lo else ""
    return Cell(_fmt(med), spread)


def section_tables(part: pd.DataFrame, task: str) -> list[Table]:
    """The three tables of one budget's rows (already sorted by rank)."""
    from .leaderboard import LABELS, PROTECTION, _fmt, _missing, ci_text

    methods = [str(m) for m in part["method"]]
    region = "region_ssim" in part.columns and part["region_ssim"].notna().any()
    worst = "worst_ssim" in part.columns and part["worst_ssim"].notna().any()

    # protection
    cols = [("ssim", "SSIM ↓", "min")]
    head = ["rank", "method", "SSIM ↓", "stronger than the next (paired)"]
    head += [f"{LABELS[m]} ↓" for m in PROTECTION if m != "ssim"]
    cols += [(m, None, "min") for m in PROTECTION if m != "ssim"]
    if region:
        head += ["SSIM repainted region ↓", "PSNR repainted region ↓"]
        cols += [("region_ssim", None, "min"), ("region_psnr", None, "min")]
    if worst:
        head += ["worst-case SSIM ↓", "worst-case rank"]
        cols += [("worst_ssim", None, "min")]
    head += ["imperceptibility PSNR ↑"] + (["kept-region PSNR ↑"] if region else []) + ["flags"]
    prot = Table("Protection", head)
    values = []
    for _, row in part.iterrows():
        cells = [Cell(_fmt(row.get("rank"))), Cell(str(row["method"]), name=True)]
        vals: list[Optional[float]] = [None, None]
        for col, _, _ in cols:
            cells.append(Cell(_fmt(row.get(col)), ci_text(row, col)))
            vals.append(_value(row, col))
            if col == "ssim":
                cells.append(Cell(_fmt(row.get("vs_next"))))
                vals.append(None)
            if col == "worst_ssim":
                cells.append(Cell(_fmt(row.get("rank_worst"))))
                vals.append(None)
        cells.append(Cell(_fmt(row.get("imp_psnr"))))
        vals.append(_value(row, "imp_psnr"))
        if region:
            cells.append(Cell(_fmt(row.get("kept_psnr"))))
            vals.append(_value(row, "kept_psnr"))
        cells.append(Cell(_fmt(row.get("flags"))))
        vals.append(None)
        prot.rows.append(cells)
        values.append(vals)
    dirs: list[Optional[str]] = [None, None]
    for col, _, d in cols:
        dirs.append(d)
        if col in ("ssim", "worst_ssim"):
            dirs.append(None)
    dirs += ["max"] + (["max"] if region else []) + [None]
    _mark_best(prot.rows, values, dirs, methods)
    tables = [prot]

    # after purification: SSIM per purifier, the worst case, and which purifier it was
    after = [c for c in part.columns if c.startswith("ssim_after_") and not c.endswith(("_lo", "_hi"))
             and part[c].notna().any()]
    if after:
        head = ["method", "none"] + [c[len("ssim_after_"):] for c in after] + (
            ["worst case", "worst case by (images)"] if worst else [])
        pur = Table("SSIM after purification ↓ (the editor cleans the photo first)", head)
        values = []
        for _, row in part.iterrows():
            keys = ["ssim"] + after + (["worst_ssim"] if worst else [])
            pur.rows.append([Cell(str(row["method"]), name=True)] + [Cell(_fmt(row.get(k))) for k in keys]
                            + ([Cell(_fmt(row.get("worst_by")))] if worst else []))
            values.append([None] + [_value(row, k) for k in keys] + ([None] if worst else []))
        _mark_best(pur.rows, values, [None] + ["min"] * (1 + len(after) + (1 if worst else 0))
                   + ([None] if worst else []), methods)
        tables.append(pur)

    # cost
    head = ["method", "s / image (median; range over cells)", "device s / image", "fit s", "peak MB", "images",
            "steps", "model passes / image (fwd/bwd)"]
    cost = Table("Cost", head)
    values = []
    for _, row in part.iterrows():
        on_cpu = row.get("device") == "cpu"  # no device clock or peak-memory counter there: say so

        def dev(k):
            return Cell("n/a (CPU)" if on_cpu and _missing(row.get(k)) else _fmt(row.get(k)))
        cost.rows.append([Cell(str(row["method"]), name=True), _seconds(row), dev("device_seconds_per_image"),
                          Cell(_fmt(row.get("fit_seconds"))), dev("peak_memory_mb"), Cell(_fmt(row.get("n_images"))),
                          Cell(_fmt(row.get("steps"))), Cell(_fmt(row.get("model_calls")))])
        values.append([None, _value(row, "seconds_per_image"), _value(row, "device_seconds_per_image"), None,
                       _value(row, "peak_memory_mb"), None, None, None])
    _mark_best(cost.rows, values, [None, "min", "min", None, "min", None, None, None], methods)
    tables.append(cost)
    return tables


def sections(rank: pd.DataFrame) -> list[Section]:
    """One Section per (task, suite, norm, eps), in the ranking's order."""
    from .leaderboard import INPAINT_NOTE, TASKS, by_task

    out: list[Section] = []
    if rank.empty:
        return out
    for task, part in by_task(rank):
        keys = list(dict.fromkeys(zip(part["suite"], part["norm"], part["eps"], part["eps_label"])))
        for suite, norm, eps, label in keys:
            rows = part[(part["suite"] == suite) & (part["norm"] == norm) & (part["eps"] == eps)]
            rows = rows.sort_values(["rank", "method"], kind="stable")
            title = f"{TASKS[task].split(' (')[0]} · {suite} · {norm} eps {label}"
            out.append(Section(title, INPAINT_NOTE if task == "inpaint" else "", section_tables(rows, task)))
    return out


def sections_markdown(secs: list[Section]) -> str:
    """Every section as Markdown: `##` heading, `###` per table; best values in bold."""
    parts = []
    for s in secs:
        parts.append(f"## {s.title}" + (f"\n\n{s.note}" if s.note else ""))
        for t in s.tables:
            lines = [f"### {t.title}\n", "| " + " | ".join(t.head) + " |", "|" + "---|" * len(t.head)]
            lines += ["| " + " | ".join(c.md() for c in row) + " |" for row in t.rows]
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def table1_sections(t1: pd.DataFrame, suites: tuple[str, ...]) -> list[tuple[str, pd.DataFrame]]:
    """The seed's Table 1 layout, one per (suite, eps) of `suites`: rows (prompt, split), columns
    (metric, method); never averaged over eps."""
    if t1.empty:
        return []
    out = []
    for (suite, label), t in t1.groupby(level=["suite", "eps_label"], sort=False):
        if suite in suites:
            out.append((f"Table 1 layout · {suite} · eps {label}",
                        t.droplevel(["suite", "eps_label"]).dropna(axis=1, how="all")))
    return out


def summary_markdown(rank: pd.DataFrame) -> str:
    """What a terminal shows after a run or a build: each budget's protection table only (the
    purification and cost tables are in the files)."""
    secs = sections(rank)
    if not secs:
        return "(no finished records)"
    return sections_markdown([Section(s.title, "", s.tables[:1]) for s in secs])
