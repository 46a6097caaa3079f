"""Editing: batched vs one-at-a-time img2img, and the clean-edit cache hit vs miss."""
import pytest
import torch

import spdbench
from spdbench.harness.editing import EditSettings, Editor, image_seed

SETTINGS = EditSettings(strength=0.5, steps=20, guidance=7.5, seed=9222)


@pytest.fixture(scope="module")
def setup():
    target = spdbench.load_target("tiny")
    x = spdbench.load_photos(n=8, size=128)
    seeds = [image_seed(SETTINGS, img) for img in x]
    return target, x, seeds


@pytest.mark.parametrize("batch_size", [1, 8])
def test_edit_batching(benchmark, setup, batch_size):
    target, x, seeds = setup
    editor = Editor(target, SETTINGS, batch_size=batch_size)
    benchmark.group = "edit 8 photos 128px"
    benchmark.extra_info["images_per_second"] = None
    out = benchmark.pedantic(lambda: editor.edit(x, "P3", seeds), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_second"] = len(x) / benchmark.stats.stats.median
    assert out.shape == x.shape


@pytest.mark.parametrize("state", ["miss", "hit"])
def test_clean_edit_cache(benchmark, setup, tmp_path, state):
    target, x, seeds = setup
    benchmark.group = "clean edits, cache"
    editor = Editor(target, SETTINGS, cache_dir=tmp_path, batch_size=8)
    if state == "hit":
        editor.edit_clean(x, "P3", seeds)
        benchmark.pedantic(lambda: editor.edit_clean(x, "P3", seeds), rounds=5, iterations=1)
        assert editor.cache_misses == len(x)  # only the priming call missed
    else:
        def fresh():
            for f in tmp_path.glob("*.safetensors"):
                f.unlink()
            return editor.edit_clean(x, "P3", seeds)

        benchmark.pedantic(fresh, rounds=3, iterations=1)
