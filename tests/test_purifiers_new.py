"""Issue 38's purifiers (mismatched editor, Noisy Upscaling, platform transforms), repeated draws of a
randomized purifier, and that a purifier's record states exactly the settings it ran with."""
from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import spdbench
from spdbench.errors import InputError, RegistryError, UnknownNameError
from spdbench.harness.request import build_request
from spdbench.purifiers import Purifier, drawn, get_purifier, list_purifiers, noisy_upscale
from spdbench.purifiers.base import DRAW_SEED_STRIDE, base_name
from spdbench.scoring.worst_case import HEADLINE_ADDED, draw_spread, not_measured, worst_case
from spdbench.store.records import load_records

ENTRIES = Path(__file__).resolve().parents[1] / "leaderboard" / "entries"
NEW = ("swap-vae-tiny-b", "swap-img2img-tiny-b", "noisy-upscale", "noisy-upscale-sd-x4", "platform")


@pytest.fixture(scope="module")
def photos():
    return spdbench.load_photos(n=2, size=64)


# --- the new purifiers ---------------------------------------------------------------------------
def test_the_new_purifiers_are_registered_and_in_the_headline_set():
    assert set(NEW) <= set(list_purifiers())
    assert set(HEADLINE_ADDED) <= set(NEW)
    assert get_purifier("swap-img2img-tiny-b").model == "tiny-b"
    assert get_purifier("swap-vae-tiny-b").to_dict()["model"] == "tiny-b"
    assert "model" not in get_purifier("diffpure0.2").to_dict()  # today's records unchanged


@pytest.mark.parametrize("name", ["noisy-upscale", "platform"])
def test_classical_sharing_purifiers_change_the_photo_within_range(photos, name):
    out = get_purifier(name)(photos)
    assert out.shape == photos.shape and out.min() >= 0 and out.max() <= 1
    assert 0.002 < (out - photos).abs().mean() < 0.2  # it purifies, and leaves a photo


def test_noisy_upscale_is_a_function_of_its_seed(photos):
    a, b = noisy_upscale(photos, seed=0), noisy_upscale(photos, seed=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, noisy_upscale(photos, seed=1))


def test_platform_at_full_display_size_is_the_jpeg_alone(photos):
    from spdbench.purifiers import jpeg, platform

    assert torch.equal(platform(photos, display=64, quality=80), jpeg(photos, quality=80, subsampling="4:2:0"))
    with pytest.raises(InputError, match="display size"):
        platform(photos, display=4)


def test_a_mismatched_editor_purifies_with_its_own_model_only(photos):
    p = get_purifier("swap-vae-tiny-b")
    with pytest.raises(RegistryError, match="runs with model 'tiny-b'"):
        p(photos, SimpleNamespace(name="tiny", source="tiny"))  # the editing model by mistake: refused
    tiny_b = spdbench.load_target("tiny-b")
    out = p(photos, tiny_b)
    assert torch.allclose(out, tiny_b.reconstruct(photos), atol=1e-6)
    assert 1e-3 < (out - photos).abs().mean() < 0.2  # a round trip through tiny-b's VAE


# --- recorded settings are the call's ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(set(list_purifiers())))
def test_every_keyword_a_purifier_takes_is_a_recorded_setting(name):
    """A keyword left to the function's default would run without being recorded."""
    p = get_purifier(name)
    params = list(inspect.signature(p.fn).parameters.values())[2 if p.needs_target else 1:]
    assert {q.name for q in params} == set(p.settings), f"{name}: unrecorded keywords"


def test_the_record_is_the_call_and_changes_with_it():
    calls = []

    def spy(images, sigma=0.05, seed=0):
        calls.append(dict(sigma=sigma, seed=seed))
        return images + sigma

    p = Purifier("spy", "spy", spy, settings=dict(sigma=0.01, seed=3))
    x = torch.zeros(1, 3, 8, 8)
    p(x)
    assert calls[-1] == p.to_dict()["settings"] == dict(sigma=0.01, seed=3)
    q = replace(p, settings=dict(p.settings, sigma=0.02))
    assert q(x).mean().item() == pytest.approx(0.02) and calls[-1] == q.to_dict()["settings"]
    assert q.to_dict() != p.to_dict()


def test_changing_a_functions_default_changes_neither_the_run_nor_the_record(photos, monkeypatch):
    """The settings are passed explicitly: a default edited in the code cannot drift from the record."""
    p = get_purifier("noisy-upscale")
    before, record = p(photos), p.to_dict()
    monkeypatch.setattr(noisy_upscale, "__defaults__", (0.2, 0.25, "nearest", 7))
    assert torch.equal(p(photos), before) and p.to_dict() == record
    changed = replace(p, settings=dict(p.settings, sigma=0.2))
    assert not torch.equal(changed(photos), before) and changed.to_dict()["settings"]["sigma"] == 0.2


# --- repeated draws ------------------------------------------------------------------------------
def test_draws_of_a_randomized_purifier_are_named_and_seeded():
    d = get_purifier("diffpure0.2")
    assert d.randomized and not get_purifier("jpeg75").randomized
    assert d.draw(0) is d
    d2 = d.draw(2)
    assert d2.name == "diffpure0.2~2" and d2.settings["seed"] == 2 * DRAW_SEED_STRIDE
    assert get_purifier("diffpure0.2~2") == d2 and base_name("diffpure0.2~2") == "diffpure0.2"
    with pytest.raises(InputError, match="deterministic"):
        get_purifier("jpeg75").draw(1)
    with pytest.raises(UnknownNameError):
        get_purifier("jpeg75~1")


def test_one_draw_is_todays_purifier_list_exactly():
    ladder = [get_purifier(n) for n in ("jpeg75", "diffpure0.2", "noisy-upscale")]
    assert drawn(ladder, 1) == tuple(ladder)
    assert [p.name for p in drawn(ladder, 3)] == ["jpeg75", "diffpure0.2", "diffpure0.2~1", "diffpure0.2~2",
                                                   "noisy-upscale", "noisy-upscale~1", "noisy-upscale~2"]
    with pytest.raises(InputError, match="draws"):
        drawn(ladder, 0)


def test_a_run_request_draws_k_times_and_records_k(tmp_path):
    one = build_request("none", "smoke", out=tmp_path / "a")
    assert "purifier_draws" not in one.suite.to_dict()  # K = 1: the suite's record is today's
    three = build_request("none", "smoke", out=tmp_path / "b", purifiers=["jpeg75", "diffpure0.2"], purifier_draws=3)
    assert [p.name for p in three.purifiers] == ["jpeg75", "diffpure0.2", "diffpure0.2~1", "diffpure0.2~2"]
    assert three.suite.to_dict()["purifier_draws"] == 3
    with pytest.raises(InputError, match="purifier_draws"):
        build_request("none", "smoke", out=tmp_path / "c", purifier_draws=0)


def test_the_worst_case_takes_the_worst_draw_and_reports_the_spread():
    protection = {"ssim": [0.2, 0.2, 0.2]}
    purified = {"diffpure0.2": {"ssim": [0.5, 0.3, 0.1]}, "diffpure0.2~1": {"ssim": [0.4, 0.6, 0.1]},
                "diffpure0.2~2": {"ssim": [0.45, 0.35, 0.7]}, "jpeg75": {"ssim": [0.3, 0.3, 0.3]}}
    values, chosen = worst_case(protection, purified)
    assert values["ssim"] == [0.5, 0.6, 0.7]
    assert chosen == ["diffpure0.2", "diffpure0.2~1", "diffpure0.2~2"]
    one_draw, _ = worst_case(protection, {k: v for k, v in purified.items() if "~" not in k})
    assert one_draw["ssim"] == [0.5, 0.3, 0.3]  # one draw understates what the purifier can do
    assert draw_spread(purified) == {"diffpure0.2": pytest.approx([0.1, 0.3, 0.6])}


def test_committed_records_keep_their_worst_case_and_show_the_new_purifiers_as_not_measured():
    folder = ENTRIES / "smoke-photoguard-encoder"
    rec = load_records(folder / "records")[0]
    assert not_measured(rec.purified) == list(HEADLINE_ADDED)
    stated = rec.suite_config["purifier_settings"]
    one = build_request("photoguard-encoder", "smoke", out=folder.parent.parent.parent / "spdbench-runs" / "x")
    assert {p.name: p.to_dict() for p in one.purifiers} == json.loads(json.dumps(stated))
    assert draw_spread(rec.purified) == {}
