"""The zoo's photo list (zoo/photos.json) and the v3 crop sampler: fast, no photos needed."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from spdbench.data.photos import BUNDLED, bundled_split
from spdbench.errors import InputError
from zoo import photos as zp
from zoo.train_tiny import CropSampler, package_weights


@pytest.fixture(scope="module")
def data() -> dict:
    return zp.load_list()


def test_list_is_complete_and_licensed(data):
    train = [e for e in data["photos"] if e["split"] == "train"]
    held = [e for e in data["photos"] if e["split"] == "heldout"]
    assert len(train) >= 250 and len(held) >= 10  # "a few hundred" photos, a held-out package
    for e in data["photos"]:
        assert re.fullmatch(r"[0-9a-f]{64}", e["sha256"]), e["name"]
        assert e["license"].strip() and e["caption"].startswith("a "), e["name"]
        assert e["package"] in data["packages"], e["name"]
    assert len({e["name"] for e in data["photos"]}) == len(data["photos"])
    assert len({e["sha256"] for e in data["photos"]}) == len(data["photos"])  # no file listed twice
    for name, pkg in data["packages"].items():
        assert pkg["source"] in ("debian", "pypi-installed"), name
        if pkg["source"] == "debian":
            assert pkg["version"] and re.fullmatch(r"[0-9a-f]{64}", pkg["deb_sha256"]), name


def test_heldout_package_never_trained_and_no_test_photo(data):
    zp._check_disjoint(data)  # the real list passes
    held = {e["package"] for e in data["photos"] if e["split"] == "heldout"}
    assert held and not held & {e["package"] for e in data["photos"] if e["split"] == "train"}
    test = {p.relpath for p in BUNDLED if p.name in bundled_split()["test"]}
    assert not test & {e["file"] for e in data["photos"] if e["split"] == "train"}


def test_disjointness_check_catches_leaks(data):
    leak = json.loads(json.dumps(data))
    moved = next(e for e in leak["photos"] if e["split"] == "train" and leak["packages"][e["package"]]["source"] == "debian")
    held = next(e for e in leak["photos"] if e["split"] == "heldout")
    moved["package"] = held["package"]
    with pytest.raises(InputError, match="both the train and the held-out"):
        zp._check_disjoint(leak)
    chelsea = next(p for p in BUNDLED if p.name == "chelsea")
    test_photo = json.loads(json.dumps(data))
    test_photo["photos"].append(dict(name="chelsea", package="scikit-image", file=chelsea.relpath, license="CC0",
                                     sha256="0" * 64, split="train", caption="a photo of a cat"))
    with pytest.raises(InputError, match="bundled test photos"):
        zp._check_disjoint(test_photo)


def test_missing_photos_dir_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="--photos DIR"):
        zp.photos("heldout", None)
    with pytest.raises(InputError, match="missing; run"):
        zp.photos("heldout", tmp_path)
    with pytest.raises(InputError, match="split 'test'"):
        zp.photos("test", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="--data-list"):
        zp.load_list(bad)


def test_debian_license_last_matching_stanza_wins():
    text = ("Format: x\n\nFiles: *\nCopyright: A\nLicense: GPL-2+\n\n"
            "Files: images/land/*\nCopyright: Various\nLicense: public-domain\n Taken from somewhere.\n\n"
            "Files:\n images/land/bw*\n images/land/x-sf*\nCopyright: B W\nLicense: CC-BY-SA-3.0\n\n"
            "Files: 16.04/pic.jpg\nCopyright: C\nLicense: CC0-1.0\n\n"
            "Files: debian/*\nCopyright: D\nLicense: Expat\n\nLicense: GPL-2+\n text\n")
    root = "usr/share/games/x/images/land/"
    assert zp.debian_license(text, root + "beach.jpg") == ("public-domain", "Various")
    assert zp.debian_license(text, root + "bw3.jpg") == ("CC-BY-SA-3.0", "B W")
    assert zp.debian_license(text, root + "x-sfiera.jpg")[0] == "CC-BY-SA-3.0"
    assert zp.debian_license(text, "usr/share/backgrounds/pic.jpg")[0] == "CC0-1.0"  # by base name
    assert zp.debian_license(text, "usr/share/doc/readme.png")[0] == "GPL-2+"  # debian/* never applies


def _photo(tmp_path, name, w, h, package="pkg"):
    path = tmp_path / f"{name}.png"
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return zp.ZooPhoto(name, package, path.name, "CC0-1.0", "", "train", "a photo", path)


def test_short_side_sampler_sees_every_photo_at_held_out_scales(tmp_path):
    big, small = _photo(tmp_path, "big", 1600, 1000), _photo(tmp_path, "small", 360, 180, "other")
    s = CropSampler([big, small], 64, 0.1, torch.Generator().manual_seed(0), "short_side")
    assert [min(wh) for wh in s.sizes[0]] == list(CropSampler.SHORT_SIDES)  # 1000 px: every level below
    assert [min(wh) for wh in s.sizes[1]] == [128, 180]  # native size kept when below the largest level
    assert all(abs(w / h - 1.6) < 0.01 for w, h in s.sizes[0])
    x = s.batch(6)
    assert x.shape == (6, 3, 64, 64) and float(x.min()) >= 0 and float(x.max()) <= 1
    frac = CropSampler([small], 64, 0.1, torch.Generator().manual_seed(0), "fraction")
    assert [min(wh) for wh in frac.sizes[0]] == [round(180 * f) for f in CropSampler.SCALES if round(180 * f) >= 64]
    with pytest.raises(ValueError, match="scale_mode"):
        CropSampler([small], 64, 0.1, torch.Generator(), "pixels")


def test_package_weights_give_each_package_a_sqrt_share(tmp_path):
    ps = [_photo(tmp_path, f"a{i}", 80, 80, "many") for i in range(9)] + [_photo(tmp_path, "b", 80, 80, "one")]
    w = package_weights(ps)
    share_many, share_one = sum(w[:9]), w[9]
    assert share_many / share_one == pytest.approx(3.0)  # sqrt(9) : sqrt(1)
    assert package_weights(list(BUNDLED[:2])) is None  # v2's bundled photos: uniform, as recorded
