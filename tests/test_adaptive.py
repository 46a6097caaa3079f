"""Adaptive (EOT) attacks: `robust_to` makes any GradientAttack optimize through the purifiers it expects."""
from __future__ import annotations

import pytest
import torch

import spdbench
from spdbench import Budget
from spdbench.scoring import metrics
from spdbench.attacks import get_attack
from spdbench.attacks.eot import transform
from spdbench.errors import InputError
from spdbench.purifiers import get_purifier
from spdbench.scoring.stats import bootstrap_ci


def test_robust_to_names_are_checked_and_recorded():
    a = get_attack("photoguard-encoder", robust_to=["jpeg75", "noise0.02"])
    assert a.params["robust_to"] == ["jpeg75", "noise0.02"]
    with pytest.raises(InputError, match="'tv0.05' has no differentiable version"):
        get_attack("advdm", robust_to=["tv0.05"])
    with pytest.raises(InputError, match="unknown parameter"):
        get_attack("spd-encoder", robust_to=["jpeg75"])   # universal attacks do not take it (yet): refused


def test_differentiable_jpeg_is_close_to_the_real_codec_and_passes_gradients(photos64):
    x = photos64.clone().requires_grad_(True)
    y = transform("jpeg75")(x, None)
    y.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    real = get_purifier("jpeg75")(photos64)
    assert float(metrics.psnr(y.detach().clamp(0, 1), real).mean()) > 30.0


def _attack_pair(robust_to, eps="8/255", steps=60, n=8):
    """Plain and adaptive photoguard-encoder, same eps, steps and seed, on n photos (tiny, 64 px)."""
    target = spdbench.load_target("tiny")
    x = spdbench.load_photos(n=n, size=64)
    budget = Budget("linf", eps)
    advs = {}
    for name, params in (("plain", {}), ("eot", {"robust_to": robust_to})):
        attack = get_attack("photoguard-encoder", steps=steps, **params)
        advs[name] = spdbench.apply_budget(x, attack(x, target, budget, torch.Generator().manual_seed(0)), budget)
    return target, x, advs


@pytest.mark.slow
def test_adaptive_attack_keeps_more_protection_after_the_purifier_it_expects():
    """After a strong blur (sigma 3), the EOT attack's objective beats the plain attack's on the same
    photos, paired over 8 photos with a 95% bootstrap CI below 0 (measured on v3: 4113 vs 4190, -77 [-122, -50];
    scripts/adaptive-table.py)."""
    from spdbench.purifiers import gaussian_blur

    target, x, advs = _attack_pair(["blur3"])
    plain = get_attack("photoguard-encoder")
    obj = {k: plain.objective(gaussian_blur(v, 3.0), target, x) for k, v in advs.items()}   # lower = stronger
    ci = bootstrap_ci((obj["eot"] - obj["plain"]).tolist(), seed=0)
    assert ci.high < 0, f"objective after blur sigma 3: EOT - plain = {ci}"


@pytest.mark.slow
def test_adaptive_jpeg_is_not_worse_than_plain_after_jpeg75():
    """JPEG q75 does not weaken photoguard-encoder on the tiny target (objective 3545 -> 3563 of a
    5315 start, v3), so there is nothing for EOT to win back; what must hold is that the BPDA JPEG
    gradient does not steer the attack astray (kornia's surrogate did: +10%; BPDA 3562)."""
    target, x, advs = _attack_pair(["jpeg75"], eps="16/255")
    jpeg = get_purifier("jpeg75")
    plain = get_attack("photoguard-encoder")
    obj = {k: float(plain.objective(jpeg(v), target, x).mean()) for k, v in advs.items()}
    assert obj["eot"] <= obj["plain"] * 1.01, obj
