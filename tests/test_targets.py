import time
from pathlib import Path

import pytest
import torch

import spdbench
from spdbench.errors import TargetLoadError
from spdbench.suites import get_suite
from spdbench.targets import load_sd15
from spdbench.targets.sd15 import (SD15_HUB_ID, SD15_INPAINT_HUB_ID, SD15_INPAINT_REVISION, SD15_REVISION,
                                   hub_revision)
from spdbench.targets.tiny import tiny_tokenizer


def test_tokenizer_has_sd15_ids():
    tok = tiny_tokenizer()
    assert len(tok) == 49408
    assert tok("add some snow").input_ids == [49406, 3536, 836, 2583, 49407]
    assert tok("apply sunset lighting").input_ids == [49406, 4356, 3424, 5799, 49407]


def test_tiny_components_have_sd15_classes(tiny_random):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert isinstance(tiny_random.vae, AutoencoderKL) and tiny_random.vae.config.latent_channels == 4
    assert isinstance(tiny_random.unet, UNet2DConditionModel)
    assert isinstance(tiny_random.text_encoder, CLIPTextModel)
    assert tiny_random.latent_factor == 8


def test_encode_decode_shapes_and_ranges(tiny_random, photos64):
    enc = tiny_random.encode(photos64)
    assert enc.mean.shape == (4, 4, 8, 8) and enc.logvar.shape == enc.mean.shape
    assert torch.allclose(enc.latents, enc.mean * tiny_random.scaling_factor)
    out = tiny_random.decode(enc.latents)
    assert out.shape == photos64.shape and out.min() >= 0 and out.max() <= 1


def test_random_builder_is_deterministic():
    a = spdbench.load_target("tiny-random-3")
    b = spdbench.load_target("tiny-random-3")
    c = spdbench.load_target("tiny-random-4")
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_save_pretrained_round_trip(tmp_path, tiny_random, photos64):
    folder = tiny_random.save_pretrained(tmp_path / "tiny")
    loaded = load_sd15(folder)
    assert loaded.fingerprint == tiny_random.fingerprint
    gen = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    kw = dict(prompt=["add some snow"] * 2, image=photos64[:2], strength=0.5, num_inference_steps=4,
              guidance_scale=7.5, output_type="pt")
    a = tiny_random.img2img()(**kw, generator=gen()).images
    b = loaded.img2img()(**kw, generator=gen()).images
    assert torch.equal(a, b)
    assert torch.equal(tiny_random.encode(photos64).mean, loaded.encode(photos64).mean)


def test_folder_missing_component_is_named(tmp_path, tiny_random):
    import shutil

    folder = tiny_random.save_pretrained(tmp_path / "broken")
    shutil.rmtree(folder / "unet")
    with pytest.raises(TargetLoadError, match="missing component.*unet"):
        load_sd15(folder)


def test_unreachable_hub_id_fails_fast_with_advice(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(TargetLoadError) as info:
        load_sd15(SD15_HUB_ID)
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert SD15_HUB_ID in msg and "--local-dir" in msg and "\n" not in msg
    assert f"--revision {SD15_REVISION}" in msg, "the download command names the pinned revision"
    assert "`hf download" in msg and "--target DIR" in msg, "names the installed CLI and where DIR goes"


def test_dtype_and_device_are_arguments(tiny_random):
    t16 = spdbench.load_target("tiny-random", dtype="bfloat16")
    assert t16.vae.dtype == torch.bfloat16 and t16.device.type == "cpu"
    with pytest.raises(TargetLoadError, match="unknown dtype"):
        spdbench.load_target("tiny-random", dtype="float8")


def test_loading_the_tiny_target_prints_no_loading_bar(capfd):
    spdbench.load_target("tiny")
    err = capfd.readouterr().err
    assert "Loading weights" not in err, err[-300:]


def test_inpaint_pipeline_needs_an_inpainting_unet(tiny_random):
    assert not tiny_random.inpainting
    with pytest.raises(TargetLoadError, match="not an inpainting model.*9"):
        tiny_random.inpaint()


def test_hub_ids_in_code_equal_those_documented():
    """The runwayml/ repositories were deleted from the hub: code, README and docs name the mirrors."""
    root = Path(__file__).resolve().parents[1]
    assert SD15_HUB_ID == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert SD15_INPAINT_HUB_ID == "stable-diffusion-v1-5/stable-diffusion-inpainting"
    readme = (root / "README.md").read_text()
    inpaint_doc = (root / "docs" / "inpainting.md").read_text()
    assert f"`{SD15_HUB_ID}`" in readme and f"`{SD15_INPAINT_HUB_ID}`" in readme
    assert f"`{SD15_INPAINT_HUB_ID}` (revision `{SD15_INPAINT_REVISION}`)" in inpaint_doc
    assert f"revision `{SD15_REVISION}`" in readme
    stale = [str(p.relative_to(root)) for p in [root / "README.md", *(root / "docs").rglob("*.md"),
                                                *(root / "spdbench").rglob("*.py")]
             if "runwayml/" in p.read_text() and "deleted" not in p.read_text()]
    assert not stale, f"deleted hub ids still named in {stale}"
    assert {s.name: s.target for s in map(get_suite, ("sd15-quick", "sd15-inpaint"))} == {
        "sd15-quick": SD15_HUB_ID, "sd15-inpaint": SD15_INPAINT_HUB_ID}


def test_hub_revision_is_recorded_and_absent_key_keeps_old_records():
    from spdbench.store.records import TargetInfo

    assert hub_revision(SD15_HUB_ID) == SD15_REVISION and hub_revision("org/other") == "main"
    assert hub_revision(SD15_HUB_ID, "abc123") == "abc123"
    info = dict(name="a", source=SD15_HUB_ID, fingerprint="f", dtype="float32", device="cpu")
    assert '"revision"' not in TargetInfo(**info).model_dump_json(), "old records re-serialize unchanged"
    again = TargetInfo.model_validate_json(TargetInfo(**info, revision="main").model_dump_json())
    assert again.revision == "main"



def test_records_of_a_hub_model_carry_its_revision(tiny_random, tmp_path):
    """What a record stores comes from the loaded Target: a hub-loaded one names its revision, a
    folder-loaded one none (a folder has no hub history)."""
    from spdbench.harness.pipeline import _target_info

    folder = tiny_random.save_pretrained(tmp_path / "m")
    local = load_sd15(folder)
    assert local.revision is None and _target_info(local).revision is None
    local.revision = SD15_REVISION  # as load_sd15 sets it after a hub download
    assert f'"revision":"{SD15_REVISION}"' in _target_info(local).model_dump_json()
