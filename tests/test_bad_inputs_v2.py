"""Issue 16, items 4 and 5, end to end: every bad input of the issue's "Tracebacks instead of
one-line errors" and "Silently wrong" lists (submission tampering aside) given to `spdbench.run` or
to the CLI. Each refusal is a SpdbenchError (CLI: exit 2, one line) whose message names the
argument and the value; each accepted conversion is checked; nothing already written is lost.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import spdbench
from spdbench import cli
from spdbench.errors import BudgetError, InputError, SpdbenchError, TargetLoadError
from spdbench.data.photos import write_manifest
from spdbench.store.records import read_record
from spdbench.store.runfolder import LOCK_NAME, DiskError, RunLockedError

from fs_faults import hold_lock_in_other_process, inject_fault, temp_files
from harness_helpers import fast_images, fast_suite
from test_input_contracts import _png

REPO = Path(__file__).resolve().parents[1]



def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(text: str) -> str:
    assert text.strip() and "\n" not in text.strip(), f"not one line: {text!r}"
    return text


@pytest.fixture
def existing(tmp_path):
    """An already finished run folder (a copy of a committed smoke entry) that must survive untouched."""
    out = tmp_path / "existing"
    shutil.copytree(REPO / "leaderboard" / "entries" / "smoke-none", out)
    before = _snapshot(out)
    yield out
    assert _snapshot(out) == before, "a bad input changed files that were already written"


def api(tmp_path: Path, attack: str = "none", **kw):
    """spdbench.run with a cheap setup: tiny-random, 2 photos at 64 px, the attack in this process."""
    args = dict(suite=fast_suite(), target="tiny-random", out=tmp_path / "run", isolation="none")
    if "data" not in kw and "manifest" not in kw:
        args["images"] = fast_images(2)
    args.update(kw)
    return spdbench.run(attack, **args)


def cli_run(capsys, *extra: str) -> tuple[int, str]:
    code = cli.main(["run", "--attack", "none", "--suite", "smoke", "--target", "tiny-random", "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def _photos(folder: Path, n: int = 2, side: int = 72) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (np.random.default_rng(i).random((side, side + 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"photo{i}.png")
    return folder


# --- image files --------------------------------------------------------------------------------
def test_png_declaring_20000x20000_is_one_line(tmp_path, existing):
    data = _photos(tmp_path / "photos")
    (data / "bomb.png").write_bytes(_png(20000, 20000, 8, 2, b"\0" * 16))
    with pytest.raises(InputError) as info:
        api(tmp_path, data=data)
    msg = _one_line(str(info.value))
    assert "bomb.png" in msg and "decompression bomb" in msg
    assert not (tmp_path / "run").exists(), "refused before the run folder was created"


@pytest.mark.parametrize("w,h", [(1, 1), (1, 500), (8, 8)])
def test_images_smaller_than_the_suite_size_are_refused_not_upscaled(tmp_path, existing, w, h):
    data = _photos(tmp_path / "photos")
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(data / "tiny.png")
    with pytest.raises(InputError) as info:
        api(tmp_path, data=data)
    msg = _one_line(str(info.value))
    assert "tiny.png" in msg and f"{w}x{h} px" in msg and "image size 64" in msg


def test_16bit_greyscale_png_loads_scaled(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    grey16 = (np.random.default_rng(0).random((64, 64)) * 65535).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "a" / "g16.png")
    Image.fromarray(np.round(grey16 / 65535 * 255).astype(np.uint8)).convert("RGB").save(tmp_path / "b" / "g8.png")
    sixteen, names = fast_suite().load_images(tmp_path / "a")  # the door run(data=...) uses
    eight, _ = fast_suite().load_images(tmp_path / "b")
    assert names == ["g16.png"] and torch.equal(sixteen, eight), "16-bit loads as its 8-bit rounding"
    assert float((sixteen == 1.0).float().mean()) < 0.01, "was 99.6% white"


def test_duplicate_photos_in_a_folder_are_refused(tmp_path, existing):
    data = _photos(tmp_path / "photos")
    shutil.copy(data / "photo0.png", data / "photo0-copy.png")
    with pytest.raises(InputError, match="same image twice: 'photo0-copy.png' and 'photo0.png'|"
                                         "same image twice: 'photo0.png' and 'photo0-copy.png'"):
        api(tmp_path, data=data)


def test_60px_images_are_refused_not_edited_at_56px(tmp_path, existing):
    x = torch.round(torch.rand(2, 3, 60, 60, generator=torch.Generator().manual_seed(0)) * 255) / 255
    with pytest.raises(InputError) as info:
        api(tmp_path, images=x)
    assert "60x60 px" in _one_line(str(info.value)) and "multiples of 8" in str(info.value)


# --- manifests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,needle", [
    ("no-sha256", "needs 'sha256'"), ("images-not-list", "'images' must be a list"),
    ("list-of-strings", "images[0] must be an object"), ("duplicate-entry", "lists 'photo0.png' again"),
])
def test_malformed_manifest_is_one_line(tmp_path, existing, case, needle):
    data = _photos(tmp_path / "photos")
    m = write_manifest(["photo0.png", "photo1.png"], tmp_path / "m.json", root=data)
    doc = json.loads(m.read_text())
    entries = doc["images"]
    doc["images"] = {"no-sha256": [{"file": e["file"]} for e in entries],
                     "images-not-list": "photo0.png,photo1.png",
                     "list-of-strings": [e["file"] for e in entries],
                     "duplicate-entry": entries + [entries[0]]}[case]
    m.write_text(json.dumps(doc))
    with pytest.raises(InputError) as info:
        api(tmp_path, manifest=m, data=data)
    msg = _one_line(str(info.value))
    assert needle in msg and "m.json" in msg


# --- --out ----------------------------------------------------------------------------------------
def _bad_out(tmp_path: Path, case: str) -> Path:
    blocker = tmp_path / "blocker"
    if case == "file":
        blocker.write_text("precious")
        return blocker
    if case == "under-a-file":
        blocker.write_text("precious")
        return blocker / "run"
    out = tmp_path / "run"
    out.mkdir()
    (out / "records").write_text("precious")
    return out


OUT_CASES = [("file", "is a file, not a folder"), ("under-a-file", "lies under"), ("records-is-file", "'records'")]


@pytest.mark.parametrize("case,needle", OUT_CASES)
def test_cli_out_that_cannot_hold_a_run(tmp_path, capsys, case, needle):
    out = _bad_out(tmp_path, case)
    before = _snapshot(tmp_path)
    code, err = cli_run(capsys, "--out", str(out))
    assert code == 2 and needle in _one_line(err) and str(out) in err and err.startswith("spdbench run: error:")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("case,needle", OUT_CASES)
def test_api_out_that_cannot_hold_a_run(tmp_path, case, needle):
    out = _bad_out(tmp_path, case)
    before = _snapshot(tmp_path)
    with pytest.raises(SpdbenchError) as info:
        api(tmp_path, out=out)
    assert needle in _one_line(str(info.value)) and str(out) in str(info.value)
    assert _snapshot(tmp_path) == before, "refused before anything was computed or written"


# --- read-only folder and full disk ----------------------------------------------------------------
def test_cli_read_only_out_is_one_line(tmp_path, capsys, monkeypatch, existing):
    inject_fault(monkeypatch, existing, errno.EROFS, on="open")
    code, err = cli_run(capsys, "--out", str(existing))
    assert code == 2 and "read-only" in _one_line(err) and "EROFS" in err
    assert list(temp_files(existing)) == []


def test_api_read_only_out_is_refused_before_the_attack_runs(tmp_path, monkeypatch, existing):
    inject_fault(monkeypatch, existing, errno.EROFS, on="open")
    with pytest.raises(DiskError) as info:
        api(tmp_path, out=existing)
    msg = _one_line(str(info.value))
    assert "read-only" in msg and "write to the run folder" in msg
    assert list(temp_files(existing)) == []


def test_api_read_only_out_ends_the_run_with_one_line(tmp_path, monkeypatch, existing):
    inject_fault(monkeypatch, existing, errno.EROFS, on="open")
    with pytest.raises(DiskError) as info:
        api(tmp_path, out=existing)
    assert "read-only" in _one_line(str(info.value)) and str(existing) in str(info.value)
    assert list(temp_files(existing)) == []


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished fast run (eps 16/255, prompt P3) written under umask 022."""
    out = tmp_path_factory.mktemp("finished") / "run"
    old = os.umask(0o022)
    try:
        spdbench.run("uniform-noise", suite=fast_suite(), out=out, target="tiny-random", images=fast_images(4),
                     isolation="none")
    finally:
        os.umask(old)
    return out


def _resume_case(finished: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out, _snapshot(out)


def _run_more(out: Path, **kw):
    # the clean-edit cache inside the run folder: these tests inject faults into the folder's writes
    args = dict(suite=fast_suite(), out=out, target="tiny-random", images=fast_images(4), isolation="none",
                prompts=["P3", "P4"], cache_dir=out / "cache")
    args.update(kw)
    return spdbench.run("uniform-noise", **args)


@pytest.mark.parametrize("where,code,on", [
    ("/cache/", errno.ENOSPC, "fsync"),    # the partial temporary file in the cache
    ("/records/", errno.ENOSPC, "fsync"),
    ("/records/", errno.EROFS, "open"),
])
def test_disk_fault_mid_run_is_one_line_leaves_no_partial_file_and_resumes(finished, tmp_path, monkeypatch,
                                                                           where, code, on):
    out, before = _resume_case(finished, tmp_path)
    fault = inject_fault(monkeypatch, out, code, on=on, match=where)
    with pytest.raises(DiskError) as info:
        _run_more(out)
    assert fault.hits >= 1
    msg = _one_line(str(info.value))
    assert errno.errorcode[code] in msg and where.strip("/") in msg and "resumes" in msg
    assert list(temp_files(out)) == [], "no partial temporary file"
    after = _snapshot(out)
    assert all(after.get(k) == v for k, v in before.items() if k.name != "records.jsonl"), "finished files kept"
    monkeypatch.undo()
    result = _run_more(out)
    assert result.ok and len(result.reused) == 2 and len(result.computed) == 2, "the next run resumes"
    assert {r.prompt_key for r in result.records} == {"P3", "P4"}


def test_disk_full_saving_a_perturbation_ends_the_run(finished, tmp_path, monkeypatch):
    out, _ = _resume_case(finished, tmp_path)
    inject_fault(monkeypatch, out, errno.ENOSPC, on="fsync", match="/perturbations/")
    with pytest.raises(DiskError, match="no space left"):
        _run_more(out, eps=["16/255", "8/255"], prompts=["P3"])
    assert list(temp_files(out)) == []
    assert not any(read_record(p).status == "error" for p in (out / "records").glob("*.json")), \
        "a disk fault ends the run; it is not recorded as a failed cell"


# --- record files, eps conversions, locks on a finished folder -----------------------------------
def test_written_files_respect_the_umask(finished):
    files = [p for p in finished.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".safetensors")]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}, "was 0600 whatever the umask"


@pytest.mark.parametrize("eps", [np.float32(16 / 255), torch.tensor(16 / 255), np.array(16 / 255)],
                         ids=["np.float32", "tensor", "0-d array"])
def test_numpy_and_tensor_eps_are_the_same_budget(finished, tmp_path, eps):
    out, before = _resume_case(finished, tmp_path)
    result = _run_more(out, eps=eps, prompts=["P3"])
    assert result.computed == [] and len(result.reused) == 2, "same cells as eps='16/255'"
    assert {r.eps_label for r in result.records} == {"16/255"}


def test_stale_lock_of_a_dead_process_is_taken_over(finished, tmp_path):
    out, _ = _resume_case(finished, tmp_path)
    proc = hold_lock_in_other_process(out)
    proc.kill()
    proc.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid
    result = _run_more(out, prompts=["P3"])
    assert result.ok and len(result.reused) == 2
    assert not (out / LOCK_NAME).exists(), "the run took the stale lock over and released it"


def _release(proc, out: Path) -> None:
    """Stop the holder and remove the lock file its SIGKILL leaves (it is not part of `existing`)."""
    proc.kill()
    proc.wait()
    (out / LOCK_NAME).unlink(missing_ok=True)


def test_cli_second_run_on_a_locked_out_is_one_line(tmp_path, capsys, existing):
    proc = hold_lock_in_other_process(existing)
    try:
        code, err = cli_run(capsys, "--out", str(existing))
    finally:
        _release(proc, existing)
    assert code == 2 and f"process {proc.pid}" in _one_line(err) and "in use by another run" in err


def test_api_second_run_on_a_locked_out_is_one_line(tmp_path, existing):
    proc = hold_lock_in_other_process(existing)
    try:
        with pytest.raises(RunLockedError) as info:
            api(tmp_path, out=existing)
    finally:
        _release(proc, existing)
    assert f"process {proc.pid}" in _one_line(str(info.value))


# --- devices, dtypes, names, suites -----------------------------------------------------------------
DEVICES = ["foo", "gpu", "cuda:7"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", DEVICES)
def test_cli_bad_device_is_one_line(tmp_path, capsys, device):
    if device == "cuda:7" and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, err = cli_run(capsys, "--out", str(tmp_path / "run"), "--device", device)
    assert code == 2 and f"device {device!r}" in _one_line(err)
    assert not (tmp_path / "run").exists(), "refused before the run folder was created"


@pytest.mark.parametrize("device", DEVICES)
def test_api_bad_device_is_one_line(tmp_path, device):
    if device == "cuda:7" and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(InputError) as info:
        api(tmp_path, device=device)
    assert f"device {device!r}" in _one_line(str(info.value))


@pytest.mark.parametrize("kw,error,needle", [
    (dict(target="tiny-random-abc"), TargetLoadError, "target 'tiny-random-abc'"),
    (dict(dtype=torch.int32), TargetLoadError, "dtype torch.int32 is not a model dtype"),
    (dict(suite=None), InputError, "suite must be a suite name"),
    (dict(eps="300/255"), BudgetError, "at most 1 = 255/255"),
    (dict(eps=""), SpdbenchError, "empty"),
    (dict(eps=[]), SpdbenchError, "empty"),
])
def test_api_bad_arguments_are_one_line(tmp_path, existing, kw, error, needle):
    with pytest.raises(error) as info:
        api(tmp_path, **kw)
    msg = _one_line(str(info.value))
    assert needle in msg and "/255/255" not in msg
    assert not (tmp_path / "run").exists()


def test_cli_empty_eps_is_refused_not_the_default_grid(tmp_path, capsys):
    code, err = cli_run(capsys, "--out", str(tmp_path / "run"), "--eps", "")
    assert code == 2 and "--eps ''" in _one_line(err) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("eps", [1e-30, 0.4 / 255])
def test_eps_below_half_an_8bit_level_is_refused(tmp_path, eps):
    """Issue 40: eps 1e-30 ran, and measured the clean photo under the attack's name (no pixel of an
    8-bit photo moves by less than half a level); now one line, before anything is written."""
    with pytest.raises(BudgetError) as info:
        api(tmp_path, eps=eps, prompts=["P4"])
    msg = _one_line(str(info.value))
    assert "below half an 8-bit level" in msg and "expected eps >=" in msg and "0/255" not in msg
    assert not (tmp_path / "run").exists()
    assert api(tmp_path, eps=0.5 / 255, prompts=["P4"]).ok, "half a level is the smallest budget accepted"


@pytest.mark.parametrize("argv,needle", [
    (["--prompts", ""], "--prompts '' holds an empty name"),
    (["--prompts", "P3,"], "--prompts 'P3,' holds an empty name"),
    (["--purifiers", ""], "--purifiers '' holds an empty name"),
    (["--purifiers", "jpeg75,jpeg75"], "lists 'jpeg75' more than once"),
    (["--out", ""], "--out '' is empty"),
    (["--eps", "1e-30"], "eps 1e-30 (linf) is below half an 8-bit level"),
    (["--compile", "bogusbackend"], "compile backend 'bogusbackend' is not a torch.compile backend"),
    (["--target", ""], "target must be a model name"),
    (["--attack", "none,"], "--attack 'none,' holds an empty name"),
])
def test_cli_input_that_was_silently_accepted_is_one_line(tmp_path, capsys, monkeypatch, argv, needle):
    """Issue 40: each of these ran with a default in its place (or a traceback after the models
    loaded, for --compile); now one line, exit 2, nothing created."""
    monkeypatch.chdir(tmp_path)  # --out '' used to mean the default folder under the working directory
    extra = argv if "--out" in argv else [*argv, "--out", str(tmp_path / "run")]
    code, err = cli_run(capsys, *extra)
    assert code == 2 and needle in _one_line(err) and err.startswith("spdbench run: error:"), err
    assert list(tmp_path.iterdir()) == [], "refused before anything was created"


@pytest.mark.parametrize("kw,needle", [
    (dict(prompts=[]), "prompts [] holds no name"),
    (dict(prompts="P3"), "prompts must be a list of names"),
    (dict(purifiers=["jpeg75", "blur1", "jpeg75"]), "lists 'jpeg75' more than once"),
    (dict(purifiers=[""]), "purifiers [''] holds no name or an empty one"),
    (dict(out=""), "out '' is empty"),
    (dict(compile_backend="bogusbackend"), "compile backend 'bogusbackend'"),
    (dict(cache_dir=""), "cache_dir '' is not a path"),
    (dict(image_names=["a", "b", "c"]), "got 2 images but 3 image names"),
    (dict(images=fast_images(2), data="somewhere"), "images were given together with data/manifest"),
    (dict(progress="yes"), "progress must be True or False"),
])
def test_api_input_that_was_silently_accepted_is_one_line(tmp_path, kw, needle):
    with pytest.raises(SpdbenchError) as info:
        api(tmp_path, **kw)
    assert needle in _one_line(str(info.value))
    assert not (tmp_path / "run").exists()


def test_api_purifiers_empty_list_means_none(tmp_path):
    """[] is the CLI's --purifiers none: scored without purifiers (not the suite's list, not an error)."""
    res = api(tmp_path, purifiers=[], prompts=["P4"], suite=fast_suite(purifiers=("jpeg75",)))
    assert res.ok and all(r.purified == {} for r in res.records)


def test_leaderboard_out_that_is_a_file_is_one_line(tmp_path, capsys, existing):
    """Issue 40: a traceback after every record had been read; now one line before any is read."""
    for out in (tmp_path / "board.txt", tmp_path / "board.txt" / "sub"):
        (tmp_path / "board.txt").write_text("precious")
        code = cli.main(["leaderboard", "--records", str(existing.parent), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"--out {str(out)!r}" in _one_line(err) and "file" in err, err
        assert (tmp_path / "board.txt").read_text() == "precious"
    code = cli.main(["leaderboard", "--records", str(existing.parent), "--out", ""])
    assert code == 2 and "--out '' is empty" in capsys.readouterr().err


# --- CLI options --------------------------------------------------------------------------------
def test_verify_negative_sample_exits_2(tmp_path, capsys, existing):
    with pytest.raises(SystemExit) as info:
        cli.main(["verify", str(existing), "--sample", "-1"])
    assert info.value.code == 2 and "argument --sample" in capsys.readouterr().err


def test_leaderboard_unknown_format_exits_2_and_writes_nothing(tmp_path, capsys, existing):
    with pytest.raises(SystemExit) as info:
        cli.main(["leaderboard", "--records", str(existing.parent), "--out", str(tmp_path / "lb"), "--format", "pdf"])
    assert info.value.code == 2 and "unknown format(s) 'pdf'" in capsys.readouterr().err
    assert not (tmp_path / "lb").exists()
