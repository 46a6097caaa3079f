"""Example strips beside the records (examples.py) and `spdbench show` (show.py): a reader sees a
protected photo beside its failed edit."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import spdbench
from entry_helpers import copy, run_dir, suite_registered  # noqa: F401 (fixtures)
from spdbench.cli import main
from spdbench.errors import InputError
from spdbench.store.strips import MAX_SIDE, PER_CELL, example_rel, strip_png
from spdbench.harness.pipeline import load_protection
from spdbench.store.records import load_records
from spdbench.verify.submit import verify


def test_every_test_cell_has_its_strips_and_they_show_the_photo_and_its_protection(run_dir):  # noqa: F811
    from spdbench.images import image_sha256

    records = load_records(run_dir)
    photos = spdbench.load_photos(n=4, size=64)
    by_sha = {image_sha256(p): k for k, p in enumerate(photos)}
    as_8bit = lambda t: (t.permute(1, 2, 0).numpy() * 255).round().astype(np.int16)  # noqa: E731
    for rec in records:
        strips = sorted(run_dir.glob(f"examples/{rec.cell_id}__*.png"))
        if rec.split.value == "train":
            assert not strips
            continue
        assert len(strips) == min(PER_CELL, len(rec.image_names))
        protected = load_protection(run_dir / rec.perturbation_file, photos)
        for name, sha in list(zip(rec.image_names, rec.image_sha256))[:PER_CELL]:
            img = np.asarray(Image.open(run_dir / example_rel(rec.cell_id, name)))
            assert img.shape == (64, 6 * 64 + 5 * 4, 3), "photo, protected, delta, 2 edits, worst purified edit"
            panel = lambda k: img[:, k * 68:k * 68 + 64].astype(np.int16)  # noqa: E731
            k = by_sha[sha]
            assert np.array_equal(panel(0), as_8bit(photos[k])) and np.array_equal(panel(1), as_8bit(protected[k]))
            assert not np.array_equal(panel(0), panel(1)), "uniform noise changes the photo"
            assert not np.array_equal(panel(3), panel(4)), "the protected photo's edit differs from the photo's"


def test_large_photos_are_downscaled_in_the_strip():
    data = strip_png([torch.rand(3, 512, 512), torch.rand(3, 512, 512)])
    img = Image.open(io.BytesIO(data))
    assert img.size == (2 * MAX_SIDE + 4, MAX_SIDE)


def test_show_writes_one_self_contained_page_and_the_folder_still_verifies(run_dir, tmp_path):  # noqa: F811
    folder = copy(run_dir, tmp_path)
    assert main(["show", str(folder)]) == 0
    page = (folder / "report.html").read_text()
    assert page.startswith("<!doctype html>")
    strips = list(folder.glob("examples/*.png"))
    assert len(strips) >= 2 and page.count("data:image/png;base64,") == len(strips), "every strip, embedded"
    assert "Loss curves" not in page, "uniform noise optimizes nothing: no loss plot"
    assert "uniform-noise on test-fast" in page and "worst purified edit" in page and "jpeg75" in page
    assert "src=\"http" not in page and "src='http" not in page
    assert "<th>SSIM ↓</th><th>PSNR ↓</th><th>VIFp ↓</th><th>FSIM ↓</th>" in page, "heads from the metric registry"
    report = verify(folder, rerun=False)
    assert report.ok, report.problems
    entry_copy = tmp_path / "lb"
    rep, entry = spdbench.verify.submit.submit(folder, leaderboard_dir=entry_copy, name="with-report", rerun=False)
    assert entry is not None and not (entry / "report.html").exists() and list(entry.glob("examples/*.png"))
    with pytest.raises(InputError, match="leaderboard entry"):
        spdbench.report.run_page.write_report(entry)


def test_show_refuses_what_is_not_a_run_in_one_line(tmp_path, capsys):
    assert main(["show", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "not an existing folder" in err[0]


def test_the_leaderboard_page_shows_each_methods_photo_across_the_budgets(run_dir, tmp_path):  # noqa: F811
    """Figure 3 layout: the photo and its edit, then the protected photo and its edit per eps; the
    page links the strips where they are (no copy) and each link resolves."""
    import re

    from spdbench.report.board import build_from_dirs

    out = tmp_path / "lb"
    build_from_dirs([run_dir], out)
    page = (out / "index.html").read_text()
    assert "Gallery: one test photo across the budgets" in page
    assert "<th>eps 8/255</th><th>eps 16/255</th>" in page
    assert page.count("n/a (CPU)") == 2 * 2, "device seconds and peak memory: no counter on CPU, said so"
    srcs = re.findall(r'<img src="([^"]+\.png)" width="(\d+)" height="128"\s+style="margin-left:-(\d+)px"', page)
    assert len(srcs) == 2 + 2 * 2, srcs  # photo + clean edit, then protected + edit per eps
    for src, width, left in srcs:
        path = (out / src).resolve()
        assert path.is_file() and path.parent.name == "examples"
        assert int(left) % 136 == 0 and int(width) == 6 * 128 + 5 * 8  # 64 px panels shown at 128 px
