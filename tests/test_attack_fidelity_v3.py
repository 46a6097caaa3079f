"""Issue 35, the attack side: each method as its anchor has it, and budgets that get used.

- DiffusionGuard's mask augmentation draws its shrink depth from the anchor's radius
  (choi403/DiffusionGuard `utils/utils.py::get_mask_radius_list`), re-stated here from the anchor's
  code, not from ours; entries made before keep their (disk) rule through `augment=True`.
- `finish="boundary"` takes an optimized delta onto the budget's boundary (the stochastic attacks'
  budget use).
- PhotoGuard diffusion can encode x + delta as a posterior sample (`latent="sample"`, the
  notebook's `latent_dist.sample()`); the default stays the mean.
- `mist` is `mist-diffprotect` (alias kept); `mist-v2` (psyker-team/mist-v2, lunet) matches its
  anchor's PGD update step and beats noise on its own objective.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import spdbench
from spdbench import Budget
from spdbench.attacks import attack_class, get_attack, list_attacks
from spdbench.attacks.diffprotect import load_pattern
from spdbench.attacks.diffusionguard import AUGMENT_RULE, kept_radius, shrink_kept_region
from spdbench.attacks.mist_v2 import lora_unet, round_steps
from spdbench.attacks.objectives import resize_image, to_boundary
from spdbench.data.masks import centre_box
from spdbench.errors import InputError


#: one thread per module (conftest.one_thread): bitwise-repeatable and light on a shared machine
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return spdbench.load_target("tiny")


@pytest.fixture(scope="module")
def photos():
    return spdbench.load_photos(n=2, size=64)


# --- DiffusionGuard: the anchor's radius ----------------------------------------------------------
def anchor_radius(kept: np.ndarray) -> float:
    """choi403/DiffusionGuard utils/utils.py:get_mask_radius_list on the mask PNG (white = kept,
    3 channels): area = np.sum(array > 128); radius = (area / (3 * 2 / math.pi)) ** 0.5."""
    image_array = np.repeat((kept * 255).astype(np.uint8)[..., None], 3, axis=2)
    area = np.sum(image_array > 128)
    return (area / (3 * 2 / math.pi)) ** 0.5


@pytest.mark.parametrize("size,frac", [(128, 0.5), (64, 0.25), (96, 0.75)])
def test_diffusionguard_radius_is_the_anchors(size, frac):
    repaint = centre_box(size, frac)[0].numpy() >= 0.5
    kept = (~repaint).astype(np.float64)
    expected = anchor_radius(kept)
    assert kept_radius(float(kept.sum()), "anchor") == pytest.approx(expected, rel=1e-12)
    # the rule this port had: 2.22x smaller (pi / sqrt(2))
    assert expected / kept_radius(float(kept.sum()), "disk") == pytest.approx(math.pi / math.sqrt(2), rel=1e-12)


def test_diffusionguard_shrink_replays_the_anchor_rule():
    """Each mask's depth: u ~ U(0, 1), D = int(1.1 * u * r_anchor) (the anchor's
    `eps=int(perturb_dist * contour_strength)`), k ~ U{0..D}, the kept region eroded by k."""
    masks = torch.stack([centre_box(64, 0.5).float(), centre_box(64, 0.25).float()])
    got = shrink_kept_region(masks, torch.Generator().manual_seed(3), 1.1, "anchor")
    g = torch.Generator().manual_seed(3)
    for m, out in zip(masks, got):
        r = anchor_radius((m[0] < 0.5).numpy().astype(np.float64))
        depth_max = int(1.1 * float(torch.rand((), generator=g)) * r)
        k = int(torch.randint(0, depth_max + 1, (1,), generator=g)) if depth_max else 0
        expected = torch.nn.functional.max_pool2d(m[None], 2 * k + 1, stride=1, padding=k)[0] if k else m
        assert torch.equal(out, expected)


def test_diffusionguard_official_preset_is_the_anchor_radius_and_true_is_the_disk_rule():
    """The default stays the disk rule (with the anchor's radius on a square erosion the attack no
    longer beat noise in check_attack); the `official` preset takes the anchor's radius."""
    cls = attack_class("diffusionguard")
    assert cls.defaults["augment"] == "disk" and cls.presets["official"]["augment"] == "anchor"
    masks = centre_box(64, 0.5)[None].float()
    for seed in range(6):  # `augment=True` (what entries recorded before the choice) draws the disk rule
        a = shrink_kept_region(masks, torch.Generator().manual_seed(seed), 1.1, "disk")
        dg = cls(augment=True)
        b = shrink_kept_region(masks, torch.Generator().manual_seed(seed), 1.1, AUGMENT_RULE[dg.augment])
        assert torch.equal(a, b)
    with pytest.raises(InputError, match="augment"):
        cls(augment="ring")


# --- budgets that get used --------------------------------------------------------------------
def test_to_boundary_linf_and_l2():
    d = torch.tensor([[[[0.01, -0.002], [0.0, 0.03]]]]).expand(2, 3, 2, 2).clone()
    d[1] = 0
    out = to_boundary(d, Budget("linf", "8/255"))
    assert torch.equal(out[0].abs() > 0, d[0].abs() > 0), "a coordinate never moved stays 0"
    assert torch.allclose(out[0][d[0] != 0].abs(), torch.full_like(out[0][d[0] != 0], 8 / 255))
    assert torch.equal(out[1], d[1])
    l2 = to_boundary(d, Budget("l2", 0.5))
    assert float(l2[0].norm()) == pytest.approx(0.5, rel=1e-6) and torch.equal(l2[1], d[1])
    x = torch.full_like(d, 0.99)
    assert float((x + to_boundary(d, Budget("linf", "8/255"), x)).max()) <= 1.0


def test_finish_boundary_spends_the_budget_of_a_stochastic_attack(tiny, photos):
    """sds-minus at a few steps ends inside the ball; finish="boundary" puts every moved pixel on it."""
    budget = Budget("linf", "8/255")
    plain = get_attack("sds-minus", steps=4)(photos, tiny, budget, torch.Generator().manual_seed(0))
    full = get_attack("sds-minus", steps=4, finish="boundary")(photos, tiny, budget, torch.Generator().manual_seed(0))
    inside = (photos + full > 1e-4) & (photos + full < 1 - 1e-4) & (plain != 0)  # not clamped, moved
    assert float(inside.float().mean()) > 0.5
    assert float(plain.pow(2).mean().sqrt()) < 0.9 * budget.eps
    assert torch.allclose(full[inside].abs(), torch.full_like(full[inside], budget.eps), atol=1e-6)
    assert torch.equal(torch.sign(full[inside]), torch.sign(plain[inside]))
    with pytest.raises(InputError, match="finish"):
        get_attack("advdm", finish="edge")


# --- PhotoGuard diffusion: the latent the notebook samples --------------------------------------
def test_photoguard_diffusion_latent_switch(photos):
    target = spdbench.load_target("tiny-inpaint")
    x, budget = photos[:1], Budget("linf", "8/255")
    masks = centre_box(64, 0.5)[None].float()
    kw = dict(steps=2, unroll_steps=2, eval_samples=1)
    mean = get_attack("photoguard-diffusion", **kw)(x, target, budget, torch.Generator().manual_seed(0), masks=masks)
    again = get_attack("photoguard-diffusion", latent="mean", **kw)(x, target, budget, torch.Generator().manual_seed(0),
                                                                     masks=masks)
    sample = get_attack("photoguard-diffusion", latent="sample", **kw)
    s1 = sample(x, target, budget, torch.Generator().manual_seed(0), masks=masks)
    s2 = sample(x, target, budget, torch.Generator().manual_seed(0), masks=masks)
    assert torch.equal(mean, again), "the default is the posterior mean, as before"
    assert torch.equal(s1, s2) and not torch.equal(s1, mean)
    cls = attack_class("photoguard-diffusion")
    assert cls.defaults["latent"] == "mean"
    assert cls.presets["madry"]["latent"] == "sample" and cls.presets["madry-linf"]["latent"] == "sample"


def test_inpaint_condition_samples_with_noise_and_defaults_to_the_mean(photos):
    target = spdbench.load_target("tiny-inpaint")
    masks = centre_box(64, 0.5)[None].float()
    base = target.inpaint_condition(photos[:1], masks)
    zero = target.inpaint_condition(photos[:1], masks, noise=torch.zeros(1, 4, 8, 8))
    drawn = target.inpaint_condition(photos[:1], masks, noise=torch.randn(1, 4, 8, 8))
    assert torch.equal(base, zero) and not torch.equal(base[:, 1:], drawn[:, 1:])


# --- Mist: the old name and Mist-v2 -------------------------------------------------------------
def test_mist_is_mist_diffprotect_and_the_old_name_resolves():
    assert attack_class("mist") is attack_class("mist-diffprotect")
    assert get_attack("mist").name == "mist-diffprotect"
    names = list_attacks()
    assert "mist-diffprotect" in names and "mist-v2" in names and "mist" not in names
    assert attack_class("mist-v2") is not attack_class("mist-diffprotect")


def test_mist_v2_preset_is_the_anchors_setting_converted_to_0_1():
    cls = attack_class("mist-v2")
    p = cls(preset="mist-v2")
    # mist.py: --pgd_eps 8/255 and --pgd_alpha 0.005 on images in [-1, 1] (Normalize([0.5], [0.5]))
    assert cls.preset_budgets["mist-v2"] == Budget("linf", "4/255")
    assert p.step_size == pytest.approx(0.005 / 2) and p.steps == 150 and p.rounds == 5
    assert round_steps(p.steps, p.rounds) == [30] * 5  # --max_adv_train_steps 30, --max_train_steps 5
    assert p.lora_steps == 10 and p.lora_rank == 4 and p.lora_lr == pytest.approx(1e-4)  # f_train 10, rank 4
    assert p.prompt == "a picture" and p.init == "zero"
    assert round_steps(40, 5) == [8] * 5 and round_steps(7, 3) == [3, 2, 2]


def test_mist_v2_lora_copy_starts_as_the_unet_and_leaves_it_untouched(tiny, photos):
    sur = lora_unet(tiny.unet, 4)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c = tiny.encode_prompt(["a picture"])
    with torch.no_grad():
        a = tiny.unet(z, torch.tensor([500]), encoder_hidden_states=c).sample
        b = sur(z, torch.tensor([500]), encoder_hidden_states=c).sample
    assert torch.allclose(a, b, atol=1e-6)
    assert any("lora_" in n for n, _ in sur.named_parameters())
    assert not any("lora_" in n for n, _ in tiny.unet.named_parameters())
    trainable = {n for n, p in sur.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def anchor_mist_v2_step(target, x, noise, t, z_target, c, alpha, eps):
    """psyker-team/mist-v2 attacks/mist.py::pgd_attack, one step for one image in [-1, 1]."""
    perturbed = x.clone()
    with torch.no_grad():
        latents = target.vae.encode(perturbed).latent_dist.mean
    latents = latents.detach().clone()
    latents.requires_grad = True
    latents = latents * target.vae.config.scaling_factor
    abar = target.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    pred = target.unet(noisy, t, encoder_hidden_states=c).sample
    loss = -torch.nn.functional.mse_loss(pred, z_target)
    grads = torch.autograd.grad(loss, latents)[0].detach().clone()
    perturbed.requires_grad = True
    target.vae.encode(perturbed).latent_dist.mean.backward(gradient=grads)
    adv = perturbed + alpha * perturbed.grad.sign()
    eta = torch.clamp(adv - x, min=-eps, max=eps)
    return torch.clamp(x + eta, min=-1, max=1).detach()


def test_mist_v2_one_step_matches_the_anchor(tiny, photos):
    """One PGD step of mist-v2 (round 1: the target's own UNet) against the anchor's step, from x,
    with the same draws: the pattern's posterior sample xi_T, then per step noise and t."""
    seed, alpha, eps = 11, 0.005, 8 / 255  # the anchor's, on [-1, 1]
    c = tiny.encode_prompt(["a picture"])
    g = torch.Generator().manual_seed(seed)
    pattern = resize_image(load_pattern(), photos.shape[-2:]) * 2 - 1
    with torch.no_grad():
        dist = tiny.vae.encode(pattern).latent_dist
    xi_t = torch.randn(dist.mean.shape, generator=g)
    z_target = tiny.vae.config.scaling_factor * (dist.mean + dist.std * xi_t)
    noise = torch.randn((len(photos), 4, 8, 8), generator=g)
    t = torch.randint(0, tiny.scheduler.config.num_train_timesteps, (len(photos),), generator=g)
    expected = torch.cat([anchor_mist_v2_step(tiny, photos[i:i + 1] * 2 - 1, noise[i:i + 1], t[i:i + 1], z_target, c,
                                              alpha, eps) for i in range(len(photos))])
    expected = (expected + 1) / 2 - photos
    attack = get_attack("mist-v2", steps=1, rounds=1, step_size=alpha / 2, init="zero", prompt="a picture")
    got = attack(photos, tiny, Budget("linf", eps / 2), torch.Generator().manual_seed(seed))
    assert float(expected.abs().max()) > 0.5 / 255, "the anchor's step moved the image"
    assert torch.allclose(got, expected, atol=1e-6, rtol=0), f"max |difference| {float((got - expected).abs().max()):.3g}"


def test_mist_v2_beats_noise_on_its_own_objective_and_fine_tunes_between_rounds(tiny, photos):
    budget = Budget("linf", "8/255")
    attack = get_attack("mist-v2", steps=12, rounds=3, lora_steps=2, eval_samples=2)
    delta = attack(photos, tiny, budget, torch.Generator().manual_seed(0))
    assert len(attack.loss_history) == 12
    noise = budget.random(torch.empty_like(photos), generator=torch.Generator().manual_seed(1))
    ours = attack.objective((photos + delta).clamp(0, 1), tiny, photos)
    theirs = attack.objective((photos + noise).clamp(0, 1), tiny, photos)
    assert bool((ours < theirs).all()), f"mist-v2 {ours.tolist()} vs uniform noise {theirs.tolist()}"
    # the fine-tuning moves the surrogate (and only the surrogate) away from the target's UNet
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    sur = attack.finetune(tiny, None, (photos + delta).detach(), torch.Generator().manual_seed(2))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c = tiny.encode_prompt(["a picture"])
    with torch.no_grad():
        a = tiny.unet(z, torch.tensor([500]), encoder_hidden_states=c).sample
        b = sur(z, torch.tensor([500]), encoder_hidden_states=c).sample
    assert not torch.allclose(a, b, atol=1e-7)
    assert all(torch.equal(v, tiny.unet.state_dict()[k]) for k, v in before.items())


def test_registry_alias_resolves_everywhere_but_is_not_listed():
    from spdbench.errors import RegistryError
    from spdbench.registry import Registry

    reg = Registry("thing")
    obj = object()
    reg.add("new-name", obj, note=1)
    reg.alias("old-name", "new-name")
    assert reg.get("old-name") is obj and "old-name" in reg and reg.metadata("old-name") == {"note": 1}
    assert reg.names() == ["new-name"] and reg.aliases() == {"old-name": "new-name"}
    with pytest.raises(RegistryError, match="cannot be an alias"):
        reg.alias("new-name", "old-name")
