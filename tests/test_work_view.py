"""The board ranks at equal model work and shows the iteration-matched view beside it (issue 35)."""
from __future__ import annotations

from pathlib import Path

from spdbench.report import work_view
from spdbench.report.board import ranking
from spdbench.store.records import load_records

ENTRIES = Path(__file__).resolve().parents[1] / "leaderboard" / "entries"


def _board(*names: str):
    records = [r for n in names for r in load_records(ENTRIES / n / "records")]
    rank = ranking(records)
    return rank[(rank["suite"] == "smoke") & (rank["eps_label"] == "8/255")].set_index("method")


def test_a_row_over_the_work_budget_is_shown_apart_and_ranked_only_at_equal_iterations():
    """advdm's 40 steps cost 53 encoder-equivalent passes per photo (a UNet pass forward and backward
    per step beside the encoder's), over smoke's 40: not ranked, with its numbers; at equal
    iterations it ranks among the 40-step rows. pca-minus (one encoder pass per step) is ranked."""
    board = _board("smoke-advdm", "smoke-pca-minus", "smoke-none")
    advdm, pca = board.loc["advdm"], board.loc["pca-minus"]
    assert advdm["work_per_image"] > 40 and "not ranked: over the work budget" in advdm["flags"]
    assert advdm.isna()["rank"] and advdm["rank_iterations"] == 2
    assert pca["work_per_image"] <= 40 and pca["rank"] == 1 and pca["rank_iterations"] == 1
    assert "over the work budget" not in str(pca["flags"])
    assert board.loc["none"]["rank"] == 2  # no steps: in both views


def test_matching_is_read_from_where_the_steps_came_from():
    class Rec:
        def __init__(self, source, steps=40):
            self.param_sources = {"steps": source} if source else {}
            self.attack_params = {"steps": steps} if steps is not None else {}

    assert work_view.matching(Rec("suite-work")) == "work"
    assert work_view.matching(Rec("suite")) == "iterations"
    assert work_view.matching(Rec("explicit")) == "own"
    assert work_view.in_iteration_view(Rec("suite")) and work_view.in_iteration_view(Rec(None, steps=None))
    assert not work_view.in_iteration_view(Rec("suite-work"))
