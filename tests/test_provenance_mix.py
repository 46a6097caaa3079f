"""Provenance that refuses to mix: rows of one table measured with other metric versions or another
editor's weights than the rest are separated (not ranked, with the reason), never ranked together."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from spdbench.report.board import ranking
from spdbench.report.flags import metric_versions
from spdbench.store.provenance import environment
from spdbench.verify.claims import load_checked_by_folder

ENTRIES = Path(__file__).resolve().parents[1] / "leaderboard" / "entries"
NAMES = ("smoke-pca-minus", "smoke-photoguard-encoder", "smoke-uniform-noise")


@pytest.fixture(scope="module")
def records():
    by_folder, skipped = load_checked_by_folder([ENTRIES / n for n in NAMES])
    assert not skipped
    return {Path(k).name: v for k, v in by_folder.items()}


def _with_provenance(recs, **libs):
    """Copies as a run on another install would record them: other metric library versions."""
    return [r.model_copy(update={"provenance": {**r.provenance, "metric_libraries": {
        **r.provenance.get("libraries", {}), **libs}}}) for r in recs]


def _table(rank: pd.DataFrame, label: str) -> pd.DataFrame:
    return rank[(rank["suite"] == "smoke") & (rank["eps_label"] == label)].reset_index(drop=True)


def test_other_metric_versions_are_separated(records):
    other = _with_provenance(records["smoke-photoguard-encoder"], piq="0.7.1")
    rank = ranking(records["smoke-pca-minus"] + other + records["smoke-uniform-noise"])
    for label in ("8/255", "16/255"):
        table = _table(rank, label)
        row = table[table["method"] == "photoguard-encoder"].iloc[0]
        assert bool(row["not_ranked"]) and pd.isna(row["rank"])
        assert "measured with other versions than this table's rows (piq 0.7.1 (the table's: 0.8.0))" in row["flags"]
        assert table.iloc[-1]["method"] == "photoguard-encoder"
        assert list(table["rank"].dropna()) == [1, 2]


def test_other_metric_convention_and_editor_are_separated(records):
    changed = [r.model_copy(update={"metric_conventions": {**r.metric_conventions, "ssim": "SSIM: 7x7 uniform"},
                                    "target": r.target.model_copy(update={"fingerprint": "0123456789abcdef"})})
               for r in records["smoke-uniform-noise"]]
    table = _table(ranking(records["smoke-pca-minus"] + records["smoke-photoguard-encoder"] + changed), "16/255")
    flags = table[table["method"] == "uniform-noise"].iloc[0]["flags"]
    assert "editor weights 0123456789abcdef (the table's: e0a9820bca1b1f17)" in flags
    assert "metric convention ssim SSIM: 7x7 uniform" in flags


def test_unknown_library_is_no_difference(records):
    """Records written before a library was listed do not name it: not a reason to separate."""
    newer = _with_provenance(records["smoke-photoguard-encoder"], **{"scikit-image": "0.26.0"})
    rank = ranking(records["smoke-pca-minus"] + newer)
    assert "not_ranked" not in rank.columns


def test_records_hold_what_the_board_compares():
    env = environment(torch.device("cpu"))
    assert "git_commit" in env and env["libraries"]["spdbench"]
    assert {"spdbench", "piq", "scikit-image"} <= set(env["metric_libraries"])
    assert env["metric_libraries"]["piq"]


def test_metric_versions_of_a_committed_record(records):
    versions = metric_versions(records["smoke-pca-minus"][0])
    assert versions["piq"] == "0.8.0" and "spdbench" not in versions  # recorded, not compared
    assert versions["convention:ssim"].startswith("SSIM: Gaussian 11x11")
