"""Per-image export's two column families (issues 37 and 39): `ground_truth.<series>` from records of
offline instruction suites, and `challenge.<name>.<metric>` from the challenges the board applies
(verified as they are and still fitting the entry); a forged, unverified or stale challenge adds no
column. Pure data: records of a committed entry, challenge folders written here in the format
verify/challenge.py writes (its verification is tested with real models in tests/test_challenge.py).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from spdbench.images import image_sha256
from spdbench.report.board import build
from spdbench.report.export import IDENTITY, per_image_frame, write_per_image
from spdbench.report.site.build import write_site
from spdbench.store.records import Record, load_records
from spdbench.verify.challenge import (CHALLENGE_FILE, VERIFIED_FILE, Challenge, ChallengeCell, png_rel, read_png,
                                       read_verified)

ENTRY = Path(__file__).resolve().parents[1] / "leaderboard" / "entries" / "smoke-pca-minus"
EPS, PROMPT = "16/255", "P3"
#: the challenge's per-image values: distinct, so a value in the wrong row or column shows
SSIM, PSNR = [0.91, 0.92, 0.93, 0.94], [31.0, 32.0, 33.0, 34.0]


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return load_records(ENTRY)


def _cell(records: list[Record]) -> Record:
    return next(r for r in records if r.eps_label == EPS and r.prompt_key == PROMPT and r.split.value == "test")


def test_ground_truth_columns_carry_each_photos_series(records, tmp_path):
    """A record with ground truth exports `ground_truth.protected` / `.clean` per photo, in its photo
    order; records without it have empty cells; no column of the old schema is renamed or lost."""
    rec = _cell(records)
    n = len(rec.image_names)
    truth = {"protected": [20.0 + k for k in range(n)], "clean": [25.5 + k for k in range(n)]}
    with_truth = [r.model_copy(update={"ground_truth": truth}) if r.cell_id == rec.cell_id else r for r in records]
    before = per_image_frame({ENTRY.name: records})
    df = per_image_frame({ENTRY.name: with_truth})
    assert list(df.columns[:len(IDENTITY)]) == list(IDENTITY)
    assert set(before.columns) < set(df.columns)
    assert set(df.columns) - set(before.columns) == {"ground_truth.protected", "ground_truth.clean"}
    rows = df[df["cell_id"] == rec.cell_id].sort_values("image_index")
    assert list(rows["image_name"]) == rec.image_names
    assert list(rows["ground_truth.protected"]) == truth["protected"]
    assert list(rows["ground_truth.clean"]) == truth["clean"]
    assert df.loc[df["cell_id"] != rec.cell_id, "ground_truth.protected"].isna().all()
    back = pd.read_csv(write_per_image({ENTRY.name: with_truth}, tmp_path)[0])  # the CSV keeps them
    assert list(back.loc[back["cell_id"] == rec.cell_id, "ground_truth.clean"]) == truth["clean"]


def _file(board: Path, name: str, rec: Record, values: dict, manifest_sha: str | None) -> Path:
    """A challenge folder as verify/challenge.py writes it (purified PNGs, challenge.json) and, as
    `verify_challenge` writes it once the challenge reproduces, verification.json naming its sha256."""
    folder = board / "challenges" / name
    rng = np.random.default_rng(len(name))
    shas = []
    for image in rec.image_names:
        path = folder / png_rel(rec.eps_label, image)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        shas.append(image_sha256(read_png(path)))
    cell = ChallengeCell(cell_id=rec.cell_id, eps_label=rec.eps_label, prompt_key=rec.prompt_key,
                         split=rec.split.value, image_names=list(rec.image_names), values=values,
                         purified_sha256=shas)
    ch = Challenge(name=name, entry=ENTRY.name, entry_manifest_sha256=manifest_sha, suite=rec.suite,
                   purifier={"name": "noisy-upscale"}, editor_fingerprint=rec.target.fingerprint, device="cpu",
                   cells=[cell])
    raw = (ch.model_dump_json(indent=1) + "\n").encode()
    (folder / CHALLENGE_FILE).write_bytes(raw)
    verdict = {"kind": "spdbench-challenge-verification", "challenge_sha256": hashlib.sha256(raw).hexdigest()}
    (folder / VERIFIED_FILE).write_text(json.dumps(verdict))
    return folder


@pytest.fixture(scope="module")
def board(records, tmp_path_factory):
    """A leaderboard folder with one verified challenge of the entry and four that the board does not
    apply: forged after verification, never verified, a photo swapped, run against other entry files."""
    board = tmp_path_factory.mktemp("lb")
    rec = _cell(records)
    manifest = hashlib.sha256((ENTRY / "manifest.json").read_bytes()).hexdigest()
    good = _file(board, "good", rec, {"ssim": SSIM, "psnr": PSNR}, manifest)
    forged = board / "challenges" / "forged"  # its values raised after verification.json was written
    shutil.copytree(good, forged)
    data = json.loads((forged / CHALLENGE_FILE).read_text())
    data["name"], data["cells"][0]["values"]["ssim"] = "forged", [0.99] * len(SSIM)
    (forged / CHALLENGE_FILE).write_text(json.dumps(data))
    (_file(board, "unverified", rec, {"ssim": SSIM}, manifest) / VERIFIED_FILE).unlink()
    swapped = _file(board, "swapped", rec, {"ssim": SSIM}, manifest)
    names = rec.image_names
    shutil.copy(swapped / png_rel(EPS, names[1]), swapped / png_rel(EPS, names[0]))
    _file(board, "stale", rec, {"ssim": SSIM}, "0" * 64)  # verified, but of other files of the entry
    written = build(records, board, formats=["csv"], by_folder={str(ENTRY): records})
    return board, written


def test_only_the_boards_verified_challenge_adds_columns_with_its_values(records, board):
    lb, written = board
    df = pd.read_csv(written["per-image"])
    assert list(df.columns[:len(IDENTITY)]) == list(IDENTITY)
    # one column per purifier (the challenge "good" ran noisy-upscale), not one per challenge
    assert sorted(c for c in df.columns if c.startswith("challenge.")) == ["challenge.noisy-upscale.psnr",
                                                                           "challenge.noisy-upscale.ssim"]
    rec = _cell(records)
    rows = df[df["cell_id"] == rec.cell_id].sort_values("image_index")
    assert list(rows["image_name"]) == rec.image_names
    assert np.allclose(rows["challenge.noisy-upscale.ssim"], SSIM, rtol=0, atol=1e-12)
    assert np.allclose(rows["challenge.noisy-upscale.psnr"], PSNR, rtol=0, atol=1e-12)
    assert df.loc[df["cell_id"] != rec.cell_id, "challenge.noisy-upscale.ssim"].isna().all()
    # the board applied the same one: the ranking's purification column and its worst case by it
    ranking = pd.read_csv(written["csv"])
    assert "ssim_after_challenge:noisy-upscale" in ranking.columns
    assert not [c for c in ranking.columns if any(n in c for n in ("forged", "unverified", "swapped", "stale"))]


def test_challenges_the_board_refuses_are_listed_not_exported(board):
    """The others are left out with the board's reasons (the page lists them), never crash the export."""
    lb, _ = board
    found, left = read_verified(lb / "challenges")
    assert [c.name for c in found] == ["good", "stale"]
    reasons = dict(left)
    assert set(reasons) == {"forged", "swapped", "unverified"}
    assert "not verified as it is" in reasons["forged"] and "not verified as it is" in reasons["unverified"]
    assert "is not the purified photo challenge.json names" in reasons["swapped"]


def test_a_challenge_of_other_photos_joins_no_record(records, board):
    """The board's rule (flags.with_challenges): a challenge cell joins a record only with the
    record's photos in the record's order; otherwise it adds nothing."""
    lb, _ = board
    good = next(c for c in read_verified(lb / "challenges")[0] if c.name == "good")
    cell = good.cells[0]
    shuffled = good.model_copy(update={"cells": [cell.model_copy(update={"image_names": cell.image_names[::-1]})]})
    df = per_image_frame({ENTRY.name: records}, [shuffled])
    assert not [c for c in df.columns if c.startswith("challenge.")]
    assert "challenge.noisy-upscale.ssim" in per_image_frame({ENTRY.name: records}, [good]).columns


def test_the_sites_entry_csv_carries_the_same_challenge_columns(records, board):
    """The site's per-entry CSV is in per-image.csv's schema: the challenge the board applies is in it."""
    lb, written = board
    files = write_site({str(ENTRY): records}, lb / "site", board_dir=lb)
    csv = next(p for p in files if p.suffix == ".csv")
    site, top = pd.read_csv(csv), pd.read_csv(written["per-image"])
    assert sorted(c for c in site.columns if c.startswith("challenge.")) == ["challenge.noisy-upscale.psnr", "challenge.noisy-upscale.ssim"]
    pd.testing.assert_frame_equal(site, top)
