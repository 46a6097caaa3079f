"""The editing suite: seeds make edits repeatable, batching does not change them, the clean cache works.

Runs on the random-weight tiny pipeline (same diffusers classes as SD1.5): these are plumbing
properties that must hold for any weights.
"""
from __future__ import annotations

import pytest
import torch

import spdbench
from spdbench.editing import PROMPTS, EditSettings, Editor, image_seed, resolve_prompt
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
    assert PROMPTS == {"P1": "make it like a watercolor painting", "P2": "apply sunset lighting",
                       "P3": "add some snow", "P4": ""}
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
    assert (ed2.cache_hits, ed2.cache_misses) == (1, 1)
    assert (a - b).abs().amax() < 1e-4  # recomputed alone, not in a batch of 2: equal to float noise


def test_edit_rejects_bad_input(target, images):
    ed = Editor(target, SETTINGS)
    with pytest.raises(InputError, match="seeds"):
        ed.edit(images, "P3", [1])
    with pytest.raises(InputError, match="divide by 255"):
        ed.edit(images * 255, "P3", [1] * len(images))


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
