"""The leaderboard's shared words and number formats: metric labels, task titles, number and interval
text, Markdown escaping.

Why a module of its own: the tables (board.py), the page (page.py) and the gallery (gallery.py) all
write them; kept here, below all three, each imports it and none has to import another upward.
"""
from __future__ import annotations

import math
import re

import pandas as pd
from markupsafe import Markup, escape

from spdbench.scoring.metrics import LABELS as METRIC_LABELS
from spdbench.scoring.metrics import METRICS, get_metric

#: the gallery shows each example panel this many pixels a side (gallery.py)
SHOWN_PX = 128
#: the protection metrics the board shows, in column order: every registered metric -- the registry
#: itself, read at each use, so a metric registered later is shown ("–" where an entry predates it);
#: LABELS (name -> label) is the registry's live view too
PROTECTION = METRICS
LABELS = METRIC_LABELS


def protection_better(metric: str) -> str:
    """Which way a protection column is better: a similarity that is higher for closer images marks
    its lowest value ("min": the edit moved furthest), a distance its highest ("max")."""
    return "min" if get_metric(metric).higher_is_better else "max"


def protection_arrow(metric: str) -> str:
    """"↓" or "↑": the direction of `protection_better`, as the column heads print it."""
    return "↓" if protection_better(metric) == "min" else "↑"

#: the leaderboard's task groups, in page order, with their section titles
TASKS = {"img2img": "img2img", "inpaint": "Inpainting (whole image, and the repainted region only)",
         "instruct": "Instruction editing (InstructPix2Pix's architecture)"}

INPAINT_NOTE = ("Inpainting: the mask's region is repainted from noise and the rest kept. Protection is scored on "
                "the whole edit and on the repainted region only (SSIM, PSNR: the metrics with a per-pixel map); "
                "kept-region PSNR is the perturbation's visibility where the owner keeps the photo.")


def md_escape(value) -> str:
    """Text safe inside a Markdown table cell: no line breaks or control characters, `|` and
    Markdown punctuation backslash-escaped, and <, >, & as HTML entities (no raw HTML)."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(value))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", text)


def fmt(v) -> str:
    """A table value as text: "–" for a missing one, 4 decimals below 10, 2 above."""
    if v is None or v is pd.NA or (isinstance(v, float) and pd.isna(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def ci_text(row, col: str) -> str:
    """`[low, high]` of column `col`'s 95% interval, or "" where the row has none."""
    lo, hi = row.get(f"{col}_lo"), row.get(f"{col}_hi")
    if lo is None or pd.isna(lo) or hi is None or pd.isna(hi):
        return ""
    return f"[{fmt(lo)}, {fmt(hi)}]"


def by_task(rank: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The ranking split into its task groups (img2img, inpainting): they are different games."""
    if rank.empty or "task" not in rank.columns:
        return [("img2img", rank)]
    return [(t, rank[rank["task"] == t].dropna(axis=1, how="all").reset_index(drop=True))
            for t in TASKS if (rank["task"] == t).any()]


def inline_html(text: str) -> Markup:
    """The page's own Markdown sentences as HTML: escaped first (never markup from a name), then
    `code` and **bold** rendered, and Markdown's backslash escapes dropped -- the page showed them
    literally."""
    html = str(escape(text))
    html = re.sub(r"`([^`]+)`", r"<code>\1</code>", html)
    html = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", html)
    return Markup(re.sub(r"\\([\\`*_{}\[\]()#+!|~-])", r"\1", html))


def eps_text(label: str, eps: float) -> str:
    """A budget as the page prints it: its label ("8/255"), and a decimal one with its size on the
    same k/255 scale as the others ("0.03 (= 7.65/255)"): 0.03 beside 8/255 read as unrelated numbers."""
    if "/" in str(label) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        return str(label)
    return f"{label} (= {eps * 255:.3g}/255)"
