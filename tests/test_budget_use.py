"""Budget use on the board (issue 35): derived from the records' per-image PSNR, flagged under 90%."""
import math
from pathlib import Path

import pytest

from spdbench.budget import BUDGET_USE_FLOOR, Budget, budget_use_from_psnr, effective_eps
from spdbench.report.board import ranking
from spdbench.store.records import load_records

ENTRIES = Path(__file__).resolve().parents[1] / "leaderboard" / "entries"


def test_a_full_sign_perturbation_uses_its_whole_budget_by_psnr():
    b = Budget("linf", "8/255")
    assert budget_use_from_psnr(-20 * math.log10(8 / 255), b, 3 * 128 * 128) == pytest.approx(1.0)
    assert budget_use_from_psnr(-20 * math.log10(4 / 255), b, 3 * 128 * 128) == pytest.approx(0.5)
    l2 = Budget("l2", 2.0)  # norm 2 spread evenly over 128 px: RMS 2 / sqrt(49152)
    assert budget_use_from_psnr(-20 * math.log10(2.0 / math.sqrt(49152)), l2, 49152) == pytest.approx(1.0)
    assert effective_eps(Budget("linf", 0.03)) == pytest.approx(7 / 255)


def test_the_board_flags_rows_under_their_budget_and_only_those():
    """On the committed entries the stochastic AdvDM leaves ~19% of its 8/255 ball unused and is
    flagged; the encoder attack spends ~99% and is not; `none` has no budget use at all."""
    recs = [r for name in ("smoke-advdm", "smoke-photoguard-encoder", "smoke-none")
            for r in load_records(ENTRIES / name)]
    board = ranking(recs).set_index(["method", "eps_label"])
    advdm, encoder, none = (board.loc[(m, "8/255")] for m in ("advdm", "photoguard-encoder", "none"))
    assert advdm["budget_rms"] < BUDGET_USE_FLOOR and "under budget (RMS" in advdm["flags"]
    assert encoder["budget_rms"] > 0.95 and "under budget" not in str(encoder["flags"])
    assert none["budget_rms"] is None or math.isnan(none["budget_rms"])
    # derived from the per-image PSNR of the test records, nothing else
    test = [r for r in recs if r.attack == "advdm" and r.eps_label == "8/255" and r.split.value == "test"]
    per = [budget_use_from_psnr(p, Budget("linf", r.eps), 3 * 128 * 128) for r in test for p in r.imperceptibility["psnr"]]
    assert advdm["budget_rms"] == pytest.approx(sum(per) / len(per), rel=1e-9)
    assert encoder["work_per_image"] == pytest.approx(40.0) and advdm["work_per_image"] > 40.0
