"""The board's two views of one budget: ranked at equal model work, and beside it at equal iterations.

Why two: "equal cost" used to mean equal iterations (40 steps for everyone), which gives
PhotoGuard's diffusion attack 5.7x the model work of its encoder attack. A suite with a work budget
(`Suite.attack_work`, encoder-equivalent passes per photo) ranks the rows whose *measured* work
(their records' `model_calls`, weighted by each pass's FLOPs: scoring/work.py) is within it;
nobody's declaration is taken for it. A row that spent more is shown, with its numbers, apart
("over the work budget"), and every row run with the suite's iteration budget is listed again in
the iteration-matched view (the board's second table), ranked among its own.
"""
from __future__ import annotations

from typing import Optional, Sequence

from spdbench.errors import SpdbenchError
from spdbench.scoring.work import record_work
from spdbench.store.records import Record
from spdbench.suites import get_suite

#: measured work may exceed the budget by this fraction (float sums of per-image means)
WORK_TOL = 1e-6
#: the reason a row over its suite's work budget is not ranked (report/flags.NOT_RANKED convention)
OVER_WORK = "not ranked: over the work budget"


def work_budget(rec: Record) -> Optional[float]:
    """The work budget of the record's suite: as recorded, else (records from before it) the suite's."""
    recorded = (rec.suite_config or {}).get("attack_work")
    if recorded is not None:
        return float(recorded)
    try:
        budget = get_suite(rec.suite).attack_work
    except SpdbenchError:  # a plugin suite not installed here
        return None
    return None if budget is None else float(budget)


def over_work_reason(recs: Sequence[Record]) -> Optional[str]:
    """Why a row is not ranked at matched work (its measured work exceeds the suite's), or None."""
    rec = recs[0]
    budget, work = work_budget(rec), record_work(rec)
    if budget is None or work is None or work <= budget * (1 + WORK_TOL):
        return None
    return f"{OVER_WORK} ({work:.1f} of {budget:g} encoder-equivalent passes; see the iteration-matched view)"


def matching(rec: Record) -> str:
    """How the row's steps were chosen: "work" (derived from the suite's work budget), "iterations"
    (the suite's iteration budget), or "own" (explicit, a preset's, or an attack without steps)."""
    source = rec.param_sources.get("steps")
    if source == "suite-work":
        return "work"
    if source == "suite":
        return "iterations"
    return "own"


def in_iteration_view(rec: Record) -> bool:
    """Rows of the iteration-matched view: run at the suite's iteration budget, or with no steps to
    match (none, uniform noise), which belong to both views."""
    return matching(rec) == "iterations" or rec.attack_params.get("steps") is None
