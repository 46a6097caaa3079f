"""The committed leaderboard, checked as untrusted data (real `smoke` suite entries): every entry
passes the file, claim and perturbation checks, and tampering with a real entry is refused like
tampering with the small test folders. CI additionally re-measures a random entry in full (.ci/run)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from spdbench.verify.entry import MANIFEST
from spdbench.store.records import SCHEMA_VERSION
from spdbench.verify.submit import verify

from tampering_cases import BY_NAME

REPO = Path(__file__).resolve().parents[1]
ENTRIES = Path(os.environ.get("SPDBENCH_TEST_ENTRIES", REPO / "leaderboard" / "entries"))
ALL = sorted(p for p in ENTRIES.iterdir() if p.is_dir() and not p.name.startswith(".")) if ENTRIES.is_dir() else []
#: a representative case of each kind of check, applied to a real smoke entry
REAL_CASES = ["cache-pickle", "symlink", "png-declaring-20000px", "nan-per-image", "list-shorter-than-images",
              "eps-label-2-on-8-data", "dropped-record", "duplicated-record", "attack-name-pipe-newline",
              "delta-scaled-past-eps", "universal-claimed-per-image", "image-names-changed", "extra-prompt"]


def _schema_of(entry: Path) -> int:
    rec = next(iter(sorted((entry / "records").glob("*.json"))), None)
    return json.loads(rec.read_text()).get("schema_version") if rec else -1


def _current(entry: Path) -> Path:
    if _schema_of(entry) != SCHEMA_VERSION:
        pytest.skip(f"{entry.name} holds records of schema {_schema_of(entry)}; re-submit it with this spdbench")
    return entry


@pytest.mark.parametrize("entry", ALL, ids=[p.name for p in ALL])
def test_committed_entry_passes_its_checks(entry):
    report = verify(_current(entry), rerun=False)
    assert report.ok, report.problems
    assert (entry / MANIFEST).is_file(), "a committed entry carries its manifest (written by submit)"


@pytest.fixture
def real_entry(tmp_path):
    """A copy of a committed smoke entry without its manifest (a run folder, so each case meets the
    check it targets rather than the manifest's hash)."""
    candidates = [p for p in ALL if p.name == "smoke-uniform-noise"] or ALL
    if not candidates:
        pytest.skip("no committed entries")
    src = _current(candidates[0])
    dest = tmp_path / src.name
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(MANIFEST))
    return dest


@pytest.mark.parametrize("name", REAL_CASES)
def test_tampered_real_entry_refused(name, real_entry):
    BY_NAME[name].edit(real_entry)
    report = verify(real_entry, attack_rerun=False, seed=5)
    assert not report.ok and BY_NAME[name].expect in " ".join(report.problems), report.problems
    assert not report.remeasured


@pytest.mark.slow
def test_tampered_value_in_real_entry_refused_by_remeasurement(real_entry):
    """One record's per-image SSIM set to 0.01 (issue 16: moved a row from 0.9534 to 0.4817)."""
    BY_NAME["per-image-ssim-0.01"].edit(real_entry)
    report = verify(real_entry, sample=1, attack_rerun=False)
    assert not report.ok and "does not reproduce" in " ".join(report.problems)
