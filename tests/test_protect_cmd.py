"""`spdbench protect` / `spdbench.protect`: a user's own photos, per-image attack or a committed entry."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import spdbench
from spdbench.cli import _slow_dtype_warning, main
from spdbench.data.photos import load_photos, sha256_file

ROOT = Path(__file__).resolve().parents[1]
UNIVERSAL_ENTRY = ROOT / "leaderboard" / "entries" / "smoke-spd-encoder"
AMORTIZED_ENTRY = ROOT / "leaderboard" / "entries" / "smoke-amortized-encoder"
PER_IMAGE_ENTRY = ROOT / "leaderboard" / "entries" / "smoke-pca-minus"
SIZES = [(123, 101), (96, 130)]  # (h, w): neither a multiple of 8 on every side, not square


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    images = load_photos(n=2, size=136)
    for i, (img, (h, w)) in enumerate(zip(images, SIZES)):
        array = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)[:h, :w]
        Image.fromarray(array).save(folder / f"photo{i}.png")
    return folder


def _centre_crop8(array: np.ndarray) -> np.ndarray:
    h, w = array.shape[:2]
    nh, nw = h - h % 8, w - w % 8
    top, left = (h - nh) // 2, (w - nw) // 2
    return array[top:top + nh, left:left + nw]


def _check_within_budget(summary: dict, levels: int) -> None:
    """Outputs re-read from disk: the 8-bit difference to the (cropped) input is within eps and not zero,
    and the JSON's hashes and norms describe exactly those files."""
    for photo in summary["photos"]:
        clean = _centre_crop8(np.asarray(Image.open(photo["input"]).convert("RGB"))).astype(int)
        adv = np.asarray(Image.open(photo["output"])).astype(int)
        assert adv.shape == clean.shape and list(adv.shape[:2]) == photo["working_size_hw"]
        diff = np.abs(adv - clean).max()
        assert 0 < diff <= levels, f"{photo['output']}: {diff} levels, budget {levels}"
        assert photo["linf_levels"] == diff and photo["linf"] == pytest.approx(diff / 255)
        assert photo["l2"] == pytest.approx(np.sqrt((((adv - clean) / 255.0) ** 2).sum()))
        assert photo["output_sha256"] == sha256_file(photo["output"])
        assert photo["input_sha256"] == sha256_file(photo["input"])


def test_cli_protects_a_folder_with_a_per_image_attack(photo_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["protect", str(photo_folder), "--attack", "pca-minus", "--eps", "8/255", "--param", "steps=2",
               "--target", "tiny-random", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "protection.json").read_text())
    assert sorted(p.name for p in out.glob("*.png")) == ["photo0.png", "photo1.png"]
    assert summary["attack"] == "pca-minus" and summary["attack_kind"] == "per-image"
    assert summary["params"]["steps"] == 2 and summary["eps_label"] == "linf:8/255" and summary["norm"] == "linf"
    assert summary["target"]["name"].startswith("tiny-random") and len(summary["target"]["fingerprint"]) == 16
    assert [p["working_size_hw"] for p in summary["photos"]] == [[120, 96], [96, 128]]
    assert "multiple of 8" in summary["resize"]
    _check_within_budget(summary, 8)
    assert "2 photo(s) protected with pca-minus" in capsys.readouterr().out


def test_python_protect_applies_a_committed_universal_entry(photo_folder, tmp_path):
    photo = photo_folder / "photo1.png"
    summary = spdbench.protect(photo, from_entry=UNIVERSAL_ENTRY, eps="8/255", out=tmp_path / "p.png")
    assert summary["attack"] == "spd-encoder" and summary["attack_kind"] == "universal"
    assert summary["from_entry"] == "smoke-spd-encoder" and summary["target"]["name"] == "tiny"
    assert (tmp_path / "p.json").is_file() and (tmp_path / "p.png").is_file()
    _check_within_budget(summary, 8)
    # the same stored perturbation on a second photo: one universal delta, not a per-photo attack
    again = spdbench.protect(photo_folder / "photo0.png", from_entry=UNIVERSAL_ENTRY, eps="8/255",
                             out=tmp_path / "q.png")
    _check_within_budget(again, 8)


def test_python_protect_applies_a_committed_amortized_entry(photo_folder, tmp_path):
    """The entry's stored network runs (in a worker) on a photo of another size than it was fit on."""
    summary = spdbench.protect(photo_folder / "photo0.png", from_entry=AMORTIZED_ENTRY, eps="8/255",
                               out=tmp_path / "a.png")
    assert summary["attack_kind"] == "amortized" and summary["target"]["name"] == "tiny"
    _check_within_budget(summary, 8)


@pytest.mark.parametrize("argv, expected", [
    (["{missing}", "--attack", "pca-minus"], "does not exist"),
    (["{folder}", "--attack", "pca-minu", "--target", "tiny-random"], "Did you mean 'pca-minus'"),
    (["{folder}", "--from-entry", str(PER_IMAGE_ENTRY)], "is a per-image attack ('pca-minus')"),
    (["{folder}", "--attack", "spd-encoder", "--target", "tiny-random"], "apply a fitted one with --from-entry"),
    (["{folder}", "--attack", "pca-minus", "--from-entry", str(UNIVERSAL_ENTRY)], "exactly one of attack"),
    (["{folder}/photo0.png", "--attack", "pca-minus", "-o", "{tmp}/x.jpg"], "expected a .png file"),
    (["{folder}", "--from-entry", str(UNIVERSAL_ENTRY), "--eps", "4/255"], "expected one of them"),
    (["{folder}", "--from-entry", str(UNIVERSAL_ENTRY), "--target", "tiny-random"], "leave target out"),
])
def test_bad_inputs_are_one_line(photo_folder, tmp_path, capsys, argv, expected):
    argv = [a.format(missing=tmp_path / "nope.jpg", folder=photo_folder, tmp=tmp_path) for a in argv]
    assert main(["protect", *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "photos-protected").exists(), "nothing written on a refusal"


def test_half_dtype_on_cpu_warns_once(capsys):
    assert _slow_dtype_warning(None, "float16") and _slow_dtype_warning("cpu", "bfloat16")
    assert _slow_dtype_warning("cuda", "float16") is None and _slow_dtype_warning("cpu", "float32") is None
    main(["run", "--attack", "not-an-attack", "--dtype", "float16", "--suite", "smoke"])
    err = capsys.readouterr().err
    assert err.count("warning: --dtype float16 on the CPU") == 1
