"""Attacks on the instruction editor (tiny-ip2p): the UNet-reading attacks see its 8-channel input,
and EditShield ascends the latent shift of its image input by sign steps."""
from __future__ import annotations

import pytest
import torch

from spdbench.attacks.base import get_attack
from spdbench.attacks.diffprotect import denoising_error, draw_step
from spdbench.attacks.objectives import posterior_sample, start_delta
from spdbench.budget import Budget, clamp_to_image
from spdbench.data.photos import load_photos
from spdbench.targets import load_target

EPS = Budget("linf", "8/255")


@pytest.fixture(scope="module")
def ip2p():
    return load_target("tiny-ip2p")


@pytest.fixture(scope="module")
def photos():
    return load_photos(size=64, names=["chelsea", "coffee"])


@pytest.mark.slow  # ~30 s of CPU: six attacks through the UNet (AdvDM's 8-channel input is checked fast below)
def test_unet_attacks_run_on_the_instruction_editor(ip2p, photos):
    x = photos[:1]
    for name, kw in [("advdm", {}), ("sds-minus", {}), ("mist-diffprotect", {}), ("sds-t", {}),
                     ("mist-v2", dict(rounds=2, lora_steps=1)), ("photoguard-diffusion", dict(unroll_steps=2))]:
        delta = get_attack(name, steps=2, **kw)(x, ip2p, EPS, torch.Generator().manual_seed(0))
        assert delta.shape == x.shape and float(delta.abs().max()) <= EPS.eps + 1e-6, name
        assert float(delta.abs().max()) > 0, name


def test_advdm_reads_the_8_channel_input_the_pipeline_builds(ip2p, photos):
    """AdvDM's loss on an IP2P target = the denoising error of the UNet fed [z_t, mu(x)] (the
    pipeline's concatenation: noisy latent, then the unscaled posterior mean of the photo)."""
    x = photos[:1]
    attack = get_attack("advdm")
    got = attack.objective_loss(ip2p, x, x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    d = draw_step(ip2p, x, g)
    with torch.no_grad():
        enc = ip2p.encode(x)
        z = (enc.mean + (0.5 * enc.logvar).exp() * d.xi) * ip2p.scaling_factor
        z_t = ip2p.add_noise(z, d.eps, d.t)
        pred = ip2p.unet(torch.cat([z_t, enc.mean], 1), d.t, encoder_hidden_states=attack.condition(ip2p)).sample
    torch.testing.assert_close(got, (pred - d.eps).pow(2).flatten(1).mean(1))
    with pytest.raises(ValueError, match="needs image_latents"):  # the condition is not optional there
        denoising_error(ip2p, z, d, attack.condition(ip2p))
    assert posterior_sample(load_target("tiny-random"), x, d.xi)[1] is None  # img2img: no condition


def test_editshield_beats_uniform_noise_on_its_objective(ip2p, photos):
    attack = get_attack("editshield", steps=8)
    delta = attack(photos, ip2p, EPS, torch.Generator().manual_seed(0))
    noise = get_attack("uniform-noise")(photos, ip2p, EPS, torch.Generator().manual_seed(0))
    ours, theirs = attack.objective(photos + delta, ip2p, photos), attack.objective(photos + noise, ip2p, photos)
    assert (ours < theirs).all()  # lower = stronger: a larger latent shift for every photo
    assert attack.loss_history[-1] > attack.loss_history[0]


def test_editshield_step_is_a_sign_step_on_the_latent_shift_gradient(ip2p, photos):
    x, step = photos[:1], 1 / 255
    delta = get_attack("editshield", steps=1, step_size=step, eot=())(x, ip2p, EPS, torch.Generator().manual_seed(5))
    start = start_delta("random", x, EPS, torch.Generator().manual_seed(5))
    start = clamp_to_image(x, EPS.project(start)).requires_grad_(True)
    shift = (ip2p.encode(x + start).mean.float() - ip2p.encode(x).mean.float().detach()).pow(2).sum()
    (grad,) = torch.autograd.grad(shift, start)
    want = clamp_to_image(x, EPS.project(start.detach() + step * grad.sign()))
    torch.testing.assert_close(delta, want)
    assert get_attack("editshield", preset="paper").steps == 30


def test_work_matching_measures_the_instruction_editors_passes(ip2p):
    """The work probe (scoring/work.py) calls the UNet with the image condition an 8-channel UNet needs."""
    from spdbench.scoring.work import pass_flops

    flops = pass_flops(ip2p, 64)
    assert flops["unet_fwd"] > 0 and flops["unet_bwd"] > 0


def test_an_inpainting_attack_names_the_instruction_editor_it_was_given(ip2p, photos):
    """DiffusionGuard does not apply to an instruction editor: one line that says what the model is."""
    from spdbench.errors import InputError

    with pytest.raises(InputError, match="'tiny-ip2p' is an instruction editor, not an inpainting model"):
        get_attack("diffusionguard")(photos, ip2p, EPS, torch.Generator().manual_seed(0))
