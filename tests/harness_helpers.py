"""Small, fast suites and attacks for harness tests (tiny-random target, 64 px, few steps).

The deliberately broken attacks below are module-level classes (the attack worker imports them by
reference) but are registered by name only inside `registered_test_attacks()` -- use the
`test_attacks` fixture of conftest.py -- so they never leak into `list_attacks()` for other tests.
"""
from __future__ import annotations

import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import save_file

import spdbench
from spdbench.attacks.base import registered
from spdbench.harness.editing import EditSettings
from spdbench.suites import get_suite


def attack_param(name: str, slow: set, expected_failures: dict):
    """A registry-wide check's parameter: marked slow where measured slow, and a strict expected
    failure (with its measured reason) where the attack is known to fail, so a change either way shows."""
    marks = [pytest.mark.slow] if name in slow else []
    if name in expected_failures:
        marks.append(pytest.mark.xfail(strict=True, reason=expected_failures[name]))
    return pytest.param(name, marks=marks)


def fast_suite(**overrides):
    base = dict(target="tiny-random", image_size=64, eps=("16/255",), prompts=("P3",),
                edit=EditSettings(strength=0.5, steps=4, guidance=7.5, seed=9222), attack_steps=3,
                attack_work=None, attack_batch_size=3, purifiers=())  # iteration-matched: 3 steps, no probe
    base.update(overrides)
    return get_suite("smoke", **base)


def fast_images(n: int = 6):
    return spdbench.load_photos(n=n, size=64)


class RecordingUAP(spdbench.UniversalAttack):
    """Saves every batch fit() was shown to `record_dir` (a file per call, so it works in the attack's
    worker process too), to prove the test split never reaches fit()."""

    defaults = {"record_dir": ""}

    def fit(self, train_images, target, budget, generator=None):
        if self.record_dir:
            out = Path(self.record_dir)
            out.mkdir(parents=True, exist_ok=True)
            save_file({"images": train_images.detach().float().cpu().contiguous()},
                      str(out / f"fit-{uuid.uuid4().hex}.safetensors"))
        return budget.random(train_images[:1], generator)


def recorded_fits(record_dir) -> list[torch.Tensor]:
    """The batches RecordingUAP.fit saw, one tensor per call."""
    from safetensors.torch import load_file

    return [load_file(str(p))["images"] for p in sorted(Path(record_dir).glob("fit-*.safetensors"))]


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


#: name -> class of every test-only attack; registered only inside `registered_test_attacks()`
TEST_ATTACKS = {"test-recording-uap": RecordingUAP, "test-over-budget": OverBudget, "test-nan": ReturnsNaN,
                "test-wrong-shape": WrongShape, "test-wrong-dtype": WrongDtype, "test-raises": Raises}


@contextmanager
def registered_test_attacks() -> Iterator[dict]:
    """Register every TEST_ATTACKS name for the `with` block; all are removed on exit."""
    with ExitStack() as stack:
        for name, cls in TEST_ATTACKS.items():
            stack.enter_context(registered(name, cls))
        yield TEST_ATTACKS
