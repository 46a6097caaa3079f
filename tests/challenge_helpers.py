"""Shared by the challenge tests: a copy of a filed challenge with forged values, and the check
that verify refuses it and the board does not apply it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from spdbench.verify.challenge import CHALLENGE_FILE, read_verified


def forge_values(folder: Path, board: Path, shift: float, name: str = "forged") -> Path:
    """`folder` copied to BOARD/challenges/NAME with the first cell's SSIM values moved by `shift`
    (its copied verification.json still names the old challenge.json)."""
    forged = board / "challenges" / name
    shutil.copytree(folder, forged)
    data = json.loads((forged / CHALLENGE_FILE).read_text())
    data["name"] = name
    data["cells"][0]["values"]["ssim"] = [v + shift for v in data["cells"][0]["values"]["ssim"]]
    (forged / CHALLENGE_FILE).write_text(json.dumps(data))
    return forged


def assert_refused_and_not_applied(report, board: Path, name: str = "forged") -> None:
    """One problem, the values', and the board lists the challenge as not verified."""
    assert not report.ok and len(report.problems) == 1
    assert "ssim does not reproduce: claimed" in report.problems[0]
    found, left = read_verified(board / "challenges")
    assert name not in [c.name for c in found]
    assert any(n == name and "not verified" in why for n, why in left)
