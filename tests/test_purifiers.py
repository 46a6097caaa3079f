"""The purifier registry, the new purifiers and the per-image worst case over purifiers."""
from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch

import spdbench
from spdbench.scoring import metrics
from spdbench.errors import RegistryError, UnknownNameError
from spdbench.purifiers import (Purifier, consistency, get_purifier, gridpure, list_purifiers, load_entry_points,
                                register_purifier, unregister_purifier)
from spdbench.purifiers.diffusion import _grid_boxes
from spdbench.scoring.worst_case import worst_case


# --- registry -----------------------------------------------------------------------------------
def test_builtins_are_registered_with_settings():
    names = list_purifiers()
    for n in ("jpeg70", "jpeg75", "jpeg90", "resize0.5", "blur1", "tv0.05", "diffpure0.2", "gridpure", "impress-ssim"):
        assert n in names
        assert get_purifier(n).settings, f"{n} records no settings"
    assert get_purifier("gridpure").settings["rounds"] == 20 and get_purifier("gridpure").settings["gamma"] == 0.1


def test_unknown_purifier_suggests_the_near_name():
    with pytest.raises(UnknownNameError, match=r"'jpeg7'.*Did you mean 'jpeg7[05]'"):
        get_purifier("jpeg7")


def test_register_refuses_a_taken_name_and_non_purifiers():
    mine = Purifier("test-identity", "identity", lambda x, scale=1.0: x * scale, settings=dict(scale=1.0))
    register_purifier(mine)
    try:
        assert get_purifier("test-identity") is mine
        with pytest.raises(RegistryError, match="already registered"):
            register_purifier(Purifier("test-identity", "other", lambda x: x))
    finally:
        unregister_purifier("test-identity")
    with pytest.raises(RegistryError, match="needs a spdbench.Purifier"):
        register_purifier(lambda x: x)
    assert "test-identity" not in list_purifiers()


def test_a_purifier_is_called_with_exactly_its_recorded_settings():
    seen = {}

    def fn(x, target, strength=0.5, seed=0):
        seen.update(strength=strength, seed=seed, target=target)
        return x.clone()

    p = Purifier("test-settings", "settings", fn, needs_target=True, settings=dict(strength=0.2, seed=3))
    p(torch.rand(1, 3, 8, 8), "the target")
    assert seen == dict(strength=0.2, seed=3, target="the target") and p.to_dict()["settings"] == dict(strength=0.2, seed=3)
    with pytest.raises(RegistryError, match=r"'test-hand-copied'.*cannot be called.*\['steps'\]"):
        Purifier("test-hand-copied", "x", lambda x: x, settings=dict(steps=20))  # a setting that never runs


def test_builtin_settings_are_the_call_kwargs():
    """diffpure0.2 once recorded steps/prompt/guidance/seed beside a lambda that passed only the strength."""
    import inspect

    for name in list_purifiers():
        p = get_purifier(name)
        params = inspect.signature(p.fn).parameters
        assert set(p.settings) <= set(params), f"{name} records settings its function does not take"


def test_a_purifier_that_changes_the_shape_is_an_error():
    bad = Purifier("test-crop", "crop", lambda x: x[..., :8, :8])
    with pytest.raises(RegistryError, match="returned shape"):
        bad(torch.rand(1, 3, 16, 16))


class _EP:
    def __init__(self, name, obj, dist="spdbench-purify-plugin"):
        self.name, self.value, self._obj = name, f"plugin:{name}", obj
        self.dist = type("D", (), {"name": dist})()

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def test_entry_point_plugins_load_and_broken_ones_are_isolated(monkeypatch):
    good = Purifier("plugin-median", "median", lambda x: x.clone())
    eps = [_EP("plugin-median", good), _EP("plugin-broken", ImportError("no module named foo")),
           _EP("plugin-misnamed", Purifier("other-name", "x", lambda x: x)), _EP("plugin-notone", object())]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: eps if group == "spdbench.purifiers" else [])
    try:
        with pytest.warns(UserWarning) as caught:
            loaded = load_entry_points(force=True)
        assert loaded == ["plugin-median"] and get_purifier("plugin-median") is good
        text = " ".join(str(w.message) for w in caught)
        assert "plugin-broken" in text and "spdbench-purify-plugin" in text and "no module named foo" in text
        assert "not the entry-point name" in text and "must name a spdbench.Purifier" in text
    finally:
        unregister_purifier("plugin-median")


# --- the purifiers ------------------------------------------------------------------------------
def test_tv_denoise_removes_noise_and_jpeg_quality_orders(photos64):
    x = photos64
    noisy = (x + 0.06 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    tv = get_purifier("tv0.05")(noisy)
    assert float(metrics.psnr(tv, x).mean()) > float(metrics.psnr(noisy, x).mean()) + 2.0
    p70 = float(metrics.psnr(get_purifier("jpeg70")(x), x).mean())
    p90 = float(metrics.psnr(get_purifier("jpeg90")(x), x).mean())
    assert p90 > p70 + 1.0


def test_grid_boxes_follow_the_published_layout():
    assert _grid_boxes(512, 256) == [0, 128, 256]      # GrIDPure on 512 px: 3 x 3 patches of 256
    assert _grid_boxes(128, 64) == [0, 32, 64]
    assert _grid_boxes(100, 50) == [0, 25, 50]


def test_gridpure_is_seeded_and_gamma_one_keeps_the_image(tiny_random, photos64):
    x = photos64[:2]
    a = gridpure(x, tiny_random, rounds=1, seed=3)
    b = gridpure(x, tiny_random, rounds=1, seed=3)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, gridpure(x, tiny_random, rounds=1, seed=4))
    kept = gridpure(x, tiny_random, rounds=2, gamma=1.0)
    assert torch.allclose(kept, (x * 255).round() / 255, atol=1e-6)


def test_consistency_purification_makes_the_vae_round_trip_consistent(tiny_random, photos64):
    x = photos64[:2]

    def inconsistency(img):
        with torch.no_grad():
            z = tiny_random.vae.encode(img * 2 - 1).latent_dist.mean
            return float((((tiny_random.vae.decode(z).sample + 1) / 2) - img).pow(2).mean())

    y = consistency(x, tiny_random, steps=15, lr=0.01)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert inconsistency(y) < 0.8 * inconsistency(x)


def test_consistency_bound_holds_per_photo_whatever_the_batch(tiny_random, photos64):
    """The closeness penalty is per photo: purifying a photo alone or in a batch gives the same
    result, so a batch-mean bound cannot let one photo drift while the others stay close."""
    import piq

    x = photos64[:3]
    together = consistency(x, tiny_random, steps=10, lr=0.02, bound=0.02, weight=10.0)
    alone = torch.cat([consistency(x[i:i + 1], tiny_random, steps=10, lr=0.02, bound=0.02, weight=10.0)
                       for i in range(len(x))])
    assert torch.allclose(together, alone, atol=2e-3)
    assert not torch.allclose(together, x, atol=1e-3)                   # it did purify
    dist = 1 - piq.ssim(together.clamp(0, 1), x, data_range=1.0, downsample=False, reduction="none")
    assert float(dist.max()) < 0.2                                          # every photo stays near its own


# --- worst case ---------------------------------------------------------------------------------
def test_worst_case_takes_per_image_the_block_that_restores_the_edit_most():
    protection = {"ssim": [0.5, 0.9, 0.7], "psnr": [10.0, 20.0, 15.0]}
    purified = {"jpeg75": {"ssim": [0.6, 0.8, 0.95], "psnr": [11.0, 19.0, 25.0]},
                "blur1": {"ssim": [0.55, 0.9, float("nan")], "psnr": [12.0, 30.0, 40.0]}}
    vals, chosen = worst_case(protection, purified)
    assert chosen == ["jpeg75", "none", "jpeg75"]          # tie at 0.9: "none" first; NaN never chosen
    assert vals["ssim"] == [0.6, 0.9, 0.95] and vals["psnr"] == [11.0, 20.0, 25.0]
    assert worst_case(protection, {})[1] == ["none"] * 3


def test_leaderboard_ranks_by_the_worst_case_beside_the_clean_score():
    from pathlib import Path

    from spdbench.report.board import ranking
    from spdbench.store.records import load_records

    entry = Path(__file__).parent.parent / "leaderboard" / "entries" / "smoke-uniform-noise"
    rec = next(r for r in load_records(entry) if r.split.value == "test")
    n = len(rec.image_names)
    full = lambda v: {m: [v] * n for m in ("ssim", "psnr", "vifp", "fsim")}  # noqa: E731
    fragile = rec.model_copy(update=dict(attack="fragile", preset=None, protection=full(0.5),
                                         purified={"jpeg75": full(0.99)}))
    robust = rec.model_copy(update=dict(attack="robust", preset=None, protection=full(0.7),
                                        purified={"jpeg75": full(0.72)}))
    df = ranking([fragile, robust])
    by = df.set_index("method")
    assert by.loc["fragile", "ssim"] < by.loc["robust", "ssim"]
    assert math.isclose(by.loc["fragile", "worst_ssim"], 0.99) and math.isclose(by.loc["robust", "worst_ssim"], 0.72)
    assert by.loc["robust", "rank_worst"] == 1 and by.loc["fragile", "rank_worst"] == 2
    assert by.loc["fragile", "worst_by"] == f"jpeg75 {n}"


def test_a_run_records_each_purifiers_settings(tmp_path):
    from harness_helpers import fast_suite

    suite = fast_suite(eps=("8/255",), prompts=("P3",), purifiers=("jpeg90", "tv0.05"), n_images=3)
    res = spdbench.run("uniform-noise", suite=suite, out=tmp_path / "run")
    assert res.ok
    rec = res.records[0]
    assert set(rec.purified) == {"jpeg90", "tv0.05"}
    assert rec.suite_config["purifier_settings"]["jpeg90"]["settings"]["quality"] == 90
    assert rec.suite_config["purifier_settings"]["tv0.05"]["settings"]["weight"] == 0.05
