"""Untrusted submissions: tampered numbers, over-budget perturbations, pickles, path traversal."""
import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import spdbench
from spdbench.cli import main as cli_main
from spdbench.submission import submit, verify

from harness_helpers import fast_images, fast_suite


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sub") / "entry"
    spdbench.run("uniform-noise", suite=fast_suite(), out=out, target="tiny-random", images=fast_images(4))
    return out


def _copy(run_dir, tmp_path):
    dest = tmp_path / "entry"
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("cache"))
    return dest


def _first_record(folder):
    return sorted((folder / "records").glob("*.json"))[0]


def test_honest_entry_verifies(run_dir):
    report = verify(run_dir, sample=1, images=fast_images(4))
    assert report.ok, report.problems
    assert len(report.rerun) == 1


def test_edited_metric_values_rejected(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    for p in (d / "records").glob("*.json"):
        data = json.loads(p.read_text())
        data["protection_mean"]["ssim"] -= 0.2
        p.write_text(json.dumps(data))
    report = verify(d, sample=1, images=fast_images(4))
    assert not report.ok and "ssim does not reproduce" in report.problems[0]


def test_perturbation_scaled_past_eps_rejected(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    pfile = next((d / "perturbations").glob("*.safetensors"))
    t = load_file(str(pfile))
    save_file({"delta255": (t["delta255"] * 3).contiguous()}, str(pfile))
    from spdbench.harness import delta_sha256

    for p in (d / "records").glob("*.json"):  # a careful cheater also fixes the hash
        data = json.loads(p.read_text())
        data["perturbation_sha256"] = delta_sha256(load_file(str(pfile))["delta255"])
        p.write_text(json.dumps(data))
    report = verify(d, rerun=False)
    assert not report.ok and any("over its eps 16/255" in p for p in report.problems)


def test_pickle_file_refused(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    (d / "perturbations" / "delta.pt").write_bytes(pickle.dumps({"x": 1}))
    report = verify(d, rerun=False)
    assert not report.ok and "pickle" in report.problems[0]
    d2 = _copy(run_dir, tmp_path / "b")
    _first_record(d2).write_bytes(pickle.dumps({"kind": "spdbench-record"}))
    assert "pickle" in verify(d2, rerun=False).problems[0]


def test_path_traversal_refused(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    p = _first_record(d)
    data = json.loads(p.read_text())
    data["perturbation_file"] = "../../etc/passwd"
    p.write_text(json.dumps(data))
    report = verify(d, rerun=False)
    assert not report.ok and "escapes its folder" in " ".join(report.problems)


def test_foreign_and_truncated_records_rejected(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    p = _first_record(d)
    p.write_text(json.dumps({"hello": "world"}))
    assert "not a spdbench record" in verify(d, rerun=False).problems[0]
    p.write_text('{"kind": "spdbench-record", "schema_version": 1, "cell')
    assert "not valid JSON" in verify(d, rerun=False).problems[0]


def test_submit_copies_entry_and_builds_leaderboard(run_dir, tmp_path):
    report, dest = submit(run_dir, leaderboard_dir=tmp_path / "lb", name="uniform-test", sample=1,
                          images=fast_images(4))
    assert report.ok and dest is not None and (dest / "records").is_dir()
    assert not list(dest.rglob("cache"))


def test_cli_verify_exit_codes(run_dir, tmp_path, capsys):
    d = _copy(run_dir, tmp_path)
    assert cli_main(["verify", str(d), "--no-rerun"]) == 0
    (d / "evil.py").write_text("import os")
    assert cli_main(["verify", str(d), "--no-rerun"]) == 1
    assert "not allowed" in capsys.readouterr().err
