import time

import pytest
import torch

import spdbench
from spdbench.errors import TargetLoadError
from spdbench.targets import load_sd15
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
        load_sd15("runwayml/stable-diffusion-v1-5")
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert "runwayml/stable-diffusion-v1-5" in msg and "--local-dir" in msg and "\n" not in msg
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
