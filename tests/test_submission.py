"""`submit` never destroys, and the leaderboard build never breaks: existing names need --replace, a
refused submit leaves leaderboard/ byte for byte as it was, a replaced entry stays until the new one
is in place, a broken entry is reported by name and left out, every number is derived from per-image
values and every name is escaped where it is rendered."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import spdbench
from spdbench.cli import main as cli_main
from spdbench.verify.entry import MANIFEST
from spdbench.errors import InputError
from spdbench.report.board import build, build_from_dirs, ranking
from spdbench.store.records import read_record
from spdbench.verify.submit import submit, verify

from entry_helpers import copy, run_dir, snapshot, suite_registered  # noqa: F401 (fixtures)
from tampering_cases import BY_NAME, edit_one, first, set_list

REPO = Path(__file__).resolve().parents[1]
FAST_VERIFY = dict(sample=1, attack_rerun=False)


@pytest.fixture(scope="module")
def lb(tmp_path_factory, run_dir):
    """A leaderboard holding one honest, submitted entry."""
    root = tmp_path_factory.mktemp("lb") / "leaderboard"
    report, dest = submit(run_dir, leaderboard_dir=root, name="fast-uniform", **FAST_VERIFY)
    assert report.ok and dest == root / "entries" / "fast-uniform", report.problems
    return root


def _lb_copy(lb, tmp_path):
    dest = tmp_path / "leaderboard"
    shutil.copytree(lb, dest)
    return dest


def test_submit_writes_a_verified_entry_with_a_manifest(lb, run_dir):
    entry = lb / "entries" / "fast-uniform"
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["kind"] == "spdbench-entry" and manifest["schema_version"] == 1
    assert sorted(manifest["files"]) == sorted(str(p.relative_to(entry)) for p in entry.rglob("*")
                                               if p.is_file() and p.name != MANIFEST)
    assert not (entry / "cache").exists() and not (entry / "records.jsonl").exists()
    assert manifest["verification"]["remeasured"] and manifest["verification"]["seed"] is not None
    assert not [p for p in (lb / "entries").iterdir() if p.name.startswith(".")]  # no staging left
    assert verify(entry, rerun=False).ok


def test_existing_name_refused_without_replace(lb, run_dir, tmp_path, capsys):
    before = snapshot(lb)
    with pytest.raises(InputError, match="already exists.*--replace"):
        submit(run_dir, leaderboard_dir=lb, name="fast-uniform", **FAST_VERIFY)
    named_like = copy(run_dir, tmp_path, "fast-uniform")  # README style: the name comes from the folder
    assert cli_main(["submit", str(named_like), "--leaderboard", str(lb)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert snapshot(lb) == before


def test_submitting_an_entry_onto_itself_is_refused_and_harmless(lb, tmp_path):
    lb2 = _lb_copy(lb, tmp_path)
    before = snapshot(lb2)
    assert cli_main(["submit", str(lb2 / "entries" / "fast-uniform"), "--leaderboard", str(lb2)]) == 2
    assert snapshot(lb2) == before
    report, dest = submit(lb2 / "entries" / "fast-uniform", leaderboard_dir=lb2, replace=True, **FAST_VERIFY)
    assert report.ok and dest.is_dir(), report.problems
    assert sorted(p.name for p in (dest / "records").iterdir()) == sorted(
        p.name for p in (lb / "entries" / "fast-uniform" / "records").iterdir())


def test_replace_keeps_the_old_entry_until_the_new_one_is_in_place(lb, run_dir, tmp_path):
    lb2 = _lb_copy(lb, tmp_path)
    before = snapshot(lb2)
    bad = copy(run_dir, tmp_path, "bad")
    BY_NAME["per-image-ssim-0.01"].edit(bad)
    report, dest = submit(bad, leaderboard_dir=lb2, name="fast-uniform", replace=True, sample=3, attack_rerun=False)
    assert dest is None and not report.ok
    assert snapshot(lb2) == before  # refused: the old entry untouched
    report, dest = submit(run_dir, leaderboard_dir=lb2, name="fast-uniform", replace=True, **FAST_VERIFY)
    assert report.ok and verify(dest, rerun=False).ok
    assert sorted(p.name for p in (lb2 / "entries").iterdir()) == ["fast-uniform"]  # nothing aside left


@pytest.mark.parametrize("case", ["fifo-record", "symlink", "deeply-nested-json", "records-at-top-level",
                                  "list-shorter-than-images", "nan-protection-mean", "duplicated-record",
                                  "universal-claimed-per-image", "per-image-ssim-0.01"])
def test_refused_submit_leaves_the_leaderboard_unchanged(case, lb, run_dir, tmp_path):
    lb2 = _lb_copy(lb, tmp_path)
    before = snapshot(lb2)
    bad = copy(run_dir, tmp_path, "bad")
    BY_NAME[case].edit(bad)
    report, dest = submit(bad, leaderboard_dir=lb2, name="newcomer", sample=3, attack_rerun=False)
    assert dest is None and not report.ok and BY_NAME[case].expect in " ".join(report.problems)
    assert snapshot(lb2) == before


def test_the_committed_leaderboard_refuses_overwrites(run_dir, tmp_path, capsys):
    """Issue 16: `submit DIR --name smoke-none` deleted the shipped entry; the README's own
    `submit spdbench-runs/smoke-spd-encoder` overwrote it; submitting an entry onto itself crashed
    and left an empty folder. On a copy of the committed leaderboard, all three are refused."""
    lb = tmp_path / "leaderboard"
    shutil.copytree(REPO / "leaderboard", lb)
    before = snapshot(lb)
    named = copy(run_dir, tmp_path, "smoke-spd-encoder")
    for argv in (["submit", str(run_dir), "--name", "smoke-none"], ["submit", str(named)],
                 ["submit", str(lb / "entries" / "smoke-none")]):
        assert cli_main(argv + ["--leaderboard", str(lb)]) == 2
        assert "already exists" in capsys.readouterr().err
    assert snapshot(lb) == before


def test_manifest_catches_a_change_after_submission(lb, tmp_path):
    entry = tmp_path / "e"
    shutil.copytree(lb / "entries" / "fast-uniform", entry)
    edit_one(entry, set_list("protection", "ssim", lambda x: 0.01))
    report = verify(entry, rerun=False)
    assert not report.ok and "does not match manifest.json" in report.problems[0]
    (first(entry)).with_name("zz.json").write_text("{}")
    assert "not listed in manifest.json" in verify(entry, rerun=False).problems[0]


def _broken_entry(lb: Path, name: str = "broken") -> Path:
    """A committed entry whose per-image list is one short, manifest re-hashed (files pass, claims fail)."""
    import hashlib

    entry = lb / "entries" / name
    shutil.copytree(lb / "entries" / "fast-uniform", entry)
    BY_NAME["list-shorter-than-images"].edit(entry)
    m = json.loads((entry / MANIFEST).read_text())
    for rel in m["files"]:
        data = (entry / rel).read_bytes()
        m["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (entry / MANIFEST).write_text(json.dumps(m))
    return entry


def test_broken_entry_is_reported_by_name_and_left_out(lb, tmp_path, capsys):
    lb2 = _lb_copy(lb, tmp_path)
    _broken_entry(lb2)
    entries = sorted((lb2 / "entries").iterdir())
    written, skipped = build_from_dirs(entries, lb2)
    assert [name for name, _ in skipped] == ["broken"] and "values for" in skipped[0][1]
    md = written["md"].read_text()
    assert "| uniform-noise |" in md
    assert "broken" in md.split("## Left out")[1]
    assert cli_main(["leaderboard", "--records", str(lb2 / "entries"), "--out", str(tmp_path / "out")]) == 0
    assert "LEFT OUT broken" in capsys.readouterr().err


@pytest.fixture(scope="module")
def none_dir(tmp_path_factory, suite_registered):
    out = tmp_path_factory.mktemp("none") / "test-fast-none"
    assert spdbench.run("none", suite="test-fast", out=out).ok
    return out


def test_submit_still_builds_with_a_broken_entry_present(lb, none_dir, tmp_path, capsys):
    lb2 = _lb_copy(lb, tmp_path)
    _broken_entry(lb2)
    assert cli_main(["submit", str(none_dir), "--name", "second", "--leaderboard", str(lb2), "--sample", "1"]) == 0
    err = capsys.readouterr().err
    assert "LEFT OUT broken" in err
    md = (lb2 / "README.md").read_text()
    assert (lb2 / "entries" / "second" / MANIFEST).is_file() and "| none |" in md and "| uniform-noise |" in md


def test_same_method_under_a_new_name_is_refused(lb, run_dir, tmp_path):
    """Two entries of one method would be pooled into one row (issue 16: duplicated records moved a row)."""
    lb2 = _lb_copy(lb, tmp_path)
    before = snapshot(lb2)
    report, dest = submit(run_dir, leaderboard_dir=lb2, name="again", **FAST_VERIFY)
    assert dest is None and "already holds 'uniform-noise'" in report.problems[-1] and "--replace" in report.problems[-1]
    assert snapshot(lb2) == before


def test_numbers_come_from_per_image_values_not_stated_means(run_dir):
    recs = [read_record(p) for p in sorted((run_dir / "records").glob("*.json"))]
    honest = ranking(recs)
    lying = [r.model_copy(update={"protection_mean": {m: 0.0 for m in r.protection_mean},
                                  "imperceptibility_mean": {m: 99.0 for m in r.imperceptibility_mean}})
             for r in recs]
    forged = ranking(lying)
    assert forged["ssim"].tolist() == honest["ssim"].tolist() and forged["imp_psnr"].tolist() == honest["imp_psnr"].tolist()
    assert 0.0 not in forged["ssim"].tolist()


def test_names_are_escaped_in_markdown_and_html(run_dir, tmp_path):
    recs = [read_record(p) for p in sorted((run_dir / "records").glob("*.json"))]
    evil = "x | 0.0001 |\n## forged <script>alert(1)</script>"
    forged = [r.model_copy(update={"attack": evil}) for r in recs]
    written = build(forged + recs, tmp_path / "lb")
    md, page = written["md"].read_text(), written["html"].read_text()
    assert not any(line.startswith("## forged") for line in md.splitlines())
    assert "<script>" not in md and "<script>" not in page and "&lt;script&gt;" in page
    tables = [blk for blk in md.split("### ")[1:] if blk.startswith("Protection")]
    assert len(tables) == 2, "one protection table per eps"
    for blk in tables:
        rows = [ln for ln in blk.split("\n## ")[0].splitlines() if ln.startswith("| ")]
        cols = {len(ln.replace("\\|", "").split("|")) for ln in rows}
        assert len(cols) == 1 and len(rows) == 1 + 2  # header + 2 methods, no forged row


def test_unknown_format_is_an_error(run_dir, tmp_path):
    recs = [read_record(p) for p in sorted((run_dir / "records").glob("*.json"))]
    with pytest.raises(InputError, match="format"):
        build(recs, tmp_path / "lb", formats=["pdf"])
    assert not (tmp_path / "lb").exists()


def _cli(argv) -> int:
    try:
        return cli_main(argv)
    except SystemExit as exc:  # argparse's own one-line error
        return exc.code


@pytest.mark.parametrize("argv", [["--sample", "-1"], ["--sample", "0"], ["--sample", "x"], ["--tolerance", "nan"],
                                  ["--tolerance", "0"], ["--seed", "-3"], ["--device", "foo"]])
def test_cli_verify_bad_options_get_one_line(argv, run_dir, capsys):
    assert _cli(["verify", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err) and argv[0].lstrip("-") in err[-1]


def test_cli_verify_reports_and_repeats_its_seed(run_dir, capsys):
    assert cli_main(["verify", str(run_dir), "--sample", "1", "--no-attack-rerun", "--seed", "12345"]) == 0
    out = capsys.readouterr().out
    assert "seed 12345" in out and "SKIPPED" in out and "verified" in out
    assert cli_main(["verify", str(run_dir), "--no-rerun"]) == 0
    assert "NOT re-measured" in capsys.readouterr().out


def test_debug_isolation_run_is_refused(tmp_path, suite_registered):
    res = spdbench.run("uniform-noise", suite="test-fast", eps="16/255", out=tmp_path / "dbg", isolation="none")
    assert res.ok and res.records[0].isolation == "none"
    report = verify(tmp_path / "dbg", rerun=False)
    assert not report.ok and "isolation is 'none'" in report.problems[0]
