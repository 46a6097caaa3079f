"""Issue 34: a metric registered after an entry was made is not measured there, and `verify --sample`
fills it by re-editing: the re-measured per-image values are reported, and `fill_metrics=DIR`
(`verify --fill-metrics DIR`) writes a new copy whose fully re-edited cells carry the metric,
flagged as filled -- the entry itself is never edited. The copy verifies and ranks with the metric."""
from __future__ import annotations

import json

import pytest

from spdbench.cli import main
from spdbench.errors import InputError
from spdbench.report.board import build_from_dirs
from spdbench.scoring import metrics
from spdbench.scoring.metrics import METRICS
from spdbench.verify.submit import verify

from entry_helpers import run_dir, snapshot, suite_registered  # noqa: F401 (fixtures)

METRIC = "test-l1"


@pytest.fixture
def fifth_metric():
    """A metric registered after the run folder was made (one decorated function, as a plugin is)."""
    @metrics.register(METRIC, label="L1dist", higher_is_better=False, range=(0.0, 1.0),
                      convention="mean absolute difference over RGB, data_range=1")
    def l1(x, y):
        return (x - y).abs().flatten(1).mean(1)

    try:
        yield METRIC
    finally:
        METRICS.remove(METRIC)


def _records(folder):
    return {p.name: json.loads(p.read_text()) for p in sorted((folder / "records").glob("*.json"))}


def test_the_run_predates_the_metric(run_dir):
    assert all(METRIC not in r["protection"] for r in _records(run_dir).values())


def test_a_sample_reports_the_unmeasured_metric_and_writes_nothing(run_dir, fifth_metric):
    before = snapshot(run_dir)
    report = verify(run_dir, sample=1, attack_rerun=False, seed=5)
    assert report.ok, report.problems
    assert any(c.startswith(f"not measured in the records: {METRIC}") for c in report.checks)
    assert len(report.unmeasured) == 4 and report.filled is None
    for cell, blocks in report.unmeasured.items():
        assert list(blocks["protection"][METRIC]) == report.sampled[cell]   # the re-edited images
        assert all(0 < v < 1 for v in blocks["protection"][METRIC].values())
        assert len(blocks["imperceptibility"][METRIC]) in (1, 3)            # every image (no edit needed)
        assert set(blocks) == {"protection", "imperceptibility", "jpeg75"}
    assert snapshot(run_dir) == before


def test_fill_metrics_writes_a_copy_whose_cells_carry_the_metric(run_dir, fifth_metric, tmp_path):
    before = snapshot(run_dir)
    dest = tmp_path / "filled-uniform"
    report = verify(run_dir, sample=3, attack_rerun=False, seed=7, fill_metrics=dest)  # 3 = every image of a cell
    assert report.ok, report.problems
    assert report.filled == str(dest) and any(c.startswith("fill: wrote") for c in report.checks)
    assert snapshot(run_dir) == before, "the entry itself is never edited"
    filled = _records(dest)
    assert set(filled) == set(_records(run_dir)) and (dest / "manifest.json").is_file()
    assert not (dest / "digests").exists()  # an entry holds entry files only
    for name, rec in filled.items():
        assert f"filled-by-reedit:{METRIC}" in rec["flags"]
        assert rec["provenance"]["filled_by_reedit"][METRIC]["seed"] == 7
        assert rec["metric_conventions"][METRIC].startswith("mean absolute difference")
        reported = report.unmeasured[rec["cell_id"]]
        for block, values in (("protection", rec["protection"]), ("imperceptibility", rec["imperceptibility"]),
                              ("jpeg75", rec["purified"]["jpeg75"])):
            assert values[METRIC] == [reported[block][METRIC][n] for n in rec["image_names"]]
        assert rec["protection_mean"][METRIC] == pytest.approx(sum(rec["protection"][METRIC]) / len(rec["image_names"]))
    # the copy is an entry that verifies, its new metric re-measured and compared like the others
    again = verify(dest, sample=3, attack_rerun=False, seed=8)
    assert again.ok, again.problems
    assert again.unmeasured == {} and again.max_deviation[METRIC] < 1e-6
    # and the board shows the metric for it, flagged, where the original shows it as not measured
    build_from_dirs([dest], tmp_path / "board", ["csv"])
    row = (tmp_path / "board" / "leaderboard.csv").read_text()
    assert f"filled-by-reedit:{METRIC}" in row


def test_a_partial_sample_fills_only_the_cells_it_covered(run_dir, fifth_metric, tmp_path):
    dest = tmp_path / "partial"
    report = verify(run_dir, sample=1, attack_rerun=False, seed=5, fill_metrics=dest)
    assert report.ok, report.problems
    filled = _records(dest)
    by_split = {r["split"]: f"filled-by-reedit:{METRIC}" in r["flags"] for r in filled.values()}
    assert by_split == {"test": True, "train": False}   # 1 test photo, 3 train photos
    assert all(METRIC not in r["protection"] for r in filled.values() if r["split"] == "train")
    assert sum("1 of 3 images re-edited, not filled (pass --sample 3" in c for c in report.checks) == 2
    assert verify(dest, sample=1, attack_rerun=False, seed=9).ok


def test_fill_metrics_refuses_an_existing_folder_and_no_rerun(run_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match="already exists; expected a new folder"):
        verify(run_dir, sample=1, fill_metrics=tmp_path / "taken")
    with pytest.raises(InputError, match="drop --no-rerun"):
        verify(run_dir, rerun=False, fill_metrics=tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_cli_fills_and_says_when_there_is_nothing_to_fill(run_dir, fifth_metric, tmp_path, capsys):
    dest = tmp_path / "cli-filled"
    assert main(["verify", str(run_dir), "--sample", "3", "--no-attack-rerun", "--seed", "1",
                 "--fill-metrics", str(dest)]) == 0
    assert f"fill: wrote {dest}" in capsys.readouterr().out
    # the filled copy lacks nothing: asking again writes nothing, and says so (exit 1)
    assert main(["verify", str(dest), "--sample", "3", "--no-attack-rerun", "--seed", "1",
                 "--fill-metrics", str(tmp_path / "again")]) == 1
    assert "NOT WRITTEN --fill-metrics" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
