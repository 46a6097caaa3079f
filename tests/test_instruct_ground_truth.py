"""Ground-truth edit success on the offline instruction suite, and the instruction suites' hub id."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import spdbench
from spdbench.data.instructions import exact_edit
from spdbench.errors import InputError
from spdbench.report.board import _metric_series
from spdbench.scoring.compare import paired
from spdbench.scoring.ground_truth import edit_success
from spdbench.suites import SUITES, get_suite
from spdbench.targets.instruct import IP2P_HUB_ID, IP2P_REVISION

ROOT = Path(__file__).resolve().parents[1]


def test_edit_success_is_psnr_to_the_exact_result_of_the_clean_photo():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    truth = exact_edit("invert the colors", x)
    out = edit_success(x, "invert the colors", clean_edit=truth, protected_edit=x)
    assert out["clean"].tolist() == [100.0, 100.0]  # the exact result itself: the PSNR cap
    assert (out["protected"] < 15).all()  # returning the photo is far from its inverse
    with pytest.raises(InputError, match="no exact result"):
        edit_success(x, "make it a watercolor", x, x)


FAST = dataclasses.replace(get_suite("smoke-instruct"), name="test-instruct", image_size=64, eps=("16/255",),
                           prompts=("I2",), n_images=3, attack_steps=2, attack_work=None, attack_batch_size=3,
                           purifiers=(), edit=dataclasses.replace(get_suite("smoke-instruct").edit, steps=3))


def test_an_instruction_run_records_ground_truth_per_image_and_the_board_shows_it(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SUITES, "test-instruct", FAST)
        result = spdbench.run("editshield", suite="test-instruct", out=tmp_path / "run", isolation="process")
    assert result.ok, [r.error for r in result.failed]
    for rec in result.records:
        assert rec.task == "instruct"  # its own task group on the board, never ranked among img2img rows
        assert set(rec.ground_truth) == {"protected", "clean"}
        assert len(rec.ground_truth["protected"]) == len(rec.image_names) == len(rec.ground_truth["clean"])
        assert rec.suite_config["ground_truth"] is True
    series = _metric_series(result.records)  # the board's columns, each with a bootstrap interval
    assert series["gt_protected"] == [r.ground_truth["protected"] for r in result.records]
    same = paired(result.records, result.records, metric="psnr", split="train", region="ground-truth")
    assert same[0].diff.mean == 0 and same[0].a == pytest.approx(
        sum(v for r in result.records if r.split.value == "train" for v in r.ground_truth["protected"])
        / sum(len(r.image_names) for r in result.records if r.split.value == "train"))
    with pytest.raises(InputError, match="needs --metric psnr"):
        paired(result.records, result.records, metric="ssim", split="train", region="ground-truth")
    from spdbench.report.board import build_from_dirs

    build_from_dirs([tmp_path / "run"], tmp_path / "board")
    text = (tmp_path / "board" / "README.md").read_text()
    assert "Instruction editing" in text and "img2img ·" not in text
    # off the instruction suites nothing changes: no field in the suite's config, an empty record field
    assert "ground_truth" not in get_suite("smoke").to_dict()


def test_instruction_suites_name_the_documented_hub_id():
    assert get_suite("sd15-instruct").target == IP2P_HUB_ID == "timbrooks/instruct-pix2pix"
    assert get_suite("sd15-instruct").edit.image_guidance == get_suite("smoke-instruct").edit.image_guidance == 1.5
    assert not get_suite("sd15-instruct").ground_truth and get_suite("smoke-instruct").ground_truth
    assert f"`{IP2P_HUB_ID}` (revision `{IP2P_REVISION}`)" in (ROOT / "docs" / "attacks.md").read_text()
