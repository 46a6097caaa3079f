"""The leaderboard page answers the questions: one section per suite and budget, best values
marked, Table 1 per eps, seconds per image as a median with its range (issue 22)."""
from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest

from spdbench.report import board as leaderboard
from spdbench.report.board import build, ranking
from spdbench.verify.claims import load_checked
from spdbench.report.page import UNMARKED, sections

ENTRIES = Path(__file__).parent.parent / "leaderboard" / "entries"
PICK = ["smoke-none", "smoke-uniform-noise", "smoke-pca-plus", "smoke-photoguard-encoder", "smoke-spd-encoder"]


@pytest.fixture(scope="module")
def records():
    recs, skipped = load_checked([ENTRIES / n for n in PICK])
    assert not skipped, skipped
    return recs


def test_one_section_per_suite_and_budget_and_no_mixed_eps(records):
    rank = ranking(records)
    secs = sections(rank)
    assert len(secs) == rank.groupby(["task", "suite", "norm", "eps"]).ngroups >= 2
    assert len({s.title for s in secs}) == len(secs)
    for s in secs:
        label = s.title.rsplit("eps ", 1)[1]
        methods = [row[1].text for row in s.tables[0].rows]
        expected = rank[rank["eps_label"] == label]["method"].tolist()
        assert sorted(methods) == sorted(expected) and len(set(methods)) == len(methods)
        shown = [row[0].text for row in s.tables[0].rows]
        ranks = [int(r) for r in shown if r != "–"]
        assert ranks == sorted(ranks), "rows in rank order"
        assert shown == [str(r) for r in ranks] + ["–"] * (len(shown) - len(ranks)), "unranked rows listed after"
        assert all(len(t.head) <= 12 for t in s.tables), "narrow enough for 1400 px"


def test_the_best_value_per_column_is_marked_and_none_never(records):
    for s in sections(ranking(records)):
        prot = s.tables[0]
        col = prot.head.index("SSIM ↓")
        contenders = [(float(r[col].text), r) for r in prot.rows if r[1].text not in UNMARKED]
        best = min(v for v, _ in contenders)
        marked = [r[1].text for r in prot.rows if r[col].best]
        assert marked and all(float(r[col].text) == best for r in prot.rows if r[col].best)
        assert not any(c.best for r in prot.rows if r[1].text in UNMARKED for c in r)
        imp = prot.head.index("imperceptibility PSNR ↑")
        top = max(float(r[imp].text) for r in prot.rows if r[1].text not in UNMARKED)
        assert all(float(r[imp].text) == top for r in prot.rows if r[imp].best), "↑ columns: the highest"


def test_markdown_and_html_mark_the_best_and_average_nothing_over_eps(records, tmp_path):
    written = build(records, tmp_path / "lb")
    md, page = written["md"].read_text(), written["html"].read_text()
    assert "mean over eps" not in md and "mean over eps" not in page
    assert re.search(r"\| \*\*0\.\d{4}\*\* \\\[", md), "a bold best value with its interval"
    assert 'class="best' in page and "## img2img · smoke · linf eps 8/255" in md
    assert "Table 1 layout" not in md, "Table 1 is drawn for the seed's suite only"


def test_table1_is_one_table_per_eps(records, tmp_path, monkeypatch):
    monkeypatch.setattr(leaderboard, "TABLE1_SUITES", ("smoke",))
    md = build(records, tmp_path / "lb", formats=("md",))["md"].read_text()
    titles = re.findall(r"^## (Table 1 layout · .*)$", md, flags=re.M)
    assert titles == ["Table 1 layout · smoke · eps 8/255", "Table 1 layout · smoke · eps 16/255"]
    t1 = leaderboard.table1(leaderboard.records_frame(records))
    assert set(t1.index.get_level_values("eps_label")) == {"8/255", "16/255"}
    one = t1.xs(("smoke", "8/255", "P3", "test"), level=["suite", "eps_label", "prompt", "split"])
    rec = next(r for r in records if r.attack == "uniform-noise" and r.eps_label == "8/255" and r.prompt_key == "P3"
               and r.split.value == "test")
    assert one[("SSIM", "uniform-noise")].iloc[0] == pytest.approx(statistics.fmean(rec.protection["ssim"]))


def test_seconds_per_image_is_the_median_over_cells_with_its_range(records):
    rank = ranking(records)
    row = rank[(rank["method"] == "photoguard-encoder") & (rank["eps_label"] == "16/255")].iloc[0]
    secs = [r.timing.per_image_s for r in records if r.attack == "photoguard-encoder" and r.eps_label == "16/255"]
    assert len(secs) == 4
    assert row["seconds_per_image"] == pytest.approx(statistics.median(secs))
    assert (row["seconds_per_image_lo"], row["seconds_per_image_hi"]) == (min(secs), max(secs))


def test_entries_awaiting_re_measurement_are_listed_not_ranked(records, tmp_path):
    import json

    lb = tmp_path / "lb"
    lb.mkdir()
    (lb / "pending.json").write_text(json.dumps({"entries": [
        {"name": "smoke-old <b>", "attack": "advdm", "suite": "smoke", "reason": "measured on tiny-v2"}]}))
    written = build(records, lb)
    md, page = written["md"].read_text(), written["html"].read_text()
    assert "## Awaiting re-measurement" in md and "smoke-old" in md.split("## Awaiting re-measurement")[1]
    assert "smoke-old &lt;b&gt; (advdm on\nsmoke): measured on tiny-v2" in page
    (lb / "pending.json").write_text("[1, 2]")
    from spdbench.errors import InputError

    with pytest.raises(InputError, match="pending.json: not a pending list"):
        build(records, lb)


def _train_means(records, method: str, eps_label: str) -> float:
    """SSIM averaged per image over the train prompts, then over images (how ranking averages)."""
    import numpy as np

    per_prompt = [r.protection["ssim"] for r in records
                  if r.attack == method and r.eps_label == eps_label and r.split.value == "train"]
    return float(np.mean(np.mean(np.asarray(per_prompt), axis=0)))


def test_a_budget_without_test_records_is_ranked_on_train_and_says_so(records):
    """Issue 34's trust bug: a budget with no test records was dropped when another had some, and
    every split was pooled, unlabelled, when none had; now it is ranked on train and labelled."""
    no_test_16 = [r for r in records if not (r.eps_label == "16/255" and r.split.value == "test")]
    rank = ranking(no_test_16)
    tested, trained = rank[rank["eps_label"] == "8/255"], rank[rank["eps_label"] == "16/255"]
    assert len(trained) == len(rank[rank["eps_label"] == "16/255"]) == len(set(trained["method"])) >= 2
    assert (trained["split"] == "train").all() and tested["split"].isna().all()
    assert trained["flags"].str.contains("ranked on train split (no test records)", regex=False).all()
    assert not tested["flags"].fillna("").str.contains("ranked on").any()
    row = trained[trained["method"] == "uniform-noise"].iloc[0]
    assert row["ssim"] == pytest.approx(_train_means(records, "uniform-noise", "16/255"))
    titles = [s.title for s in sections(rank)]
    assert any(t.endswith("eps 16/255 · ranked on the train split") for t in titles)
    assert any(t.endswith("eps 8/255") for t in titles), "a test budget's heading is unchanged"


def test_without_any_test_records_no_split_is_pooled(records):
    train_only = [r for r in records if r.split.value == "train"]
    rank = ranking(train_only)
    assert (rank["split"] == "train").all() and (rank["prompts"] == 2).all()
    row = rank[(rank["method"] == "uniform-noise") & (rank["eps_label"] == "8/255")].iloc[0]
    assert row["ssim"] == pytest.approx(_train_means(records, "uniform-noise", "8/255"))
    assert "split" not in ranking(records).columns, "a board with test records everywhere is unlabelled"
