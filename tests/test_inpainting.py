"""Inpainting: the target's condition channels, mask-aware scores, suites with masks, DiffusionGuard,
and verification of inpainting records (issue 20)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import piq
import pytest
import torch

import spdbench
from spdbench import Budget, load_target
from spdbench.attacks import get_attack
from spdbench.attacks.diffusionguard import first_timestep, shrink_kept_region
from spdbench.errors import InputError
from spdbench.data.masks import centre_box, mask_set, save_masks
from spdbench.scoring.regions import region_psnr, region_ssim
from spdbench.verify.submit import verify
from spdbench.suites import SUITES, get_suite

from harness_helpers import attack_param


@pytest.fixture(scope="module")
def inpainter():
    return load_target("tiny-inpaint")


@pytest.fixture(scope="module")
def photos():
    return spdbench.load_photos(n=4, size=64)


def _box(n: int, size: int) -> torch.Tensor:
    return torch.stack([centre_box(size) for _ in range(n)])


# --- mask-aware scores ----------------------------------------------------------------------------
def test_region_scores_over_the_whole_image_equal_piq_on_real_photos():
    x = spdbench.load_photos(n=4, size=128)
    y = (x + 0.04 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    ones = torch.ones(4, 1, 128, 128)
    assert torch.allclose(region_ssim(y, x, ones), piq.ssim(y, x, data_range=1.0, reduction="none"), atol=2e-4)
    assert torch.allclose(region_psnr(y, x, ones), piq.psnr(y, x, data_range=1.0, reduction="none"), atol=1e-3)


def test_region_scores_see_only_their_region():
    x = spdbench.load_photos(n=2, size=64)
    m = _box(2, 64)
    y = x.clone()
    y[:, :, 16:48, 16:48] = 1 - y[:, :, 16:48, 16:48]  # destroy the box, keep the rest exactly
    assert (region_psnr(y, x, 1 - m) > 90).all(), "the kept region is untouched"
    assert (region_psnr(y, x, m) < 15).all()
    assert (region_ssim(y, x, m) < region_ssim(y, x, torch.ones_like(m))).all(), "the box alone is worse than the whole"


# --- the target ------------------------------------------------------------------------------------
def test_inpaint_condition_is_differentiable_and_blanks_the_hole(inpainter, photos):
    x = photos[:2].clone().requires_grad_(True)
    m = _box(2, 64)
    cond = inpainter.inpaint_condition(x, m)
    assert cond.shape == (2, 5, 8, 8)
    cond[:, 1:].float().sum().backward()
    g = x.grad.abs().sum(1, keepdim=True)
    assert float(g[m < 0.5].sum()) > 0 and float(g[m > 0.5].sum()) == 0, "the hole never reaches the condition"


def test_an_img2img_objective_runs_unchanged_on_an_inpainting_target(inpainter, photos):
    """Diff-Protect's objectives call predict_noise(z_t, t, c): on a 9-channel UNet the condition is
    then "repaint everything", and the call works."""
    attack = get_attack("advdm", steps=2)
    value = attack.objective(photos[:2], inpainter, photos[:2])
    assert value.shape == (2,) and torch.isfinite(value).all()
    with pytest.raises(ValueError, match="not an inpainting model"):
        load_target("tiny").predict_noise(torch.zeros(1, 4, 8, 8), 10, load_target("tiny").encode_prompt([""]),
                                          inpaint=torch.zeros(1, 5, 8, 8))


# --- DiffusionGuard ----------------------------------------------------------------------------------
def test_shrinking_the_kept_region_only_grows_the_repaint_mask_and_is_seeded():
    m = _box(6, 64)
    a = shrink_kept_region(m, torch.Generator().manual_seed(1))
    b = shrink_kept_region(m, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert bool((a >= m).all()), "the repaint region never shrinks"
    assert bool((a.flatten(1).sum(1) > m.flatten(1).sum(1)).any()), "some masks grow"


def test_diffusionguard_official_preset_is_the_anchors_budget_on_the_0_1_scale():
    cls = type(get_attack("diffusionguard"))
    assert cls.preset_budgets["official"] == Budget("linf", "8/255"), "16/255 on [-1, 1] is 8/255 on [0, 1]"
    assert cls.presets["official"]["steps"] == 800 and cls.presets["official"]["step_size"] == pytest.approx(0.5 / 255)


def test_diffusionguard_refuses_an_img2img_target_and_missing_masks(photos):
    attack = get_attack("diffusionguard", steps=1)
    with pytest.raises(InputError, match="img2img model"):
        attack(photos[:1], load_target("tiny-random"), Budget("linf", "8/255"), torch.Generator().manual_seed(0),
               masks=_box(1, 64))
    with pytest.raises(InputError, match="masks"):
        attack(photos[:1], load_target("tiny-inpaint"), Budget("linf", "8/255"), torch.Generator().manual_seed(0))


def test_diffusionguard_beats_uniform_noise_on_its_own_objective(inpainter, photos):
    x, m = photos, _box(4, 64)
    budget = Budget("linf", "8/255")
    attack = get_attack("diffusionguard", steps=8, step_size=2 / 255)
    delta = attack(x, inpainter, budget, torch.Generator().manual_seed(0), masks=m)
    assert float(delta.abs().max()) <= 8 / 255 + 1e-6
    assert float(delta[m.expand_as(delta) > 0.5].abs().max()) == 0, "nothing is spent on the repainted region"
    noise = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 8 / 255
    attack.set_masks(m)
    ours = attack.objective((x + delta).clamp(0, 1), inpainter, x)
    rand = attack.objective((x + noise).clamp(0, 1), inpainter, x)
    assert float((ours - rand).mean()) < 0, (ours, rand)   # lower = stronger: a larger first noise prediction
    # the first timestep of a 4-step schedule over 1000 training steps (leading spacing, offset 1): 751
    assert first_timestep(inpainter, 4) == 751


# --- suites, the harness, verification ------------------------------------------------------------------
FAST = dataclasses.replace(get_suite("smoke-inpaint"), name="test-inpaint", image_size=64, eps=("16/255",),
                           prompts=("P3",), n_images=4, attack_steps=2, attack_work=None, attack_batch_size=4,
                           purifiers=("jpeg75",),
                           edit=dataclasses.replace(get_suite("smoke-inpaint").edit, steps=4))


@pytest.fixture(scope="module")
def inpaint_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SUITES, "test-inpaint", FAST)
        out = tmp_path_factory.mktemp("inpaint") / "run"
        result = spdbench.run("diffusionguard", suite="test-inpaint", out=out)
        yield result, mp


def test_an_inpainting_run_records_masks_and_both_regions(inpaint_run):
    result, _ = inpaint_run
    assert result.ok, [r.error for r in result.failed]
    names = [n for r in result.records for n in r.image_names]
    masks = mask_set("centre-box", names, 64)
    from spdbench.data.masks import mask_sha256

    for rec in result.records:
        n = len(rec.image_names)
        assert rec.task == "inpaint" and rec.masks["set"] == "centre-box"
        assert rec.masks["sha256"] == [mask_sha256(masks[names.index(i)]) for i in rec.image_names]
        assert {k: len(v) for k, v in rec.protection_region.items()} == {"ssim": n, "psnr": n}
        assert rec.protection_region_mean["ssim"] == pytest.approx(sum(rec.protection_region["ssim"]) / n)
        assert set(rec.purified_region) == {"jpeg75"} and len(rec.imperceptibility_kept["psnr"]) == n
        assert rec.protection_region["ssim"] != rec.protection["ssim"], "the region is scored apart"


def test_a_run_with_the_subject_keeping_masks_records_and_verifies_them(tmp_path):
    """PhotoGuard's setting: keep the subject, repaint the rest (the hand-drawn set, masks.py)."""
    from spdbench.data.masks import mask_sha256

    suite = dataclasses.replace(FAST, name="test-inpaint-subject", masks="subject")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SUITES, suite.name, suite)
        result = spdbench.run("uniform-noise", suite=suite.name, out=tmp_path / "run")
        assert result.ok, [r.error for r in result.failed]
        for rec in result.records:
            want = mask_set("subject", rec.image_names, 64)
            assert rec.masks["set"] == "subject" and rec.masks["sha256"] == [mask_sha256(m) for m in want]
        report = verify(result.out, sample=1, attack_rerun=False, seed=0)
        assert report.ok, report.problems


def test_an_inpainting_run_verifies_and_a_forged_mask_is_refused(inpaint_run, tmp_path):
    result, _ = inpaint_run
    report = verify(result.out, sample=1, attack_rerun=True, seed=0)
    assert report.ok, report.problems
    forged = tmp_path / "forged"
    shutil.copytree(result.out, forged)
    for f in (forged / "records").glob("*.json"):
        data = json.loads(f.read_text())
        data["masks"]["sha256"][0] = "0" * 64
        f.write_text(json.dumps(data))
    report = verify(forged, sample=1, attack_rerun=False, seed=0)
    assert not report.ok and any("masks' sha256" in p for p in report.problems), report.problems


def test_a_forged_kept_region_value_of_any_image_is_refused(inpaint_run, tmp_path):
    """Kept-region values need no edit, so verify recomputes them for every image (not a sample):
    a value forged on the first image of a cell is caught."""
    result, _ = inpaint_run
    forged = tmp_path / "forged-kept"
    shutil.copytree(result.out, forged)
    first = set()
    for f in (forged / "records").glob("*.json"):
        data = json.loads(f.read_text())
        if len(data["image_names"]) >= 2:  # the first of several, not the last
            data["imperceptibility_kept"]["psnr"][0] += 3.0
            first.add(data["image_names"][0])
            f.write_text(json.dumps(data))
    assert first
    report = verify(forged, sample=1, attack_rerun=False, seed=0)
    assert not report.ok
    assert any("kept region" in p and any(n in p for n in first) for p in report.problems), report.problems


def test_the_leaderboard_shows_inpainting_as_its_own_group(inpaint_run, tmp_path):
    from spdbench.report.board import build

    result, _ = inpaint_run
    md = build(result.records, tmp_path, formats=("md",))["md"].read_text()
    assert "## Inpainting · test-inpaint" in md and "SSIM repainted region" in md and "kept-region PSNR" in md


def test_masks_and_models_must_match(tmp_path, photos):
    names = [f"p{i}" for i in range(4)]
    with pytest.raises(InputError, match="img2img model"):
        spdbench.run("photoguard-encoder", suite="test-inpaint" if "test-inpaint" in SUITES else FAST,
                     target="tiny-random", images=photos, image_names=names, out=tmp_path / "a")
    folder = tmp_path / "masks"
    save_masks(_box(4, 64), names, folder)
    with pytest.raises(InputError, match="--masks"):
        spdbench.run("photoguard-encoder", suite="smoke", images=photos, image_names=names, masks=folder,
                     out=tmp_path / "b")
    with pytest.raises(InputError, match="inpainting model"):
        spdbench.run("photoguard-encoder", suite="smoke", target="tiny-inpaint", images=photos, image_names=names,
                     out=tmp_path / "c")


# --- PhotoGuard's original setting ------------------------------------------------------------------
def test_photoguard_diffusion_madry_runs_its_inpainting_setting_on_an_inpainting_target(inpainter, photos):
    """On an inpainting target the edit starts from pure noise and sees x + delta only through the
    mask and masked-image channels: the hole's pixels get no gradient, and it beats noise."""
    x, m = photos[:2], _box(2, 64)
    attack = get_attack("photoguard-diffusion", preset="madry", steps=6, grad_samples=1, eval_samples=2)
    budget = type(attack).preset_budgets["madry"]
    _, timesteps = attack.scheduler(inpainter)
    assert len(timesteps) == 4 and timesteps[0] == 751, "the whole 4-step schedule, from the noisiest step"
    delta = attack(x, inpainter, budget, torch.Generator().manual_seed(0), masks=m)
    hole = m.expand_as(delta) > 0.5
    assert float(delta[hole].abs().max()) == 0 and float(delta[~hole].abs().max()) > 0
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * budget.eps
    ours = attack.objective((x + delta).clamp(0, 1), inpainter, x)
    rand = attack.objective((x + noise).clamp(0, 1), inpainter, x)
    assert float((ours - rand).mean()) < 0, (ours, rand)
    with pytest.raises(InputError, match="needs the editor's masks"):
        attack(x, inpainter, budget, torch.Generator().manual_seed(0))


# --- every attack runs against the inpainting model -----------------------------------------------------
def _every_attack():
    return [n for n in spdbench.list_attacks() if not n.startswith("test-")]


@pytest.mark.parametrize("name", _every_attack())
def test_every_attack_runs_against_the_inpainting_model(name, inpainter, photos):
    """Attacks that do not read masks run unchanged on the 9-channel model; those that do get them.
    Two steps at 64 px: the contract only (protection on inpainting is measured in docs/inpainting.md)."""
    from spdbench.attacks import attack_class
    from spdbench.testing.check import mask_args

    cls = attack_class(name)
    fast = dict(steps=2, grad_samples=1, eval_samples=1, unroll_steps=2)
    attack = cls(**{k: v for k, v in fast.items() if k in cls.defaults})
    x = photos[:2]
    budget = Budget("linf", "8/255")
    masks = mask_args(attack, x, inpainter)
    if attack.kind.fits:
        attack.fit(x, inpainter, budget, torch.Generator().manual_seed(0), **masks)
    delta = attack(x, inpainter, budget, torch.Generator().manual_seed(0), **masks)
    assert delta.shape == x.shape and torch.isfinite(delta).all()
    assert float(delta.abs().max()) <= budget.eps + 1e-6


#: the checks that take over ~10 s on one core against the inpainting model
SLOW_ON_INPAINT = {"advdm", "mist", "mist-diffprotect", "mist-v2", "photoguard-diffusion", "spd-advdm", "spd-mist", "spd-sds-minus", "spd-sds-plus",
                   "diffusionguard", "sds-t", "sds-minus", "sds-plus", "amortized-encoder", "amortized-pca-minus",
                   "spd-pca-plus", "spd-pca-minus", "spd-encoder"}
#: measured: a universal Mist fit on the 7 train photos does not beat uniform noise on the test
#: photos of the inpainting model at check_attack's 20 steps; it does on the img2img model. On the
#: shipped tiny-inpaint (5000 steps, 2026-12-04 23:15) it loses at 8/255 (-1272.75 vs noise
#: -1301.11) and at both L2 budgets (-1284.23 vs -1299.30; -1274.98 vs -1298.39), and beats noise
#: at 16/255 and on the train photos. spd-advdm and spd-sds-minus, which tied noise at L2 on the
#: 3500-step model, pass on it (they were strict xfails: the change showed).
#: Results, kept visible: strict, so a change shows.
FAILS_ON_INPAINT = {
    "spd-mist": "universal Mist does not generalize to the test photos on tiny-inpaint (20 fit steps)",
}


@pytest.mark.parametrize("name", [attack_param(n, SLOW_ON_INPAINT, FAILS_ON_INPAINT) for n in _every_attack()])
def test_check_attack_passes_on_the_inpainting_model(name):
    """The public property checks (contract, non-zero, determinism, beats noise on both splits)
    against tiny-inpaint: attacks that do not read the mask are checked through the "repaint
    everything" condition, mask readers with centre boxes."""
    from spdbench.testing.check import check_attack

    params = dict(grad_samples=1, eval_samples=2, unroll_steps=2) if name == "photoguard-diffusion" else None
    check_attack(name, target="tiny-inpaint", params=params).assert_ok()
