"""Inpainting masks as data: deterministic sets per photo, PNG round trip, one-line errors."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from spdbench.errors import InputError
from spdbench.data.masks import latent_mask, load_masks, mask_set, mask_sha256, random_masks, save_masks, stroke_mask

NAMES = ["astronaut", "coffee", "chelsea"]


def test_mask_sets_are_deterministic_per_photo_and_binary():
    a = mask_set("strokes", NAMES, 64)
    assert a.shape == (3, 1, 64, 64) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a[1], mask_set("strokes", ["coffee"], 64)[0]), "a photo keeps its mask"
    assert not torch.equal(a[0], a[1])
    box = mask_set("centre-box", NAMES, 64)
    assert float(box[0].mean()) == pytest.approx(0.25) and box[0, 0, 32, 32] == 1 and box[0, 0, 0, 0] == 0
    with pytest.raises(ValueError, match="mask set 'cirkle'"):
        mask_set("cirkle", NAMES, 64)


def test_random_masks_cover_a_reasonable_share():
    g = torch.Generator().manual_seed(0)
    m = random_masks(32, 128, g, ("box", "strokes"))
    frac = m.flatten(1).mean(1)
    assert bool((frac > 0.01).all()) and bool((frac < 0.9).all())
    assert latent_mask(m, 8).shape == (32, 1, 16, 16)
    assert float(stroke_mask(128, torch.Generator().manual_seed(1)).sum()) > 0


def test_png_round_trip_and_hash(tmp_path):
    m = mask_set("strokes", NAMES, 64)
    save_masks(m, NAMES, tmp_path)
    back = load_masks(tmp_path, NAMES, 64)
    assert torch.equal(back, m) and mask_sha256(back[0]) == mask_sha256(m[0]) != mask_sha256(m[1])


def test_bad_mask_folders_are_one_line_errors(tmp_path):
    save_masks(mask_set("centre-box", NAMES[:2], 64), NAMES[:2], tmp_path)
    with pytest.raises(InputError, match=r"no mask for photo\(s\) \['chelsea'\]"):
        load_masks(tmp_path, NAMES, 64)
    with pytest.raises(InputError, match="is 64x64, the suite's photos are 128x128"):
        load_masks(tmp_path, NAMES[:2], 128)
    Image.new("L", (64, 64), 0).save(tmp_path / "chelsea.png")
    with pytest.raises(InputError, match="repaints nothing"):
        load_masks(tmp_path, NAMES, 64)
    (tmp_path / "chelsea.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable image"):
        load_masks(tmp_path, NAMES, 64)
    with pytest.raises(InputError, match="not a folder"):
        load_masks(tmp_path / "nope", NAMES, 64)


def test_subject_masks_are_the_hand_drawn_shapes_and_cover_every_bundled_photo(tmp_path):
    """The shipped PNGs are exactly what shapes.json draws (their provenance), one per bundled
    photo, each keeping a subject and repainting its surroundings."""
    import json
    import shutil

    from spdbench.data.photos import BUNDLED_NAMES
    from spdbench.data.masks import SUBJECT_DIR, draw_subject_pngs

    shutil.copy(SUBJECT_DIR / "shapes.json", tmp_path / "shapes.json")
    draw_subject_pngs(tmp_path)
    size = json.loads((SUBJECT_DIR / "shapes.json").read_text())["size"]
    assert torch.equal(load_masks(tmp_path, BUNDLED_NAMES, size), load_masks(SUBJECT_DIR, BUNDLED_NAMES, size))
    m = mask_set("subject", BUNDLED_NAMES, 128)
    assert m.shape == (len(BUNDLED_NAMES), 1, 128, 128) and set(m.unique().tolist()) == {0.0, 1.0}
    frac = m.flatten(1).mean(1)
    assert bool((frac > 0.1).all()) and bool((frac < 0.95).all()), frac.tolist()
    # the subject is kept: a portrait's face (centre top) is 0, the corners of most photos are 1
    hopper = BUNDLED_NAMES.index("grace_hopper")
    assert m[hopper, 0, 40, 64] == 0 and m[hopper, 0, 5, 5] == 1


def test_subject_masks_exist_for_bundled_photos_only():
    with pytest.raises(ValueError, match=r"bundled photos only; no mask for \['my-photo'\].*--masks DIR"):
        mask_set("subject", ["astronaut", "my-photo"], 64)
