"""Small, fast suites and attacks for harness tests (tiny-random target, 64 px, few steps)."""
from __future__ import annotations

import torch

import spdbench
from spdbench.editing import EditSettings
from spdbench.suites import get_suite


def fast_suite(**overrides):
    base = dict(target="tiny-random", image_size=64, eps=("16/255",), prompts=("P3",),
                edit=EditSettings(strength=0.5, steps=4, guidance=7.5, seed=9222), attack_steps=3,
                attack_batch_size=3, purifiers=())
    base.update(overrides)
    return get_suite("smoke", **base)


def fast_images(n: int = 6):
    return spdbench.load_photos(n=n, size=64)


class RecordingUAP(spdbench.UniversalAttack):
    """Remembers every image it was shown, to prove the test split never reaches fit()."""

    seen: list = []

    def fit(self, train_images, target, budget, generator=None):
        type(self).seen.append(train_images.clone())
        return budget.random(train_images[:1], generator)


class OverBudget(spdbench.Attack):
    def perturb(self, images, target, budget, generator=None):
        return torch.full_like(images, 3 * budget.eps)


class ReturnsNaN(spdbench.Attack):
    def perturb(self, images, target, budget, generator=None):
        return torch.full_like(images, float("nan"))


class WrongShape(spdbench.Attack):
    def perturb(self, images, target, budget, generator=None):
        return torch.zeros(1, 3, 8, 8)


class WrongDtype(spdbench.Attack):
    def perturb(self, images, target, budget, generator=None):
        return torch.zeros_like(images, dtype=torch.float64)


class Raises(spdbench.Attack):
    def perturb(self, images, target, budget, generator=None):
        raise ValueError("boom inside the attack")


for _name, _cls in [("test-recording-uap", RecordingUAP), ("test-over-budget", OverBudget),
                    ("test-nan", ReturnsNaN), ("test-wrong-shape", WrongShape),
                    ("test-wrong-dtype", WrongDtype), ("test-raises", Raises)]:
    if _name not in spdbench.attacks.base._REGISTRY:
        spdbench.register(_name)(_cls)
