"""The board's flags (report/flags.py): a protection that breaks its suite's invisibility floor, or
that destroys the benign (identity-like) edit, is marked and listed apart, never ranked."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from spdbench.report.board import ranking
from spdbench.report.flags import NOT_RANKED, floor_reasons
from spdbench.report.page import sections, sections_markdown
from spdbench.suites import get_suite
from spdbench.verify.claims import load_checked_by_folder

ENTRIES = Path(__file__).resolve().parents[1] / "leaderboard" / "entries"
NAMES = ("smoke-pca-minus", "smoke-photoguard-encoder", "smoke-uniform-noise")


@pytest.fixture(scope="module")
def records():
    by_folder, skipped = load_checked_by_folder([ENTRIES / n for n in NAMES])
    assert not skipped
    return {Path(k).name: v for k, v in by_folder.items()}


def _table(rank: pd.DataFrame, label: str = "16/255") -> pd.DataFrame:
    return rank[(rank["suite"] == "smoke") & (rank["eps_label"] == label)].reset_index(drop=True)


def _scaled(recs, block: str, metric: str, value: float, prompt=None, eps_label="16/255"):
    """Copies whose `block` values of `metric` are all `value` in the chosen cells (a protection that
    really did this would be recorded so)."""
    out = []
    for r in recs:
        if r.eps_label == eps_label and (prompt is None or r.prompt_key == prompt):
            values = dict(getattr(r, block))
            values[metric] = [value] * len(values[metric])
            r = r.model_copy(update={block: values})
        out.append(r)
    return out


def test_committed_entries_are_not_flagged(records):
    flat = [r for recs in records.values() for r in recs]
    rank = ranking(flat)
    assert "not_ranked" not in rank.columns
    assert rank["rank"].notna().all()


def test_invisibility_breach_is_flagged_and_sorted_apart(records):
    breach = _scaled(records["smoke-pca-minus"], "imperceptibility", "ssim", 0.41)
    flat = breach + records["smoke-photoguard-encoder"] + records["smoke-uniform-noise"]
    table = _table(ranking(flat))
    row = table[table["method"] == "pca-minus"].iloc[0]
    assert bool(row["not_ranked"]) and pd.isna(row["rank"])
    assert "invisibility floor broken (imperceptibility SSIM 0.41 < 0.6)" in row["flags"]
    assert table.iloc[-1]["method"] == "pca-minus"  # listed after every ranked row
    assert list(table["rank"].dropna()) == [1, 2]
    # the 8/255 row of the same entry keeps its rank: the breach is at 16/255 only
    assert _table(ranking(flat), "8/255")["rank"].notna().all()
    # on the page: marked, without a rank, below the ranked rows of its section
    page = sections_markdown(sections(ranking(flat)))
    section = page.split("16/255")[1].split("### ")[1]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "pca-minus" in line
             or "photoguard-encoder |" in line]
    cells = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert "invisibility floor broken" in lines[-1]
    assert set(cells[:cells.index("pca-minus")]) == {"–"}  # no rank in any rank column
    assert _table(ranking(flat))["rank_iterations"].isna().iloc[-1]  # ranked in no view


def test_psnr_floor(records):
    breach = _scaled(records["smoke-pca-minus"], "imperceptibility", "psnr", 19.5)
    reasons = floor_reasons([r for r in breach if r.eps_label == "16/255" and r.split.value == "test"])
    assert reasons == [f"{NOT_RANKED}: invisibility floor broken (imperceptibility PSNR 19.5 dB < 22 dB)"]


def test_destroyed_benign_edit_is_flagged(records):
    floor = get_suite("smoke").floor
    assert floor.benign_prompt == "P4"
    destroys = _scaled(records["smoke-photoguard-encoder"], "protection", "ssim", 0.12, prompt="P4")
    flat = records["smoke-pca-minus"] + destroys + records["smoke-uniform-noise"]
    table = _table(ranking(flat))
    row = table[table["method"] == "photoguard-encoder"].iloc[0]
    assert bool(row["not_ranked"]) and pd.isna(row["rank"])
    assert 'destroys benign edits (SSIM of the P4 "" edit 0.12 < 0.3)' in row["flags"]
    # an edit destroyed under the other prompt (P3, the one the attack is meant to break) is no flag
    strong = _scaled(records["smoke-photoguard-encoder"], "protection", "ssim", 0.12, prompt="P3")
    assert not floor_reasons([r for r in strong if r.eps_label == "16/255" and r.split.value == "test"])


def test_suite_floors_stay_out_of_records():
    suite = get_suite("smoke")
    assert "floor" not in suite.to_dict()  # records and cell ids are unchanged by the board's rule
    assert get_suite("smoke-instruct").floor.benign_prompt is None
