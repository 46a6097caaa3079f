"""`spdbench verify A B ...`: every folder checked in one process, the worst status returned (CI's loop)."""
from __future__ import annotations

from pathlib import Path

import pytest

from spdbench.cli import main

ENTRIES = Path(__file__).resolve().parents[1] / "leaderboard" / "entries"


def test_each_folder_is_verified_and_a_bad_one_makes_the_status(tmp_path, capsys):
    good = [str(ENTRIES / "smoke-none"), str(ENTRIES / "smoke-uniform-noise")]
    assert main(["verify", *good, "--no-rerun"]) == 0
    out = capsys.readouterr().out
    assert out.count("== ") == 2 and out.count("verified: ") == 2
    assert main(["verify", good[0], str(tmp_path / "missing"), good[1], "--no-rerun"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("verified: ") == 2, "the folders after a bad one are still checked"
    assert "REJECTED" in captured.err or "missing" in captured.err


def test_options_for_one_folder_are_refused_with_several(tmp_path):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(["verify", str(ENTRIES / "smoke-none"), str(ENTRIES / "smoke-uniform-noise"),
                               "--no-rerun", "--fill-metrics", str(tmp_path / "x")]))
    assert exc.value.code == 2
