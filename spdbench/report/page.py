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
from typing import Callable, Iterator, Optional

import pandas as pd

from spdbench.harness.adaptive import COLUMN as ADAPTED_COLUMN
from spdbench.report.text import (INPAINT_NOTE, LABELS, PROTECTION, TASKS, by_task, ci_text, eps_text, fmt, is_missing,
                                  md_escape, protection_arrow, protection_better)

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
    med = row.get("seconds_per_image")
    lo, hi = row.get("seconds_per_image_lo"), row.get("seconds_per_image_hi")
    spread = f"({fmt(lo)}–{fmt(hi)})" if _isnum(lo) and _isnum(hi) and hi > lo else ""
    return Cell(fmt(med), spread)


@dataclass
class Column:
    """One column of a table: its label, how a row becomes its cell, the row's value for marking
    the best, and which way is better ('min', 'max' or None = never marked).

    Why a spec: head, cells, values and directions used to be four parallel lists kept in step by
    hand; one Column per column cannot drift out of step."""
    head: str
    cell: Callable[[pd.Series], Cell]
    value: Optional[Callable[[pd.Series], Optional[float]]] = None
    better: Optional[str] = None


def _build(title: str, columns: list[Column], part: pd.DataFrame, methods: list[str]) -> Table:
    """A Table from a column spec, its best values marked."""
    table = Table(title, [c.head for c in columns])
    values = []
    for _, row in part.iterrows():
        table.rows.append([c.cell(row) for c in columns])
        values.append([c.value(row) if c.value is not None else None for c in columns])
    _mark_best(table.rows, values, [c.better if c.value is not None else None for c in columns], methods)
    return table


def _text(key: str, with_ci: bool = False) -> Callable[[pd.Series], Cell]:
    if with_ci:
        return lambda row: Cell(fmt(row.get(key)), ci_text(row, key))
    return lambda row: Cell(fmt(row.get(key)))


def _num(head: str, key: str, better: Optional[str], with_ci: bool = False) -> Column:
    """A numeric column read from `key` (its interval under it when `with_ci`)."""
    return Column(head, _text(key, with_ci), (lambda row: _value(row, key)) if better else None, better)


def _metric_column(metric: str) -> Column:
    """A protection metric's column: its label and direction from the metric registry."""
    return _num(f"{LABELS[metric]} {protection_arrow(metric)}", metric, protection_better(metric), with_ci=True)


def _name_column() -> Column:
    return Column("method", lambda row: Cell(str(row["method"]), name=True))


def _fraction(value) -> str:
    """0.809 -> "81%"; missing -> "–"."""
    return "–" if is_missing(value) else f"{float(value):.0%}"


def _ground_truth_columns(part: pd.DataFrame) -> list[Column]:
    """Offline instruction suites (scoring/ground_truth.py): the protected and the clean photo's edit,
    each as PSNR to the instruction's exact result on the clean photo; none elsewhere."""
    if "gt_protected" not in part.columns or not part["gt_protected"].notna().any():
        return []
    return [_num("edit success: PSNR to exact result ↓ (dB)", "gt_protected", "min", with_ci=True),
            _num("clean edit's PSNR to exact result (dB)", "gt_clean", None, with_ci=True)]


def _protection_columns(part: pd.DataFrame, region: bool, worst: bool) -> list[Column]:
    """The protection table's columns: the rank (at equal work), the metrics with intervals, the
    hold-out, region and worst-case numbers where present."""
    prot = [_num("rank", "rank", None), _name_column(), _metric_column("ssim"),
            _num("stronger than the next (paired)", "vs_next", None)]
    if "holdout_ssim" in part.columns and part["holdout_ssim"].notna().any():
        # universal / amortized rows re-measured on the maintainer's private photos (verify --holdout)
        prot += [_num("hold-out SSIM ↓ (private photos)", "holdout_ssim", "min", with_ci=True),
                 _num("hold-out rank", "rank_holdout", None)]
    prot += [_metric_column(m) for m in PROTECTION if m != "ssim"]
    if region:
        prot += [_num("SSIM repainted region ↓", "region_ssim", "min", with_ci=True),
                 _num("PSNR repainted region ↓", "region_psnr", "min", with_ci=True)]
    prot += _ground_truth_columns(part)
    if worst:
        prot += [_num("worst-case SSIM ↓", "worst_ssim", "min", with_ci=True), _num("worst-case rank", "rank_worst", None)]
    if has_adapted(part):  # verified adaptive challenges (report/flags.adapted): their own threat, never ranked on
        prot.append(_num(f"{ADAPTED_COLUMN}: SSIM ↓", "adapted_ssim", "min", with_ci=True))
    prot.append(_num("imperceptibility PSNR ↑", "imp_psnr", "max"))
    if region:
        prot.append(_num("kept-region PSNR ↑", "kept_psnr", "max"))
    if "budget_rms" in part.columns and part["budget_rms"].notna().any():
        prot.append(Column("budget used (RMS)", lambda row: Cell(_fraction(row.get("budget_rms"))),
                           lambda row: _value(row, "budget_rms"), None))
    prot.append(_num("flags", "flags", None))
    return prot


def has_adapted(part: pd.DataFrame) -> bool:
    """Whether some row of `part` was measured with the editor fine-tuned against it."""
    return "adapted_ssim" in part.columns and bool(part["adapted_ssim"].notna().any())


def adapted_note(part: pd.DataFrame) -> str:
    """The note under a budget's heading that says what "after editor fine-tuning" is ("" without it)."""
    if not has_adapted(part):
        return ""
    names = ", ".join(sorted({str(n) for n in part["adapted_by"].dropna()}))
    return (f"\"{ADAPTED_COLUMN}\": the protection (SSIM between the edit of the protected photo and the edit of "
            "the photo) when the protected photo is edited by the editor LoRA-fine-tuned on the entry's protected "
            "train photos (the photo's edit: the suite's editor), from a verified adaptive challenge "
            f"({names}; `spdbench challenge ENTRY --adaptive lora`). A separate threat -- the "
            "attacker fine-tunes the model -- so it lowers neither the worst case nor the rank; \"–\": no such "
            "challenge for that row.")


def section_note(part: pd.DataFrame, task: str) -> str:
    """A budget's note: the inpainting note, the fine-tuned editor's note, both or none."""
    return " ".join(n for n in (INPAINT_NOTE if task == "inpaint" else "", adapted_note(part)) if n)


def section_tables(part: pd.DataFrame, task: str) -> list[Table]:
    """The three tables of one budget's rows (already sorted by rank)."""
    methods = [str(m) for m in part["method"]]
    region = "region_ssim" in part.columns and part["region_ssim"].notna().any()
    worst = "worst_ssim" in part.columns and part["worst_ssim"].notna().any()

    prot = _protection_columns(part, region, worst)
    tables = [_build("Protection", prot, part, methods)]

    # after purification: SSIM per purifier, the worst case, and which purifier it was
    after = [c for c in part.columns if c.startswith("ssim_after_") and not c.endswith(("_lo", "_hi"))
             and part[c].notna().any()]
    if after:
        pur = [_name_column(), _num("none", "ssim", "min")] + [_num(c[len("ssim_after_"):], c, "min") for c in after]
        if worst:
            pur += [_num("worst case", "worst_ssim", "min"), _num("worst case by (images)", "worst_by", None)]
            if "worst_not_measured" in part.columns:
                pur.append(_num("worst case not measured with", "worst_not_measured", None))
        tables.append(_build("SSIM after purification ↓ (the editor cleans the photo first)", pur, part, methods))

    # cost
    def dev(key: str) -> Callable[[pd.Series], Cell]:
        # no device clock or peak-memory counter on a CPU: say so
        return lambda row: Cell("n/a (CPU)" if row.get("device") == "cpu" and is_missing(row.get(key))
                                else fmt(row.get(key)))

    cost = [_name_column(), Column("s / image (median; range over cells)", _seconds,
                                   lambda row: _value(row, "seconds_per_image"), "min"),
            Column("device s / image", dev("device_seconds_per_image"),
                   lambda row: _value(row, "device_seconds_per_image"), "min"),
            _num("fit s", "fit_seconds", None),
            Column("peak MB", dev("peak_memory_mb"), lambda row: _value(row, "peak_memory_mb"), "min"),
            _num("images", "n_images", None), _num("steps", "steps", None),
            # the second view: the rows run at the suite's iteration budget, ranked among their own
            _num("rank at equal iterations", "rank_iterations", None),
            _num("model passes / image (fwd/bwd)", "model_calls", None),
            _num("work / image (encoder-equivalent passes)", "work_per_image", None)]
    tables.append(_build("Cost", cost, part, methods))
    return tables


def _split_note(rows: pd.DataFrame) -> str:
    """The heading's note for a budget ranked on another split than asked (board.ranking labels those
    rows), e.g. " · ranked on the train split": the heading must say so, not only the flags column."""
    if "split" not in rows.columns or rows["split"].isna().all():
        return ""
    return " · ranked on the " + "/".join(sorted(rows["split"].dropna().unique())) + " split"


def budget_parts(rank: pd.DataFrame) -> Iterator[tuple[str, str, str, float, str, pd.DataFrame]]:
    """(task, suite, norm, eps, eps label, rows in rank order) per budget, in the ranking's order:
    how the page and the site cut the board."""
    if rank.empty:
        return
    for task, part in by_task(rank):
        keys = list(dict.fromkeys(zip(part["suite"], part["norm"], part["eps"], part["eps_label"])))
        for suite, norm, eps, label in keys:
            rows = part[(part["suite"] == suite) & (part["norm"] == norm) & (part["eps"] == eps)]
            # a budget whose rows are all unranked (flagged) has no rank column left (by_task drops it)
            yield task, suite, norm, eps, label, rows.sort_values(
                [c for c in ("rank", "method") if c in rows.columns], kind="stable")


def sections(rank: pd.DataFrame) -> list[Section]:
    """One Section per (task, suite, norm, eps), in the ranking's order."""
    out: list[Section] = []
    for task, suite, norm, eps, label, rows in budget_parts(rank):
        title = f"{TASKS[task].split(' (')[0]} · {suite} · {norm} eps {eps_text(label, eps)}" + _split_note(rows)
        out.append(Section(title, section_note(rows, task), section_tables(rows, task)))
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
