"""Reference points: no perturbation (the upper bound on similarity) and uniform noise (SPD's baseline)."""
from __future__ import annotations

from typing import Optional

import torch

from spdbench.budget import Budget, clamp_to_image
from spdbench.attacks.base import Attack, register


@register("none")
class NoAttack(Attack):
    """No perturbation: delta = 0. The similarity every protection is compared against.

    Shapes: images (N, 3, H, W) in [0, 1] -> delta of the same shape. Usage: `get_attack("none")`.
    """

    def perturb(self, images: torch.Tensor, target, budget: Budget,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        self.loss_history = []
        return torch.zeros_like(images)


@register("uniform-noise")
class UniformNoise(Attack):
    """Random noise of the full budget: delta ~ U[-eps, eps] (L-inf) or uniform in the L2 ball,
    shrunk where needed so that x + delta stays in [0, 1] (as the harness would clamp it).

    The SPD paper's baseline; every optimized attack must beat it on its own objective.
    Shapes: (N, 3, H, W) -> same. Usage: `get_attack("uniform-noise")`.
    """

    def perturb(self, images: torch.Tensor, target, budget: Budget,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        self.loss_history = []
        return clamp_to_image(images, budget.random(images, generator=generator))
