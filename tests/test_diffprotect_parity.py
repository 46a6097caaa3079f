"""Parity with the anchor: one update step of each Diff-Protect method, re-stated here as the
anchor's code does it (xavihart/Diff-Protect: `code/diff_mist.py` with advertorch's LinfPGDAttack
for AdvDM and Mist, `code/attacks.py::Linf_PGD.pgd_sds` for SDS and SDS-T), on x in [-1, 1] with
its eps 32/255 and step 2/255, against spdbench's step from the same start (x itself), the same
(xi, t, eps) draws and the same conditioning; the deltas must agree to 1e-6 on the [0, 1] scale.

The anchor's model calls, as ldm names them, in diffusers terms:
get_first_stage_encoding(encode_first_stage(x)) = scale * (mu + sigma * xi);
q_sample(z, t, n) = sqrt(abar_t) z + sqrt(1 - abar_t) n; apply_model = the UNet with c;
the LatentDiffusion forward loss = mean over the batch of the per-image mean (eps_hat - n)^2.
The draws are taken from a generator seeded like the attack's, in the order the module documents.
"""
from __future__ import annotations

import pytest
import torch

import spdbench
from spdbench import Budget
from spdbench.attacks.diffprotect import load_pattern
from spdbench.attacks.objectives import resize_image

EPS_PM1, STEP_PM1 = 32 / 255, 2 / 255  # the anchor's 16/255 and 1/255 on [-1, 1]
SEED = 5


@pytest.fixture(scope="module")
def target():
    return spdbench.load_target("tiny")


@pytest.fixture(scope="module")
def photos():
    return spdbench.load_photos(n=2, size=64)


# --- the anchor, re-stated ---------------------------------------------------------------------
def first_stage(target, x_pm1, xi):
    dist = target.vae.encode(x_pm1).latent_dist
    return target.vae.config.scaling_factor * (dist.mean + dist.std * xi)


def q_sample(target, z, t, noise):
    abar = target.scheduler.alphas_cumprod.to(z.device)[t].view(-1, 1, 1, 1)
    return abar.sqrt() * z + (1 - abar).sqrt() * noise


def semantic_loss(target, z, t, noise, c):
    eps_pred = target.unet(q_sample(target, z, t, noise), t, encoder_hidden_states=c.expand(len(z), -1, -1)).sample
    return (eps_pred - noise).pow(2).mean(dim=(1, 2, 3)).mean()


def advertorch_step(X, X_adv, loss):
    """advertorch LinfPGDAttack (targeted: minimize the model's output) one iteration."""
    (grad,) = torch.autograd.grad(-loss, X_adv)
    delta = (X_adv - X).detach() + STEP_PM1 * grad.sign()
    delta = delta.clamp(-EPS_PM1, EPS_PM1)
    return (X + delta).clamp(-1, 1)


def pgd_sds_update(X, X_raw, direction):
    X_adv = X_raw + direction.sign() * STEP_PM1
    X_adv = torch.minimum(torch.maximum(X_adv, X - EPS_PM1), X + EPS_PM1)
    return X_adv.clamp(-1, 1)


def draws(target, n, generator, extra_latents=0):
    shape = (n, 4, 8, 8)
    xi = torch.randn(shape, generator=generator)
    t = torch.randint(0, target.scheduler.config.num_train_timesteps, (n,), generator=generator)
    noise = torch.randn(shape, generator=generator)
    extra = [torch.randn(shape, generator=generator) for _ in range(extra_latents)]
    return xi, t, noise, extra


def anchor_step(name, target, x, c, pattern):
    """The anchor's one step for method `name` from X_adv = X; returns the new X_adv in [-1, 1]."""
    g = torch.Generator().manual_seed(SEED)
    X = x * 2 - 1
    X_adv = X.clone().requires_grad_(True)
    if name == "advdm":  # diff_mist target_model(mode='advdm', g_mode='+'): output -L_sem
        xi, t, noise, _ = draws(target, len(x), g)
        return advertorch_step(X, X_adv, -semantic_loss(target, first_stage(target, X_adv, xi), t, noise, c))
    if name == "mist":  # output fn(zx, zy) * g_dir - L_sem * rate, rate 1e4, MSELoss(sum)
        xi, t, noise, (xi_t,) = draws(target, len(x), g, 1)
        zx = first_stage(target, X_adv, xi)
        with torch.no_grad():
            zy = first_stage(target, pattern * 2 - 1, xi_t)
        loss = (zx - zy).pow(2).sum() - semantic_loss(target, zx, t, noise, c) * 1e4
        return advertorch_step(X, X_adv, loss)
    # Linf_PGD.pgd_sds: z_adv.backward(gradient = eps_pred - noise); X_raw = the current X_adv
    extra = 2 if name == "sds-t" else 0
    xi, t, noise, rest = draws(target, len(x), g, extra)
    z_adv = first_stage(target, X_adv, xi)
    with torch.no_grad():
        z = z_adv.detach()
        eps_pred = target.unet(q_sample(target, z, t, noise), t,
                               encoder_hidden_states=c.expand(len(x), -1, -1)).sample
        grad = eps_pred - noise
    z_adv.backward(gradient=grad)
    g_x = X_adv.grad.detach()
    g_dir = 1.0 if name == "sds-plus" else -1.0
    if name != "sds-t":
        return pgd_sds_update(X, X.clone(), g_dir * g_x)
    xi_t, xi2 = rest  # using_target: z_target (no grad), then x re-encoded for the textural loss
    with torch.no_grad():
        z_target = first_stage(target, pattern * 2 - 1, xi_t)
    X_adv2 = X.clone().requires_grad_(True)
    loss = torch.nn.MSELoss(reduction="sum")(z_target, first_stage(target, X_adv2, xi2))
    loss.backward()
    return pgd_sds_update(X, X.clone(), g_dir * g_x * 5 - X_adv2.grad.detach())


@pytest.mark.parametrize("name,n", [("advdm", 2), ("sds-plus", 2), ("sds-minus", 2), ("mist", 1), ("sds-t", 1)])
def test_one_step_matches_the_anchor(name, n, target, photos):
    x = photos[:n]
    c = target.encode_prompt(["a photo"])
    pattern = resize_image(load_pattern(), x.shape[-2:])
    expected = (anchor_step(name, target, x, c, pattern).detach() + 1) / 2 - x
    attack = spdbench.get_attack(name, steps=1, step_size=1 / 255, init="zero", prompt="a photo")
    got = attack(x, target, Budget("linf", "16/255"), torch.Generator().manual_seed(SEED))
    assert float(expected.abs().max()) > 0.5 / 255, "the anchor's step moved the image"
    assert torch.allclose(got, expected, atol=1e-6, rtol=0), \
        f"{name}: max |difference| {float((got - expected).abs().max()):.3g}"


@pytest.mark.parametrize("name", ["advdm", "sds-minus", "mist"])
def test_preset_is_the_anchors_setting(name):
    cls = spdbench.attacks.attack_class(name)
    preset = cls(preset="diff-protect")
    assert cls.preset_budgets["diff-protect"] == Budget("linf", "16/255")
    assert preset.steps == 100 and preset.step_size == pytest.approx(1 / 255)
    assert preset.schedule == "constant" and preset.optimizer == "pgd" and preset.prompt == "a photo"
    assert preset.init == ("zero" if name.startswith("sds") else "random")


def test_sds_uses_no_unet_backward(target, photos):
    """SDS's claim to be cheap: one UNet forward and no UNet backward per step (AdvDM: both)."""
    from spdbench.harness.model_calls import ModelCallCounter

    counts = {}
    for name in ("advdm", "sds-minus"):
        attack = spdbench.get_attack(name, steps=3)
        with ModelCallCounter(target) as counter:
            attack(photos, target, Budget("linf", "8/255"), torch.Generator().manual_seed(0))
        counts[name] = counter.per_image(len(photos))
    assert counts["sds-minus"]["unet_bwd"] == 0 and counts["advdm"]["unet_bwd"] == 3
    assert counts["sds-minus"]["unet_fwd"] == counts["advdm"]["unet_fwd"] == 3
