"""Instruction editing: tiny-ip2p loads offline, round-trips through the folder path a hub id
(timbrooks/instruct-pix2pix) uses, and edits deterministically under a seed."""
from __future__ import annotations

import json

import pytest
import torch

from spdbench.errors import InputError, TargetLoadError
from spdbench.targets import load_target
from spdbench.targets.instruct import (EDITS, InstructSettings, exact_edit, instruct_edit, instruct_pipeline,
                                       ip2p_unet_from, is_instruct, save_instruct_folder)

SETTINGS = InstructSettings(steps=3)


@pytest.fixture(scope="module")
def ip2p():
    return load_target("tiny-ip2p")


@pytest.fixture(scope="module")
def photo():
    from spdbench.data.photos import load_photos

    return load_photos(size=64, names=["chelsea"])  # a test-split photo: never trained on


def test_tiny_ip2p_is_an_8_channel_editor_on_tinys_vae(ip2p):
    tiny = load_target("tiny")
    assert is_instruct(ip2p) and not is_instruct(tiny)
    assert ip2p.unet.config.in_channels == 8
    assert ip2p.vae.state_dict()["encoder.conv_in.weight"].equal(tiny.vae.state_dict()["encoder.conv_in.weight"])
    with pytest.raises(TargetLoadError, match="not an instruction editor"):
        instruct_pipeline(tiny)


def test_saved_folder_loads_through_the_hub_path_and_edits_deterministically(ip2p, photo, tmp_path):
    folder = save_instruct_folder(ip2p, tmp_path / "ip2p")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"  # the hub repository's layout
    loaded = load_target(str(folder))  # a folder goes through load_sd15, exactly as a hub id does
    assert is_instruct(loaded) and loaded.fingerprint == ip2p.fingerprint
    a = instruct_edit(loaded, photo, "make it black and white", [7], SETTINGS)
    b = instruct_edit(loaded, photo, "make it black and white", [7], SETTINGS)
    c = instruct_edit(ip2p, photo, "make it black and white", [7], SETTINGS)
    d = instruct_edit(loaded, photo, "make it black and white", [8], SETTINGS)
    assert a.shape == photo.shape and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)  # the seed is used


def test_guidance_scales_change_the_edit(ip2p, photo):
    base = instruct_edit(ip2p, photo, "invert the colors", [0], SETTINGS)
    more_text = instruct_edit(ip2p, photo, "invert the colors", [0], InstructSettings(steps=3, guidance=2.0))
    more_image = instruct_edit(ip2p, photo, "invert the colors", [0], InstructSettings(steps=3, image_guidance=3.0))
    assert (base - more_text).abs().max() > 1e-3 and (base - more_image).abs().max() > 1e-3


def test_widening_keeps_the_parent_prediction():
    tiny = load_target("tiny-random")
    wide = ip2p_unet_from(tiny.unet)
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cond = tiny.encode_prompt(["make it darker"])
    img = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(wide(torch.cat([z, img], 1), t, encoder_hidden_states=cond).sample,
                                   tiny.unet(z, t, encoder_hidden_states=cond).sample)


def test_exact_edits_are_the_scikit_image_transforms():
    x = torch.rand(2, 3, 16, 16)
    gray = exact_edit("make it black and white", x)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    torch.testing.assert_close(exact_edit("invert the colors", x), 1 - x)
    assert (exact_edit("make it brighter", x) >= x - 1e-6).all() and (exact_edit("make it darker", x) <= x + 1e-6).all()
    assert exact_edit("blur it", x).std() < x.std()
    assert len(EDITS) == 5
    with pytest.raises(InputError, match="no exact transform"):
        exact_edit("add snow", x)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(InputError, match="steps=0"):
        InstructSettings(steps=0)
    with pytest.raises(InputError, match="image_guidance"):
        InstructSettings(image_guidance=float("nan"))


def test_harness_editor_drives_the_instruct_pipeline_with_the_suite_settings(ip2p, photo):
    from spdbench.harness.editing import Editor
    from spdbench.suites import EditSettings, get_suite

    from spdbench.harness.editing import PROMPTS

    assert [PROMPTS[f"I{i}"] for i in range(1, 6)] == list(EDITS)  # the suite's keys name the trained instructions
    suite = get_suite("smoke-instruct")
    assert suite.target == "tiny-ip2p" and suite.edit.to_dict()["image_guidance"] == 1.5
    settings = EditSettings(**{**suite.edit.to_dict(), "steps": 3})
    got = Editor(ip2p, settings).edit(photo, "I2", [5])
    want = instruct_edit(ip2p, photo, "invert the colors", [5],
                         InstructSettings(steps=3, guidance=settings.guidance, image_guidance=1.5))
    assert torch.equal(got, want)
    with pytest.raises(InputError, match="need image_guidance"):
        Editor(ip2p, EditSettings(steps=3)).edit(photo, "invert the colors", [5])
    with pytest.raises(InputError, match="not an instruction editor"):
        Editor(load_target("tiny-random"), settings).edit(photo, "P1", [5])


def test_img2img_edit_settings_record_no_image_guidance():
    from spdbench.suites import EditSettings

    assert "image_guidance" not in EditSettings().to_dict()  # today's records and cache keys unchanged


def test_predict_noise_takes_the_image_condition_on_an_instruction_editor(ip2p, photo):
    enc = ip2p.encode(photo)
    emb = ip2p.encode_prompt(["make it darker"])
    with torch.no_grad():
        got = ip2p.predict_noise(enc.latents, 500, emb, image_latents=enc.mean)
        want = ip2p.unet(torch.cat([enc.latents, enc.mean], 1), torch.tensor([500]), encoder_hidden_states=emb).sample
        torch.testing.assert_close(got, want)
        with pytest.raises(ValueError, match="needs image_latents"):
            ip2p.predict_noise(enc.latents, 500, emb)
        with pytest.raises(ValueError, match="not an instruction editor"):
            load_target("tiny-random").predict_noise(enc.latents, 500, emb, image_latents=enc.mean)
