"""The private hold-out (issue 40): universal and amortized entries re-measured on photos no author had."""
from pathlib import Path

import pytest
import torch

from spdbench.errors import InputError
from spdbench.verify import holdout
from holdout_photos import write_holdout

ENTRIES = Path(__file__).resolve().parents[1] / "leaderboard" / "entries"


def test_universal_delta_is_recovered_from_clipped_photos():
    u = torch.randint(-16, 17, (1, 3, 8, 8), dtype=torch.int16)
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.int16)
    x[0] = 255  # one photo clips every positive value, another every negative one
    x[1] = 0
    stored = (x + u).clamp(0, 255) - x
    assert torch.equal(holdout.universal_delta(stored), u)


def test_a_per_image_entry_is_refused_with_one_line(tmp_path):
    folder = write_holdout(tmp_path / "holdout")
    with pytest.raises(InputError, match="per-image attack"):
        holdout.measure(ENTRIES / "smoke-pca-minus", folder)


def test_a_missing_or_small_holdout_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="--holdout .* is not an existing folder"):
        holdout.measure(ENTRIES / "smoke-spd-encoder", tmp_path / "nope")
    small = write_holdout(tmp_path / "small", names=("camera", "moon"))
    with pytest.raises(InputError, match="holds 2 photo"):
        holdout.measure(ENTRIES / "smoke-spd-encoder", small)


@pytest.mark.slow
def test_a_universal_entry_is_remeasured_on_the_holdout_and_shown_on_the_board(tmp_path):
    from spdbench.report.board import build_from_dirs

    folder = write_holdout(tmp_path / "holdout")
    got = holdout.measure(ENTRIES / "smoke-spd-encoder", folder)
    assert got.ok, got.problems
    assert got.n_photos == 8 and len(got.cells) == 4  # 2 eps x 2 prompts
    by_eps = {}
    for cell in got.cells:
        assert len(cell.protection["ssim"]) == 8
        assert all(0.0 < v <= 1.0 + 1e-5 for v in cell.protection["ssim"])
        by_eps.setdefault(cell.eps_label, []).append(cell.protection_mean["ssim"])
    # the perturbation does something on unseen photos, and more at the larger budget
    assert max(by_eps["16/255"]) < 0.999
    assert sum(by_eps["16/255"]) < sum(by_eps["8/255"])
    board = tmp_path / "board"
    holdout.write(got, board)
    assert set(holdout.read_all(board)) == {"smoke-spd-encoder"}
    build_from_dirs([ENTRIES / "smoke-spd-encoder", ENTRIES / "smoke-uniform-noise"], board, ["md", "csv"])
    md = (board / "README.md").read_text()
    assert "hold-out SSIM" in md
    assert f"{by_eps['16/255'][0] * 0.5 + by_eps['16/255'][1] * 0.5:.4f}" in md


def test_the_board_shows_holdout_numbers_beside_the_public_ones_and_ranks_on_them(tmp_path):
    """Hold-out files (as `submit --holdout` writes them) join their rows by method, suite and budget."""
    from spdbench.report.board import build_from_dirs

    board = tmp_path / "board"
    entries = [ENTRIES / "smoke-spd-encoder", ENTRIES / "smoke-spd-pca-minus", ENTRIES / "smoke-uniform-noise"]
    for name, method, ssim in (("smoke-spd-encoder", "spd-encoder", 0.97), ("smoke-spd-pca-minus", "spd-pca-minus", 0.95)):
        cells = [holdout.HoldoutCell(norm="linf", eps=e / 255, eps_label=f"{e}/255", prompt_key=k, prompt=k,
                                     image_names=["a", "b", "c", "d"], image_sha256=["0"] * 4, edit_seeds=[0] * 4,
                                     protection={"ssim": [ssim - 0.01, ssim, ssim, ssim + 0.01]},
                                     protection_mean={"ssim": ssim})
                 for e in (8, 16) for k in ("P3", "P4")]
        result = holdout.HoldoutResult(entry=name, attack=method, method=method, suite="smoke", kind="universal",
                                       holdout_sha256="x", n_photos=4, target_fingerprint="f", cells=cells)
        holdout.write(result, board)
    build_from_dirs(entries, board, ["md", "csv"])
    md = (board / "README.md").read_text()
    assert "hold-out SSIM ↓ (private photos)" in md and "hold-out rank" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "spd-" in line and "0.9500" in line]
    assert rows, "spd-pca-minus's hold-out number is shown"
    import pandas as pd

    csv = pd.read_csv(board / "leaderboard.csv")
    one = csv[(csv["eps_label"] == "16/255")].set_index("method")
    assert one.loc["spd-pca-minus", "rank_holdout"] == 1 and one.loc["spd-encoder", "rank_holdout"] == 2
    assert pd.isna(one.loc["uniform-noise", "holdout_ssim"])  # per-image rows have none
