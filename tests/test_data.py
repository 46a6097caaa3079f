import json

import numpy as np
import pytest
import torch
from PIL import Image

import spdbench
from spdbench.data.photos import (BUNDLED, bundled_split, load_folder, load_manifest, split_indices, write_manifest)
from spdbench.errors import InputError


def test_bundled_photos_are_real_colour_photos():
    assert len(BUNDLED) >= 8
    x = spdbench.load_photos(size=64)
    assert x.shape == (len(BUNDLED), 3, 64, 64) and x.dtype == torch.float32
    assert torch.equal(x, torch.round(x * 255) / 255), "photos are on the 8-bit grid"
    # colour: channels differ noticeably for every photo
    assert ((x[:, 0] - x[:, 2]).abs().mean(dim=(1, 2)) > 0.01).all()
    assert all(p.license for p in BUNDLED)


def test_split_is_deterministic_and_protocol_sized():
    tr, te = split_indices(100)
    assert (len(tr), len(te)) == (64, 36) and not set(tr) & set(te)
    assert split_indices(100) == (tr, te) and split_indices(100, seed=1) != (tr, te)
    s = bundled_split()
    assert not set(s["train"]) & set(s["test"]) and len(s["test"]) >= 3


def test_load_photos_selection_errors():
    with pytest.raises(InputError, match="multiple of 8"):
        spdbench.load_photos(size=30)
    with pytest.raises(InputError, match="unknown bundled photo"):
        spdbench.load_photos(names=["lena"])
    with pytest.raises(InputError, match="n must be between"):
        spdbench.load_photos(n=0)


def test_folder_and_manifest(tmp_path):
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    x, names = load_folder(tmp_path, size=32)
    assert x.shape == (3, 3, 32, 32) and names == ["0.png", "1.png", "2.png"]
    m = write_manifest(names, tmp_path / "m.json", root=tmp_path)
    y, _ = load_manifest(m, tmp_path, size=32)
    assert torch.equal(x, y)
    # tampered file -> sha256 mismatch names the file
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "1.png")
    with pytest.raises(InputError, match="sha256 of 1.png"):
        load_manifest(m, tmp_path, size=32)


def test_folder_errors(tmp_path):
    with pytest.raises(InputError, match="contains no images"):
        load_folder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable image"):
        load_folder(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_folder(tmp_path / "nope")


def test_manifest_path_traversal_refused(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"format": "spdbench-manifest/1",
                                                  "images": [{"file": "../etc/passwd", "sha256": "0"}]}))
    with pytest.raises(InputError, match="without '..'"):
        load_manifest(tmp_path / "m.json", tmp_path)
