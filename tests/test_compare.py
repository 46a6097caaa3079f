"""`spdbench compare`: two methods on the same photos, paired by image (compare.py)."""
from __future__ import annotations

import numpy as np
import pytest

import spdbench
from entry_helpers import run_dir, suite_registered  # noqa: F401 (fixtures)
from spdbench.scoring import compare
from spdbench.cli import main
from spdbench.errors import InputError
from spdbench.store.records import load_records


@pytest.fixture(scope="module")
def none_dir(tmp_path_factory, suite_registered):  # noqa: F811
    out = tmp_path_factory.mktemp("none") / "test-fast-none"
    assert spdbench.run("none", suite="test-fast", out=out).ok
    return out


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_difference_is_per_image_and_its_side_is_read_right(run_dir, none_dir, split):  # noqa: F811
    noise, none = load_records(run_dir), load_records(none_dir)
    rows = compare.paired(noise, none, split=split)
    assert [r.eps_label for r in rows] == ["8/255", "16/255"]
    for r in rows:
        a = [x for x in noise if x.split.value == split and x.eps_label == r.eps_label]
        b = [x for x in none if x.split.value == split and x.eps_label == r.eps_label]
        per_image = np.mean([x.protection["ssim"] for x in a], axis=0) - np.mean([x.protection["ssim"] for x in b], axis=0)
        assert r.diff.mean == pytest.approx(float(per_image.mean()))
        assert r.b == pytest.approx(1.0) and r.a < 1.0, "no perturbation edits exactly like the clean photo"
        assert r.diff.high < 0 and r.verdict == "a stronger"
    swapped = compare.paired(none, noise, split=split)
    assert all(r.verdict == "b stronger" for r in swapped)


def test_different_photos_are_refused(run_dir, none_dir):  # noqa: F811
    noise = load_records(run_dir)
    other = [r.model_copy(update={"image_sha256": ["0" * 64] * len(r.image_sha256)}) for r in load_records(none_dir)]
    with pytest.raises(InputError, match="different test images"):
        compare.paired(noise, other)
    with pytest.raises(InputError, match="metric 'lpips'"):
        compare.paired(noise, noise, metric="lpips")


def test_cli_prints_the_table_and_refuses_a_missing_folder(run_dir, none_dir, tmp_path, capsys):  # noqa: F811
    assert main(["compare", str(run_dir), str(none_dir)]) == 0
    out = capsys.readouterr().out
    assert "test-fast-uniform (a) vs test-fast-none (b), paired by image" in out and "a stronger" in out
    assert main(["compare", str(run_dir), str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "is not an existing folder" in err[0]


def test_the_ranking_marks_rank_and_whether_a_row_beats_the_next(run_dir, none_dir, tmp_path):  # noqa: F811
    from spdbench.report.board import build_from_dirs, ranking

    rank = ranking(load_records(run_dir) + load_records(none_dir))
    for eps, g in rank.groupby("eps"):
        g = g.sort_values("rank")
        assert list(g["method"]) == ["uniform-noise", "none"] and list(g["rank"]) == [1, 2]
        assert g.iloc[0]["vs_next"] == "yes", "noise changes every edit, none changes nothing: paired, clear"
        assert g.iloc[1]["vs_next"] is None or g.iloc[1]["vs_next"] != g.iloc[1]["vs_next"], "the last row: no next"
    written, _ = build_from_dirs([run_dir, none_dir], tmp_path / "lb")
    assert (tmp_path / "lb" / "tradeoffs.png").is_file() and "tradeoffs.png" in written["html"].read_text()
    assert "| rank | method |" in written["md"].read_text()


def test_the_repainted_region_is_compared_on_inpainting_entries_only(run_dir, capsys):  # noqa: F811
    """--region repainted reads each record's repainted-region values (an inpainting suite's); on an
    img2img run it is a one-line error naming the record, not a silent whole-image number."""
    from pathlib import Path

    entries = Path(spdbench.__file__).parent.parent / "leaderboard" / "entries"
    a, b = load_records(entries / "smoke-inpaint-photoguard-encoder"), load_records(entries / "smoke-inpaint-uniform-noise")
    rows = compare.paired(a, b, region="repainted")
    whole = compare.paired(a, b)
    for r, w in zip(rows, whole):
        assert r.label == "ssim (repainted region)" and w.label == "ssim"
        assert r.metric == w.metric == "ssim" and (r.region, w.region) == ("repainted", "whole")
        cells = [x for x in a if x.split.value == "test" and x.eps_label == r.eps_label]
        assert r.a == pytest.approx(float(np.mean([x.protection_region["ssim"] for x in cells])))
        assert r.a != pytest.approx(w.a), "the region is not the whole image"
        assert r.verdict in ("a stronger", "b stronger", "no difference shown")
    with pytest.raises(InputError, match="no repainted-region ssim"):
        compare.paired(load_records(run_dir), load_records(run_dir), region="repainted")
    assert main(["compare", str(entries / "smoke-inpaint-photoguard-encoder"),
                 str(entries / "smoke-inpaint-uniform-noise"), "--region", "repainted"]) == 0
    assert "ssim (repainted region)" in capsys.readouterr().out
