"""Records made without the sandbox (isolation "process": attack code that could read the test photos
and rewrite its own records): `submit` lands them only after re-running every cell group itself in a
worker the OS confined, and the board flags every such row."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import spdbench
from spdbench.harness import sandbox
from spdbench.report.board import build_from_dirs, ranking
from spdbench.store.records import load_records
from spdbench.verify.submit import VerifyReport, submit, unsandboxed_problems

from entry_helpers import suite_registered  # noqa: F401 (fixture)

BOARD = Path(__file__).resolve().parents[1] / "leaderboard"


@pytest.fixture(scope="module")
def unconfined_run(tmp_path_factory, suite_registered):  # noqa: F811
    out = tmp_path_factory.mktemp("unconfined") / "fast-uniform"
    res = spdbench.run("uniform-noise", suite="test-fast", eps="16/255", out=out, isolation="process", progress=False)
    assert res.ok and {r.isolation for r in res.records} == {"process"}
    return out


@pytest.mark.parametrize("skip", [dict(rerun=False),
                                  pytest.param(dict(sample=1, attack_rerun=False), marks=pytest.mark.slow)])
def test_submit_refuses_unsandboxed_cells_it_did_not_rerun(unconfined_run, tmp_path, skip):
    report, dest = submit(unconfined_run, leaderboard_dir=tmp_path / "lb", name="loose", **skip)
    assert dest is None and not (tmp_path / "lb" / "entries").exists(), "nothing landed"
    problem = next(p for p in report.problems if "without the sandbox" in p)
    assert "\n" not in problem and "not re-run here" in problem and "attack_rerun=False" in problem, problem


def test_submit_lands_unsandboxed_cells_only_after_rerunning_them_in_the_sandbox(unconfined_run, tmp_path):
    report, dest = submit(unconfined_run, leaderboard_dir=tmp_path / "lb", name="rerun", sample=1)
    if sandbox.supported() is None:  # this machine confines: every group re-run in the sandbox, so it lands
        assert dest is not None, report.problems
        assert set(report.rerun) == {r.cell_id for r in report.records} and not report.rerun_unsandboxed
    else:  # it cannot: the re-run was no better than the records, so nothing lands
        assert dest is None and any("re-ran them without the sandbox" in p for p in report.problems), report.problems


def test_an_unsandboxed_rerun_does_not_vouch_for_unsandboxed_cells(unconfined_run):
    records = load_records(unconfined_run)
    ids = [r.cell_id for r in records]
    loose = VerifyReport(records=records, rerun=ids, rerun_unsandboxed=["WARNING eps 16/255: NOT sandboxed"])
    assert "re-ran them without the sandbox" in unsandboxed_problems(loose)[0]
    assert unsandboxed_problems(VerifyReport(records=records, rerun=ids)) == []
    confined = [r.model_copy(update={"isolation": "sandbox"}) for r in records]
    assert unsandboxed_problems(VerifyReport(records=confined)) == [], "sandboxed cells land without a re-run"


def test_the_board_flags_every_unsandboxed_row(unconfined_run, tmp_path):
    written, skipped = build_from_dirs([unconfined_run], tmp_path / "b", formats=["csv", "md"])
    assert not skipped
    assert pd.read_csv(written["csv"])["flags"].str.contains("not-sandboxed").all()
    assert "not-sandboxed" in written["md"].read_text()
    # the same cells made in the sandbox carry no such flag (ranked from the records themselves)
    confined = [r.model_copy(update={"isolation": "sandbox", "flags": [f for f in r.flags if f != "not-sandboxed"]})
                for r in load_records(unconfined_run)]
    assert not ranking(confined)["flags"].fillna("").str.contains("not-sandboxed").any()
    # an entry made before the sandbox (isolation "process", no flag in its records) is flagged too
    old, _ = build_from_dirs([BOARD / "entries" / "smoke-none"], tmp_path / "old", formats=["csv"])
    assert pd.read_csv(old["csv"])["flags"].str.contains("not-sandboxed").all()
