"""The editing suite: seeds make edits repeatable, batching does not change them, the clean cache works.

Runs on the random-weight tiny pipeline (same diffusers classes as SD1.5): these are plumbing
properties that must hold for any weights.
"""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import spdbench
from spdbench.harness.editing import PROMPTS, EditSettings, Editor, image_seed, resolve_prompt
from spdbench.errors import InputError, UnknownNameError

from harness_helpers import fast_images, fast_suite

SETTINGS = EditSettings(strength=0.5, steps=4, guidance=7.5, seed=9222)


@pytest.fixture(scope="module")
def target():
    return spdbench.load_target("tiny-random")


@pytest.fixture(scope="module")
def images():
    return fast_images(4)


def test_prompts_and_defaults_are_the_seed_protocol():
    assert {k: v for k, v in PROMPTS.items() if k.startswith("P")} == {
        "P1": "make it like a watercolor painting", "P2": "apply sunset lighting", "P3": "add some snow", "P4": ""}
    assert set(PROMPTS) - {"P1", "P2", "P3", "P4"} == {"I1", "I2", "I3", "I4", "I5"}  # the instruction keys
    d = EditSettings()
    assert (d.strength, d.guidance, d.steps) == (0.5, 7.5, 50)
    assert resolve_prompt("P2") == "apply sunset lighting" and resolve_prompt("a cat") == "a cat"
    with pytest.raises(UnknownNameError, match="P5"):
        resolve_prompt("P5")


def test_image_seed_depends_on_the_clean_image_only(images):
    seeds = [image_seed(SETTINGS, im) for im in images]
    assert len(set(seeds)) == len(seeds)
    assert seeds[::-1] == [image_seed(SETTINGS, im) for im in images.flip(0)]  # order does not matter
    other = EditSettings(strength=0.5, steps=4, guidance=7.5, seed=1)
    assert image_seed(other, images[0]) != seeds[0]


def test_same_seed_same_edit_other_seed_other_edit(target, images):
    editor = Editor(target, SETTINGS)
    seeds = [image_seed(SETTINGS, im) for im in images]
    a = editor.edit(images, "P3", seeds)
    b = editor.edit(images, "P3", seeds)
    assert torch.equal(a, b)
    c = editor.edit(images, "P3", [s + 1 for s in seeds])
    assert (a - c).abs().amax() > 1e-3
    assert a.shape == images.shape and 0 <= float(a.min()) and float(a.max()) <= 1


def test_batched_equals_one_at_a_time(target, images):
    seeds = [image_seed(SETTINGS, im) for im in images]
    batched = Editor(target, SETTINGS, batch_size=4).edit(images, "P1", seeds)
    single = Editor(target, SETTINGS, batch_size=1).edit(images, "P1", seeds)
    assert (batched - single).abs().amax() < 1e-4  # per-image generators: batch-independent noise


def test_clean_cache_hits_are_counted_and_equal(tmp_path, target, images):
    seeds = [image_seed(SETTINGS, im) for im in images]
    first = Editor(target, SETTINGS, cache_dir=tmp_path)
    a = first.edit_clean(images, "P3", seeds)
    assert (first.cache_hits, first.cache_misses, first.edits_run) == (0, 4, 4)
    second = Editor(target, SETTINGS, cache_dir=tmp_path)  # a new process would start like this
    b = second.edit_clean(images, "P3", seeds)
    assert (second.cache_hits, second.cache_misses, second.edits_run) == (4, 0, 0)
    assert torch.equal(a, b)
    # a different prompt or setting is a different key
    second.edit_clean(images[:1], "P4", seeds[:1])
    other = Editor(target, EditSettings(strength=0.3, steps=4, guidance=7.5, seed=9222), cache_dir=tmp_path)
    other.edit_clean(images[:1], "P3", seeds[:1])
    assert second.cache_misses == 1 and other.cache_misses == 1


def test_corrupt_cache_entry_is_recomputed(tmp_path, target, images):
    seeds = [image_seed(SETTINGS, im) for im in images[:2]]
    ed = Editor(target, SETTINGS, cache_dir=tmp_path)
    a = ed.edit_clean(images[:2], "P3", seeds)
    victim = sorted(tmp_path.glob("*.safetensors"))[0]
    victim.write_bytes(b"not a safetensors file")
    ed2 = Editor(target, SETTINGS, cache_dir=tmp_path)
    b = ed2.edit_clean(images[:2], "P3", seeds)
    assert (ed2.cache_hits, ed2.cache_misses) == (1, 1) and ed2.cache_rejected == [victim.name]
    assert (a - b).abs().amax() < 1e-4  # recomputed alone, not in a batch of 2: equal to float noise


def test_cache_key_includes_device_type_and_dtype(target, images):
    """CPU and CUDA generators give different noise for one seed: their clean edits never share an entry."""
    key = Editor(target, SETTINGS)._key(images[0], "add some snow")
    assert key == Editor(target, SETTINGS)._key(images[0], "add some snow")

    def twin(device, dtype):
        return SimpleNamespace(device=torch.device(device), dtype=dtype, fingerprint=target.fingerprint)

    assert key == Editor(twin(target.device, target.dtype), SETTINGS)._key(images[0], "add some snow")
    others = {Editor(twin("cuda", target.dtype), SETTINGS)._key(images[0], "add some snow"),
              Editor(twin("cuda:1", target.dtype), SETTINGS)._key(images[0], "add some snow"),
              Editor(twin("cpu", torch.float16), SETTINGS)._key(images[0], "add some snow")}
    assert key not in others and len(others) == 2, "device index is not part of the key, the device type is"


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory, target, images):
    """A clean-edit cache of two images, and the edits it holds."""
    folder = tmp_path_factory.mktemp("cache")
    seeds = [image_seed(SETTINGS, im) for im in images[:2]]
    edits = Editor(target, SETTINGS, cache_dir=folder).edit_clean(images[:2], "P3", seeds)
    return folder, seeds, edits


def _with(t: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    out = t.clone()
    out[index] = value
    return out


BAD_ENTRIES = {
    "zeros": lambda e: {"edit": torch.zeros_like(e)},  # used silently before: SSIM 0.0016
    "constant": lambda e: {"edit": torch.full_like(e, 0.5)},
    "nan": lambda e: {"edit": _with(e, (1, 5, 7), float("nan"))},  # one bad pixel is enough
    "inf": lambda e: {"edit": _with(e, (0, 0, 0), float("inf"))},
    "wrong-shape": lambda e: {"edit": e[:, :32, :32].contiguous()},
    "out-of-range": lambda e: {"edit": e * 255},
    "integer": lambda e: {"edit": (e * 255).to(torch.uint8)},
    "no-edit-key": lambda e: {"other": e},
}


@pytest.mark.parametrize("kind", sorted(BAD_ENTRIES) + ["not-safetensors"])
def test_bad_cache_entry_is_rejected_named_and_recomputed(tmp_path, target, images, filled_cache, kind, caplog):
    folder, seeds, edits = filled_cache
    cache = tmp_path / "cache"
    shutil.copytree(folder, cache)
    victim = sorted(cache.glob("*.safetensors"))[0]
    good = load_file(str(victim))["edit"]
    if kind == "not-safetensors":
        victim.write_bytes(b"\x00" * 64)
    else:
        save_file(BAD_ENTRIES[kind](good), str(victim))
    ed = Editor(target, SETTINGS, cache_dir=cache)
    with caplog.at_level("WARNING", logger="spdbench.harness.editing"):
        out = ed.edit_clean(images[:2], "P3", seeds)  # never aborts the run
    assert ed.cache_rejected == [victim.name] and (ed.cache_hits, ed.cache_misses) == (1, 1)
    assert victim.name in caplog.text
    assert (out - edits).abs().amax() < 1e-4
    again = Editor(target, SETTINGS, cache_dir=cache)
    again.edit_clean(images[:2], "P3", seeds)
    assert (again.cache_hits, again.cache_rejected) == (2, []), "the recomputed entry replaced the bad file"
    assert not list(cache.glob(".*.tmp"))


def test_non_finite_fresh_edit_is_not_cached(tmp_path, target, images, monkeypatch, caplog):
    ed = Editor(target, SETTINGS, cache_dir=tmp_path)
    monkeypatch.setattr(ed, "_edit_batch", lambda x, prompt, seeds: torch.full_like(x, float("nan")))
    with caplog.at_level("WARNING", logger="spdbench.harness.editing"):
        out = ed.edit_clean(images[:2], "P3", [1, 2])
    assert out.isnan().all() and list(tmp_path.iterdir()) == []
    assert "not cached" in caplog.text and "non-finite" in caplog.text


def test_edit_rejects_bad_input(target, images):
    ed = Editor(target, SETTINGS)
    with pytest.raises(InputError, match="seeds"):
        ed.edit(images, "P3", [1])
    with pytest.raises(InputError, match="divide by 255"):
        ed.edit(images * 255, "P3", [1] * len(images))


@pytest.mark.slow
def test_second_harness_run_skips_every_clean_edit(tmp_path, target):
    """Another attack on the same suite and photos: all clean edits come from the cache (counted)."""
    x = fast_images(6)
    suite = fast_suite(prompts=("P3", "P4"))
    first = spdbench.run("uniform-noise", suite=suite, out=tmp_path, target=target, images=x)
    assert (first.clean_cache_hits, first.clean_cache_misses) == (0, 12)
    second = spdbench.run("none", suite=suite, out=tmp_path, target=target, images=x)
    assert second.ok and len(second.computed) == 4
    assert (second.clean_cache_hits, second.clean_cache_misses) == (12, 0)
    assert second.edits_run == 12  # only the protected images were edited


# --- inpainting ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_inpaint_random():
    """tiny-random with SD-inpainting's 9-channel UNet (the zoo's widening, random weights)."""
    import spdbench
    from spdbench.targets import Target
    from zoo.train_inpaint import inpaint_unet_from

    comps = spdbench.load_target("tiny-random").components()
    comps["unet"] = inpaint_unet_from(comps["unet"])
    return Target(**comps, name="tiny-inpaint-random")


def test_inpainting_edits_take_one_mask_per_image_and_refuse_anything_else(tiny_inpaint_random, tiny_random, tmp_path):
    import spdbench
    from spdbench.harness.editing import EditSettings, Editor
    from spdbench.errors import InputError
    from spdbench.data.masks import random_masks

    x = spdbench.load_photos(n=2, size=64)
    m = random_masks(2, 64, torch.Generator().manual_seed(0), ("box",))
    ed = Editor(tiny_inpaint_random, EditSettings(strength=1.0, steps=3), cache_dir=tmp_path / "cache")
    a = ed.edit(x, "P3", [1, 2], masks=m)
    assert a.shape == x.shape and torch.equal(a, ed.edit(x, "P3", [1, 2], masks=m))
    with pytest.raises(InputError, match="inpaints: masks"):
        ed.edit(x, "P3", [1, 2])
    with pytest.raises(InputError, match=r"masks: expected shape \(2, 1, 64, 64\)"):
        ed.edit(x, "P3", [1, 2], masks=m[:1])
    with pytest.raises(InputError, match="0 \\(keep\\) and 1 \\(repaint\\)"):
        ed.edit(x, "P3", [1, 2], masks=m * 0.5)
    with pytest.raises(InputError, match="img2img model, not inpainting"):
        Editor(tiny_random, EditSettings(steps=2)).edit(x, "P3", [1, 2], masks=m)
    # the clean-edit cache keys on the mask: another mask is another edit, not a cache hit
    ed.edit_clean(x, "P3", [1, 2], masks=m)
    other = random_masks(2, 64, torch.Generator().manual_seed(1), ("strokes",))
    ed.edit_clean(x, "P3", [1, 2], masks=other)
    assert ed.cache_misses == 4 and ed.cache_hits == 0
    ed.edit_clean(x, "P3", [1, 2], masks=m)
    assert ed.cache_hits == 2
