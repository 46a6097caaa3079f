"""Issue 40, "run folders written only by the harness": every record the harness writes is signed
with HMAC-SHA256 under a per-user key (store/digest.py); the board and `compare` refuse a folder
whose record was rewritten after the run (naming the file), flag records that are not signed by
this machine, and a resumed run recomputes a rewritten cell instead of reusing it."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

import spdbench
from spdbench.cli import main
from spdbench.harness import sandbox
from spdbench.report.board import build_from_dirs
from spdbench.store import digest
from spdbench.store.records import atomic_write_bytes, load_records
from spdbench.verify.claims import load_checked_by_folder

from entry_helpers import suite_registered  # noqa: F401 (fixture)

FORGED_SSIM = 0.05


@pytest.fixture(scope="module")
def key_home(tmp_path_factory):
    """This module's own record key (a private $XDG_CONFIG_HOME), so nothing reads the user's."""
    home = tmp_path_factory.mktemp("config")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def signed_run(key_home, suite_registered, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("signed") / "test-fast-uniform"
    res = spdbench.run("uniform-noise", suite="test-fast", out=out)
    assert res.ok and len(res.records) == 4
    return out


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    dest = tmp_path / name / run.name
    shutil.copytree(run, dest)
    return dest


def _test_record(folder: Path) -> Path:
    return next(p for p in sorted((folder / "records").glob("*.json"))
                if json.loads(p.read_text())["split"] == "test")


def _forge_ssim(path: Path) -> None:
    """A stronger per-image SSIM with its mean made consistent: the claim checks alone pass it."""
    data = json.loads(path.read_text())
    data["protection"]["ssim"] = [FORGED_SSIM] * len(data["protection"]["ssim"])
    data["protection_mean"]["ssim"] = FORGED_SSIM
    path.write_text(json.dumps(data, indent=1))


def test_the_harness_signs_every_record_with_a_private_key(signed_run, key_home):
    key_file = key_home / "spdbench" / "record-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    names = sorted(p.name for p in (signed_run / "records").glob("*.json"))
    assert sorted(p.name[:-len(".hmac")] for p in (signed_run / "digests").iterdir()) == names
    raw = {f"records/{n}": (signed_run / "records" / n).read_bytes() for n in names}
    states = digest.check(signed_run, raw)
    assert {s for s, _ in states.values()} == {digest.SIGNED}
    # the key is nowhere in what the harness wrote, and the sandboxed worker may not read its folder
    key_hex = key_file.read_text().strip()
    assert not any(key_hex in p.read_text() for p in signed_run.rglob("*.json*"))
    assert str(key_file.parent.resolve()) in sandbox.denied_paths()


def test_an_untouched_run_reads_clean(signed_run, capsys):
    by_folder, skipped = load_checked_by_folder([signed_run])
    assert skipped == [] and len(by_folder[str(signed_run)]) == 4
    assert not any(f in r.flags for r in by_folder[str(signed_run)] for f in digest.FLAGS.values())
    assert main(["compare", str(signed_run), str(signed_run)]) == 0
    assert "FLAGGED" not in capsys.readouterr().out


def test_a_rewritten_ssim_is_refused_by_the_board_and_compare(signed_run, tmp_path, capsys):
    forged = _copy(signed_run, tmp_path)
    target = _test_record(forged)
    _forge_ssim(target)
    _, skipped = load_checked_by_folder([forged])
    assert len(skipped) == 1 and skipped[0][0] == forged.name
    assert f"records/{target.name} was rewritten after the harness wrote it" in skipped[0][1]
    # the board leaves it out, with the reason in its notes; the CLI says so in one line naming the file
    board = tmp_path / "board"
    build_from_dirs([forged], board, ["md"])
    notes = (board / "README.md").read_text().replace("\\", "")  # Markdown escapes the file name's "_"
    assert f"records/{target.name} was rewritten after the harness wrote it" in notes
    assert main(["leaderboard", "--records", str(forged.parent), "--out", str(tmp_path / "lb")]) == 0
    left_out = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("LEFT OUT")]
    assert len(left_out) == 1 and target.name in left_out[0] and "rewritten" in left_out[0]
    assert main(["compare", str(forged), str(signed_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be compared" in err[0] and target.name in err[0]
    # without the digests the same forgery passes every claim check: the digest is what catches it
    shutil.rmtree(forged / "digests")
    by_folder, skipped = load_checked_by_folder([forged])
    assert skipped == []
    forged_rec = next(r for r in by_folder[str(forged)] if r.split.value == "test" and
                      r.protection_mean["ssim"] == FORGED_SSIM)
    assert "unsigned" in forged_rec.flags  # ... and is then flagged, never silently ok


def _refusal(folder: Path) -> str:
    _, skipped = load_checked_by_folder([folder])
    assert len(skipped) == 1, skipped
    return skipped[0][1]


def test_a_record_missing_from_the_manifest_or_a_forged_digest_is_refused(signed_run, tmp_path):
    missing = _copy(signed_run, tmp_path, "missing")
    target = _test_record(missing)
    (missing / "digests" / f"{target.name}.hmac").unlink()
    assert f"records/{target.name} has no digest" in _refusal(missing)

    # a forger who recomputes the sha256 in the digest file still lacks the key for the HMAC
    forged = _copy(signed_run, tmp_path, "forged")
    target = _test_record(forged)
    _forge_ssim(target)
    dfile = forged / "digests" / f"{target.name}.hmac"
    body = json.loads(dfile.read_text())
    body["sha256"] = __import__("hashlib").sha256(target.read_bytes()).hexdigest()
    dfile.write_text(json.dumps(body))
    assert "does not carry this machine's HMAC" in _refusal(forged)

    # a removed record (one cell of the grid dropped) is named too
    removed = _copy(signed_run, tmp_path, "removed")
    gone = _test_record(removed)
    gone.unlink()
    assert f"digests/{gone.name}.hmac names a record the folder no longer holds" in _refusal(removed)


def test_a_folder_without_digests_reads_unsigned_and_is_flagged(signed_run, tmp_path, capsys):
    legacy = _copy(signed_run, tmp_path)
    shutil.rmtree(legacy / "digests")
    by_folder, skipped = load_checked_by_folder([legacy])
    assert skipped == [] and all("unsigned" in r.flags for r in by_folder[str(legacy)])
    board = tmp_path / "board"
    build_from_dirs([legacy], board, ["md", "csv"])
    assert "unsigned" in (board / "leaderboard.csv").read_text()
    assert main(["compare", str(legacy), str(signed_run)]) == 0
    out = capsys.readouterr().out
    assert f"FLAGGED A {legacy.name}: 4 record(s) unsigned" in out and "FLAGGED B" not in out


def test_a_folder_moved_from_another_machine_reads_unsigned_by_this_machine(signed_run, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "other-machine"))
    by_folder, skipped = load_checked_by_folder([signed_run])
    assert skipped == []
    assert all("unsigned-by-this-machine" in r.flags for r in by_folder[str(signed_run)])
    assert not (tmp_path / "other-machine").exists()  # reading never makes a key


def test_resume_recomputes_a_rewritten_cell_and_the_folder_verifies_again(signed_run, tmp_path):
    resumed = _copy(signed_run, tmp_path)
    honest = load_records(resumed)
    target = _test_record(resumed)
    _forge_ssim(target)
    res = spdbench.run("uniform-noise", suite="test-fast", out=resumed)
    assert res.ok and res.computed == [target.name[:-len(".json")]] and len(res.reused) == 3
    by_folder, skipped = load_checked_by_folder([resumed])
    assert skipped == [] and not any(r.flags for r in by_folder[str(resumed)])
    again = {r.cell_id: r.protection_mean["ssim"] for r in load_records(resumed)}
    assert again == {r.cell_id: r.protection_mean["ssim"] for r in honest}  # the forged 0.05 is gone
    # a second resume over the signed folder reuses everything and it still reads clean
    res = spdbench.run("uniform-noise", suite="test-fast", out=resumed)
    assert res.computed == [] and len(res.reused) == 4
    assert load_checked_by_folder([resumed])[1] == []


def test_resume_of_a_folder_written_before_digests_marks_its_old_records_unsigned(signed_run, tmp_path):
    legacy = _copy(signed_run, tmp_path)
    shutil.rmtree(legacy / "digests")
    redo = _test_record(legacy)
    redo.unlink()
    res = spdbench.run("uniform-noise", suite="test-fast", out=legacy)
    assert res.computed == [redo.name[:-len(".json")]] and len(res.reused) == 3
    by_folder, skipped = load_checked_by_folder([legacy])
    assert skipped == []
    flags = {r.cell_id: r.flags for r in by_folder[str(legacy)]}
    assert "unsigned" not in flags.pop(redo.name[:-len(".json")])
    assert all("unsigned" in f for f in flags.values())  # not written by this harness run: not vouched for


def test_a_key_others_can_read_is_refused_and_the_record_reads_unsigned(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    key = digest.load_key(create=True)
    assert key is not None and len(key) == 32 and digest.load_key() == key
    os.chmod(digest.key_path(), 0o644)
    with pytest.raises(digest.KeyFileError, match="chmod 600"):
        digest.load_key()
    folder = tmp_path / "run"
    assert not digest.sign_record(folder, "records/x.json", b"{}", atomic_write_bytes)
    assert "is not signed" in caplog.text and not (folder / "digests").exists()


def test_concurrent_first_use_makes_one_whole_key(tmp_path, monkeypatch):
    """On a fresh machine every pytest-xdist worker (or grid task) may create the key at once: each
    must read a whole key, and all the same one (a reader seeing a half-written file made records
    unsigned)."""
    import multiprocessing as mp

    from spdbench.store import digest

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    ctx = mp.get_context("fork")
    with ctx.Pool(6) as pool:
        keys = pool.map(_load_or_create, range(24))
    assert len(set(keys)) == 1 and len(keys[0]) == 2 * digest._KEY_BYTES
    leftovers = [p.name for p in (tmp_path / "cfg" / "spdbench").iterdir() if p.name != digest.KEY_NAME]
    assert leftovers == []


def _load_or_create(_):
    from spdbench.store import digest

    return digest.load_key(create=True).hex()
